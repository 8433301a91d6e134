//! How fast candle's CPU matmul streams weights at the shapes decode and prefill use: the floor
//! under `qwen-bench`'s decode ms/step on this machine.
//!
//!     cargo run --release -p qwen-bench --example gemm_bandwidth

use std::time::Instant;

use candle_core::{Device, Tensor};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    println!("| m | k | n | ms | weight GB/s | GFLOP/s |");
    println!("|---|---|---|---|---|---|");
    for (m, k, n) in [(1usize, 896usize, 4864usize), (8, 896, 4864), (128, 896, 4864), (1, 896, 151_936)] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?; // [out, in], as checkpoints store it
        for _ in 0..3 {
            x.matmul(&w.t()?)?;
        }
        let iters = 20;
        let t = Instant::now();
        for _ in 0..iters {
            x.matmul(&w.t()?)?;
        }
        let s = t.elapsed().as_secs_f64() / iters as f64;
        let gb = (n * k * 4) as f64 / 1e9;
        let gflop = 2.0 * (m * n * k) as f64 / 1e9;
        println!("| {m} | {k} | {n} | {:.2} | {:.1} | {:.0} |", s * 1e3, gb / s, gflop / s);
    }
    Ok(())
}
