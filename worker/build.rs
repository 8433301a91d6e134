//! With the `cuda` feature, compiles the kernels in `kernels/` to PTX with nvcc (for
//! `CUDA_COMPUTE_CAP`, default 90); the worker loads the PTX when it first launches a kernel.
//! The default build compiles nothing here.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 5] = ["fused", "attention", "sampling", "moe", "quant"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    println!("cargo:rerun-if-changed=kernels/common.cuh");
    for name in KERNELS {
        let src = format!("kernels/{name}.cu");
        println!("cargo:rerun-if-changed={src}");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", &format!("-arch=sm_{cap}"), "-O3", "-std=c++17", "-Ikernels", "-o"])
            .arg(&ptx)
            .arg(&src)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} for {src}: {e} (is the CUDA toolkit on PATH?)"));
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
