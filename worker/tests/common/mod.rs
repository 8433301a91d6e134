//! Helpers shared by the worker's integration tests (each test file compiles its own copy and
//! uses a subset, hence the allow).
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A committed fixture model directory.
pub fn fixture(name: &str) -> PathBuf {
    root().join("fixtures/models").join(name)
}

/// The ids of a JSON array of token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}
