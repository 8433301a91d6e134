//! `scripts/local_cluster.sh`, the one command that starts a whole local cluster: with the debug
//! binaries (QWEN_BIN_DIR) and free ports it prints its endpoints and `cluster ready`, serves a
//! chat completion over the printed OpenAI URL and ListModels over the printed gRPC address (with
//! etcd installed: from a tp 2 group), and SIGINT stops it with status 0 and nothing left running.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use qwen_proto::serve::generation_client::GenerationClient;
use qwen_proto::serve::ListModelsRequest;
use qwen_tests::{bin, pids_with_args, root, signal};

/// The running script; on drop (a failed test) it is stopped like by a user, then by SIGKILL to
/// it and to every process it started.
struct Script {
    child: Child,
    lines: Receiver<String>,
    /// Every stdout line so far.
    out: Vec<String>,
}

impl Script {
    fn start() -> Script {
        let bin_dir = bin("qwen-router").parent().expect("binary directory").to_path_buf();
        let _ = bin("qwen-worker");
        let mut child = Command::new(root().join("scripts/local_cluster.sh"))
            .env("QWEN_BIN_DIR", &bin_dir)
            .env("QWEN_LOCAL_GRPC_PORT", "0")
            .env("QWEN_LOCAL_HTTP_PORT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run scripts/local_cluster.sh (executable?)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        // Drains stdout to the end, so the script never writes into a closed pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("local_cluster.sh| {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Script { child, lines, out: Vec::new() }
    }

    /// Reads stdout until a line equal to `want`; panics at `deadline` or if the script ends.
    fn wait_for(&mut self, want: &str, deadline: Instant) {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let done = line.trim() == want;
                    self.out.push(line);
                    if done {
                        return;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!("no {want:?} line in time; stdout so far:\n{}", self.text()),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!("the script ended ({status:?}) before {want:?}; stdout:\n{}", self.text())
                }
            }
        }
    }

    fn text(&self) -> String {
        self.out.join("\n")
    }

    /// The value after `label` ("  OpenAI API:   http://…") in the output: its first word.
    fn field(&self, label: &str) -> Option<String> {
        self.out.iter().find_map(|l| {
            let rest = l.trim_start().strip_prefix(label)?;
            rest.split_whitespace().next().map(str::to_string)
        })
    }

    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let started = descendants(self.child.id());
        signal(self.child.id(), "INT");
        if self.wait_exit(Duration::from_secs(30)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for pid in started.keys() {
            signal(*pid, "KILL");
        }
    }
}

/// Parent PID of every process.
fn parents() -> HashMap<u32, u32> {
    let mut out = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid …"; comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
        if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
            out.insert(pid, ppid);
        }
    }
    out
}

fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    raw.split(|&b| b == 0).map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>().join(" ")
}

/// The cluster's processes under `root` (etcd, workers, ranks, router) with their command lines;
/// the script's own short-lived helpers (sleep, subshells) are left out.
fn descendants(root: u32) -> HashMap<u32, String> {
    let parents = parents();
    let mut out = HashMap::new();
    for &pid in parents.keys() {
        let mut p = pid;
        while let Some(&pp) = parents.get(&p) {
            if pp == root {
                let cmd = cmdline(pid);
                let exe = cmd.split(' ').next().unwrap_or_default();
                let name = Path::new(exe).file_name().and_then(|n| n.to_str()).unwrap_or_default();
                if ["qwen-worker", "qwen-router", "etcd"].contains(&name) {
                    out.insert(pid, cmd);
                }
                break;
            }
            if pp <= 1 {
                break;
            }
            p = pp;
        }
    }
    out
}

/// Whether `pid` still runs `cmd` (a zombie or a reused PID does not count).
fn still_running(pid: u32, cmd: &str) -> bool {
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = state.rfind(')').is_some_and(|i| state[i + 1..].trim_start().starts_with('Z'));
    !zombie && cmdline(pid) == cmd
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir: PathBuf| dir.join(name).is_file()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cluster_starts_serves_and_stops_on_ctrl_c() {
    let started = Instant::now();
    let mut script = Script::start();
    script.wait_for("cluster ready", started + Duration::from_secs(120));
    let ready_after = started.elapsed();

    let openai = script.field("OpenAI API:").expect("OpenAI API line");
    let grpc = script.field("gRPC API:").expect("gRPC API line");
    let model = script.field("model:").expect("model line");
    let logs = script.field("logs:").expect("logs line");
    assert!(openai.starts_with("http://127.0.0.1:") && openai.ends_with("/v1"), "{openai}");
    assert!(!openai.ends_with(":0/v1") && !grpc.ends_with(":0"), "real ports, not 0: {openai} {grpc}");
    assert_eq!(model, "demo-model");
    let demo_dir = root().join(".cache/demo-model");
    assert!(demo_dir.join("tokenizer_config.json").is_file() && !demo_dir.join("golden.json").exists());

    let etcd = if on_path("etcd") {
        let url = script.field("etcd:").expect("etcd line");
        assert!(url.starts_with("http://127.0.0.1:"), "etcd endpoint: {url}");
        let group = script.out.iter().find(|l| l.contains("worker group:")).expect("worker group line");
        assert!(group.contains("tp 2"), "{group}");
        assert_eq!(pids_with_args(&["--etcd", &url, "--rank"]).len(), 2, "two rank processes");
        Some(url)
    } else {
        None
    };
    let processes = descendants(script.child.id());
    assert!(processes.values().any(|c| c.contains("qwen-router")), "{processes:?}");
    assert!(processes.values().any(|c| c.contains("qwen-worker")), "{processes:?}");

    // The printed OpenAI endpoint answers a chat completion (through the demo chat template).
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "temperature": 0,
    });
    let resp = reqwest::Client::new().post(format!("{openai}/chat/completions")).json(&body).send().await.unwrap();
    let status = resp.status();
    let json: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(status, 200, "{json}");
    assert!(json["choices"][0]["message"]["content"].is_string(), "{json}");

    // The printed gRPC address serves the public API.
    let mut client = GenerationClient::connect(format!("http://{grpc}")).await.expect("connect to gRPC");
    let models = client.list_models(ListModelsRequest {}).await.unwrap().into_inner().models;
    assert!(models.iter().any(|m| m.id == model), "{models:?}");

    // Ctrl-C: everything stops, status 0.
    let stop = Instant::now();
    signal(script.child.id(), "INT");
    let status = script.wait_exit(Duration::from_secs(40)).expect("the script did not exit within 40 s of SIGINT");
    let stopped_after = stop.elapsed();
    assert!(status.success(), "{status:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let left = loop {
        let mut left: Vec<String> = processes
            .iter()
            .filter(|(pid, cmd)| still_running(**pid, cmd))
            .map(|(pid, cmd)| format!("{pid} {cmd}"))
            .collect();
        if let Some(url) = &etcd {
            left.extend(pids_with_args(&["--etcd", url]).iter().map(|p| format!("{p} {}", cmdline(*p))));
            left.extend(pids_with_args(&["--listen-client-urls", url]).iter().map(|p| format!("{p} {}", cmdline(*p))));
        }
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(left.is_empty(), "still running after the script exited: {left:?}");
    assert!(!Path::new(&logs).exists(), "temp dir {logs} not removed");
    eprintln!("cluster ready after {ready_after:?}, stopped {stopped_after:?} after SIGINT");
}
