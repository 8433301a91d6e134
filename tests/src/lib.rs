//! Helpers for the integration tests in `tests/tests/`: they run the workspace's built binaries
//! as real processes against the committed fixtures.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/models").join(name)
}

/// Path of a workspace binary in the same target directory as the running test. `cargo test
/// --workspace` builds it before running any test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path =
        exe.parent().and_then(|deps| deps.parent()).map(|profile| profile.join(name)).expect("target directory layout");
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// Runs `qwen-worker` with `args` and returns its output.
pub fn qwen_worker(args: &[&str]) -> Output {
    Command::new(bin("qwen-worker")).args(args).env_remove("RUST_LOG").output().expect("spawn qwen-worker")
}

/// The `ids` array of a golden JSON value.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array of ids").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

pub fn golden(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("golden.json")).expect("golden.json");
    serde_json::from_str(&text).expect("golden.json parses")
}

/// A `qwen-worker serve` process on a free loopback port, killed (by PID) when dropped.
pub struct WorkerProcess {
    child: std::process::Child,
    pub addr: String,
    /// `host:port` of `/metrics` when started with `--metrics-listen`.
    pub metrics: Option<String>,
}

impl WorkerProcess {
    /// Starts `qwen-worker serve --model <fixture> --listen 127.0.0.1:0 <extra>` and waits for
    /// its "listening on" line.
    pub fn start(fixture_name: &str, extra: &[&str]) -> WorkerProcess {
        use std::io::BufRead;
        let model = fixture(fixture_name);
        let mut child = Command::new(bin("qwen-worker"))
            .args(["serve", "--model", model.to_str().expect("utf-8 path"), "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn qwen-worker serve");
        let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read listening line");
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            panic!("qwen-worker serve did not start: {line:?}");
        };
        let addr = format!("http://{addr}");
        let metrics = extra.contains(&"--metrics-listen").then(|| {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("read metrics line");
            line.trim().strip_prefix("metrics on ").expect("metrics on ADDR").to_string()
        });
        WorkerProcess { addr, metrics, child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl WorkerProcess {
    /// Asks the process to stop (SIGTERM) and waits up to `limit`; SIGKILL after that.
    pub fn stop(&mut self, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
        stop_child(&mut self.child, limit)
    }

    /// The exit status if the process has ended.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        // Graceful first: a `--tp` supervisor stops its ranks on SIGTERM.
        self.stop(std::time::Duration::from_secs(5));
    }
}

/// SIGTERM, then up to `limit` for the process to exit, then SIGKILL.
fn stop_child(child: &mut std::process::Child, limit: std::time::Duration) -> Option<std::process::ExitStatus> {
    signal(child.id(), "TERM");
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait().ok()
}

/// `host:port` of an `http://host:port` address (what `--worker` takes).
pub fn bare(addr: &str) -> &str {
    addr.trim_start_matches("http://")
}

/// Sends SIG`name` (e.g. "KILL", "STOP") to `pid` with kill(1).
pub fn signal(pid: u32, name: &str) {
    let _ =
        Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).stderr(std::process::Stdio::null()).status();
}

/// PIDs of processes whose command line contains every one of `args` (as whole arguments).
pub fn pids_with_args(args: &[&str]) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let parts: Vec<String> = cmdline.split(|&b| b == 0).map(|p| String::from_utf8_lossy(p).into_owned()).collect();
        if args.iter().all(|a| parts.iter().any(|p| p == a)) {
            out.push(pid);
        }
    }
    out
}

/// PID of rank `rank` of group `group` (started by a `--tp` supervisor).
pub fn rank_pid(group: &str, rank: usize) -> Option<u32> {
    let r = rank.to_string();
    let pids = pids_with_args(&["--group", group, "--rank"]);
    pids.into_iter().find(|pid| {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let parts: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
        parts.windows(2).any(|w| w[0] == b"--rank" && w[1] == r.as_bytes())
    })
}

/// A `qwen-router` process on free loopback ports, stopped (by PID) when dropped.
pub struct RouterProcess {
    child: std::process::Child,
    /// `http://127.0.0.1:port` of the public gRPC API.
    pub grpc: String,
    /// `http://127.0.0.1:port` of the OpenAI-compatible API.
    pub http: String,
}

impl RouterProcess {
    /// Starts `qwen-router --grpc-listen 127.0.0.1:0 --http-listen 127.0.0.1:0 <extra>` and waits
    /// for both "listening on" lines.
    pub fn start(extra: &[&str]) -> RouterProcess {
        Self::spawn(extra, std::process::Stdio::inherit())
    }

    /// Like [`RouterProcess::start`], its log lines (stderr) going to `log`.
    pub fn start_logged(extra: &[&str], log: &std::path::Path) -> RouterProcess {
        let file = std::fs::File::create(log).expect("create the router's log file");
        Self::spawn(extra, std::process::Stdio::from(file))
    }

    fn spawn(extra: &[&str], stderr: std::process::Stdio) -> RouterProcess {
        use std::io::BufRead;
        let mut child = Command::new(bin("qwen-router"))
            .args(["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--health-interval-ms", "200"])
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(stderr)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("spawn qwen-router");
        let mut lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut addr = |prefix: &str| -> String {
            let line = lines.next().and_then(Result::ok).unwrap_or_default();
            match line.trim().strip_prefix(prefix) {
                Some(a) => format!("http://{a}"),
                None => panic!("qwen-router did not start: {line:?}"),
            }
        };
        let grpc = addr("grpc listening on ");
        let http = addr("http listening on ");
        RouterProcess { child, grpc, http }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `/health` answers 200 (a healthy group serves); panics after 20 s.
    pub async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let health = format!("{}/health", self.http);
        while reqwest::get(&health).await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
            assert!(std::time::Instant::now() < deadline, "router never became ready");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

impl Drop for RouterProcess {
    fn drop(&mut self) {
        stop_child(&mut self.child, std::time::Duration::from_secs(5));
    }
}

impl RouterProcess {
    /// POSTs `body` as JSON to `path` of the HTTP API: the status and the JSON answer.
    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let resp = reqwest::Client::new().post(format!("{}{path}", self.http)).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// A streamed (SSE) answer: every `data:` payload in order.
    pub async fn post_stream(&self, path: &str, body: serde_json::Value) -> Vec<String> {
        let resp = reqwest::Client::new().post(format!("{}{path}", self.http)).json(&body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let text = resp.text().await.unwrap();
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
    }
}
