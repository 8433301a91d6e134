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
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).expect("read listening line");
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            panic!("qwen-worker serve did not start: {line:?}");
        };
        WorkerProcess { addr: format!("http://{addr}"), child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
