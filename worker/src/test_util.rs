//! Seeded random inputs for unit tests: every test thread starts from the same seed, so a test's
//! inputs are the same on every run and in any test order.

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

thread_local! {
    // The test harness runs each test on its own thread: each test gets this sequence afresh.
    static RNG: RefCell<ChaCha8Rng> = RefCell::new(ChaCha8Rng::seed_from_u64(0x5eed));
}

/// Standard normal values (Box-Muller) of `shape`, made in f32 and converted to `dtype`.
pub fn randn(shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..n)
            .map(|_| {
                let (u1, u2): (f64, f64) = (r.random_range(f64::EPSILON..1.0), r.random());
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            })
            .collect()
    });
    Tensor::from_vec(values, shape, dev).and_then(|t| t.to_dtype(dtype)).expect("a tensor of that shape")
}

/// Uniform values in `[lo, hi)` of `shape`, f32.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn uniform(lo: f32, hi: f32, shape: &[usize], dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let values: Vec<f32> = RNG.with(|r| {
        let mut r = r.borrow_mut();
        (0..n).map(|_| r.random_range(lo..hi)).collect()
    });
    Tensor::from_vec(values, shape, dev).expect("a tensor of that shape")
}

/// Unit roundoff of `dtype` (half the gap between 1 and the next value): a result rounded `k`
/// times more than its reference is within about `k` of these, relative.
pub fn unit_roundoff(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 2f32.powi(-8),
        DType::F16 => 2f32.powi(-11),
        _ => 2f32.powi(-24),
    }
}
