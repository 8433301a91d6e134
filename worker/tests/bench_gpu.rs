//! `qwen-worker bench-gpu` end to end on the CPU (the `tiny` shapes): the table, the JSON file,
//! and errors that name the flag. The GPU numbers themselves are in docs/performance.md.

use std::process::Command;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_qwen-worker"))
}

#[test]
fn bench_gpu_runs_the_engine_and_writes_the_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = worker()
        .args(["bench-gpu", "--shapes", "tiny", "--device", "cpu", "--dtype", "f32", "--batches", "1,3"])
        .args(["--prompt-len", "12", "--decode-steps", "5", "--kernels", "fused", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("| batch | ms/step | tokens/s | prefill ms | % of floor |"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["shapes"], "tiny");
    assert_eq!(report["kernels"], "fused");
    assert_eq!((report["prompt_len"].as_u64(), report["decode_steps"].as_u64()), (Some(12), Some(5)));
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.iter().map(|r| r["batch"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 3]);
    for r in rows {
        for key in ["ms_per_step", "tokens_per_s", "prefill_ms", "pct_of_floor"] {
            assert!(r[key].as_f64().unwrap() > 0.0, "{key} in {r}");
        }
    }
    // No GPU here: the graph runner's static-buffer path ran every timed decode step eagerly,
    // and its tokens were checked against an eager engine on the same weights.
    assert_eq!(report["cuda_graphs"], false);
    assert_eq!(report["graph_replays"], 0);
    assert_eq!(report["graph_eager_steps"].as_u64(), Some(2 * 5), "{report}");
    let check = &report["token_check"];
    assert_eq!(check["sequences"], 4, "{check}");
    assert_eq!(check["mismatched"], 0, "{check}");
    // Weight bytes are every tensor the model holds: 2 layers of a 64-wide Qwen2, the final norm,
    // and a tied 512-token embedding, which the LM head holds a copy of (as when loading a file).
    let per_layer = 64 * 64 * 2 + 2 * (64 * 32 + 32) + 64 + 3 * 64 * 128 + 2 * 64;
    assert_eq!(report["weight_bytes"].as_u64().unwrap() as usize, 4 * (2 * 512 * 64 + 2 * per_layer + 64));
}

#[test]
fn bench_gpu_refuses_bad_flags_by_name() {
    let run = |args: &[&str]| {
        let out = worker().arg("bench-gpu").args(args).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(run(&["--shapes", "qwen9-1t"]).contains("--shapes"));
    assert!(run(&["--shapes", "tiny", "--device", "tpu"]).contains("cpu, cuda or cuda:N"));
    assert!(run(&["--shapes", "tiny", "--device", "cpu", "--batches", "0"]).contains("--batches"));
}

/// A build without the `cuda` feature says so for `--device cuda`, naming the flag.
#[cfg(not(feature = "cuda"))]
#[test]
fn serve_on_cuda_without_the_feature_names_the_flag() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen2-gqa");
    let out = worker()
        .args(["serve", "--listen", "127.0.0.1:0", "--device", "cuda", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--device cuda") && err.contains("without the `cuda` feature"), "{err}");
}

/// CPU ranks on one host share its memory: a fixed KV cache that the host cannot give every one
/// of them is refused at start, naming the flag.
#[test]
fn a_kv_cache_that_overcommits_the_host_is_refused() {
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen2-gqa");
    let out = worker()
        .args(["serve", "--listen", "127.0.0.1:0", "--device", "cpu", "--ranks-on-host", "1000000"])
        .args(["--kv-cache-bytes", "1000000000", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--kv-cache-bytes") && err.contains("rank(s) on this host"), "{err}");
}
