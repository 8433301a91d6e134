//! Helpers shared by the worker's integration tests (each test file compiles its own copy and
//! uses a subset, hence the allow).
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// Repository root: `QWEN_REPO_ROOT` when set (a test binary run away from the tree it was
/// built in, as on the GPU machine), else where it was built.
pub fn root() -> PathBuf {
    match std::env::var_os("QWEN_REPO_ROOT") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."),
    }
}

/// Every committed fixture model.
pub const FIXTURES: [&str; 13] = [
    "qwen2-gqa",
    "qwen2-tied-bf16-sharded",
    "qwen3",
    "qwen1-ntk-logn",
    "qwen1-partial-rotary",
    "qwen2-moe",
    "qwen3-moe",
    "qwen2-gptq-int4",
    "qwen3-gptq-int8-actorder",
    "qwen2-awq",
    "qwen3-fp8",
    "qwen3-moe-fp8",
    "qwen1-gptq-int4",
];

/// A committed fixture model directory.
pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/models").join(name)
}

/// The ids of a JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// GPU 0 opened as the worker opens it, or `None` (with a note) where there is none; with
/// `QWEN_REQUIRE_GPU=1` a missing GPU fails the test instead.
#[cfg(feature = "cuda")]
pub fn gpu() -> Option<candle_core::Device> {
    match qwen_worker::device::DeviceSpec::Cuda(0).open() {
        Ok(d) => Some(d),
        Err(e) => {
            assert!(std::env::var("QWEN_REQUIRE_GPU").as_deref() != Ok("1"), "no GPU: {e}");
            eprintln!("skipped: no GPU ({e})");
            None
        }
    }
}
