//! `qwen-router` flag errors: each names the flag and exits non-zero before binding anything.
//! (Being an integration test of this package also makes `cargo test` build the binary that the
//! workspace's process tests run.)

use std::process::Command;

fn router(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qwen-router"))
        .args(["--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(args)
        .env_remove("QWEN_ETCD")
        .env_remove("QWEN_ROUTER_WORKERS")
        .env_remove("QWEN_ROUTER_API_KEY_FILE")
        .output()
        .expect("run qwen-router");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_flags_are_named() {
    let cases: [(&[&str], &str); 11] = [
        (&[], "--worker"),
        (&["--worker", "127.0.0.1:1", "--etcd", "http://127.0.0.1:2"], "exclude each other"),
        (&["--worker", "nohostport"], "--worker"),
        (&["--worker", "127.0.0.1:1", "--cache-threshold", "2"], "--cache-threshold"),
        (&["--worker", "127.0.0.1:1", "--max-attempts", "0"], "--max-attempts"),
        (&["--worker", "127.0.0.1:1", "--tokenizer", "no-equals-sign"], "--tokenizer"),
        (&["--worker", "127.0.0.1:1", "--tls-cert", "/nonexistent/c.pem"], "--tls-key"),
        (&["--worker", "127.0.0.1:1", "--api-key-file", "/nonexistent/keys"], "/nonexistent/keys"),
        (&["--worker", "127.0.0.1:1", "--worker-tls-cert", "c.pem", "--worker-tls-key", "k.pem"], "--worker-tls-ca"),
        (&["--worker", "127.0.0.1:1", "--worker-tls-ca", "/nonexistent/ca.pem"], "/nonexistent/ca.pem"),
        (&["--etcd", "127.0.0.1:2", "--etcd-user", "qwen"], "--etcd-password-file"),
    ];
    for (args, want) in cases {
        let (ok, err) = router(args);
        assert!(!ok, "{args:?} accepted");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let (ok, err) = router(&["--worker", "127.0.0.1:1", "--policy", "fastest"]);
    assert!(!ok && err.contains("--policy"), "{err}");
}
