//! The formats read against values worked out by hand from their bit layouts (so the fixture
//! script and the loader cannot share a mistake), tensor-parallel cuts against the whole
//! weight, and the tiled forward against the dequantized weight.

// A column cut is a list of output ranges; a whole tensor is a list of one.
#![allow(clippy::single_range_in_vec_init)]

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Device, Tensor};

use super::load::{load, Cut};
use super::*;
use crate::weights::Weights;

fn checkpoint(tensors: HashMap<String, Tensor>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn ints(v: &[u32], shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v.iter().map(|&x| x as i32).collect::<Vec<_>>(), shape, &Device::Cpu).unwrap()
}

fn halves(v: &[f32], shape: (usize, usize)) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap()
}

/// A float8_e4m3fn tensor holding exactly `bytes`.
fn fp8_bytes(bytes: &[u8], shape: (usize, usize)) -> Tensor {
    Tensor::from_raw_buffer(bytes, DType::F8E4M3, &[shape.0, shape.1], &Device::Cpu).unwrap()
}

fn open(dir: &tempfile::TempDir, q: QuantConfig) -> Weights {
    let w = Weights::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
    w.set_quant(Some(q));
    w
}

fn whole(w: &Weights, (i, o): (usize, usize)) -> Vec<Vec<f32>> {
    let q = load(w, "l", (i, o), Cut::Columns(&[0..o])).unwrap().expect("quantized");
    q.dequantize().unwrap().to_vec2().unwrap()
}

#[test]
fn gptq_4bit_reads_rows_low_bits_first_and_zeros_plus_one() {
    // 8 inputs x 8 outputs, one group. Column 0 holds q = 1..8 down its rows (row i in bits
    // 4i), column 1 has q = 15 in row 0; stored zeros are zero - 1: 7 (zero 8) except column 1's
    // 2 (zero 3), packed along outputs.
    let mut qweight = [0u32; 8];
    qweight[0] = 0x8765_4321;
    qweight[1] = 0x0000_000F;
    let t = HashMap::from([
        ("l.qweight".to_string(), ints(&qweight, (1, 8))),
        ("l.qzeros".to_string(), ints(&[0x7777_7727], (1, 1))),
        ("l.scales".to_string(), halves(&[0.5, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], (1, 8))),
        ("l.g_idx".to_string(), ints(&[0; 8], (1, 8)).flatten_all().unwrap()),
    ]);
    let dir = checkpoint(t);
    let w = open(&dir, QuantConfig::Gptq { bits: 4, group_size: Some(8), desc_act: false, sym: true });
    let got = whole(&w, (8, 8));
    assert_eq!(got[0], vec![-3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0]);
    assert_eq!(got[1], vec![24.0, -6.0, -6.0, -6.0, -6.0, -6.0, -6.0, -6.0]);
    assert!(got[2..].iter().all(|row| row.iter().all(|&v| v == -8.0)));
}

#[test]
fn gptq_8bit_packs_four_rows_per_word() {
    // 4 inputs x 4 outputs, one group, zero 128 (stored 127 in each byte of the zero word)
    // except column 3's 256 (stored 255: asymmetric 8-bit zeros reach 2^8).
    let t = HashMap::from([
        ("l.qweight".to_string(), ints(&[0x8281_807F, 0, 0, 0xFF00_0000], (1, 4))),
        ("l.qzeros".to_string(), ints(&[0xFF7F_7F7F], (1, 1))),
        ("l.scales".to_string(), halves(&[1.0, 1.0, 1.0, 0.5], (1, 4))),
    ]);
    let dir = checkpoint(t);
    let w = open(&dir, QuantConfig::Gptq { bits: 8, group_size: None, desc_act: false, sym: true });
    let got = whole(&w, (4, 4));
    assert_eq!(got[0], vec![-1.0, 0.0, 1.0, 2.0], "bytes 0x7f, 0x80, 0x81, 0x82 from the low end");
    assert_eq!(got[3], vec![-128.0, -128.0, -128.0, -0.5], "q 0xff in the top byte, zero 256");
}

#[test]
fn awq_reads_its_interleaved_nibble_order() {
    // 2 inputs x 8 outputs, one group. 0x75316420 holds columns 0..8 as the values 0..8 in AWQ's
    // order (nibbles from the low end: columns 0, 2, 4, 6, 1, 3, 5, 7).
    let t = HashMap::from([
        ("l.qweight".to_string(), ints(&[0xFFFF_FFFF, 0x7531_6420], (2, 1))),
        ("l.qzeros".to_string(), ints(&[0x7531_6420], (1, 1))),
        ("l.scales".to_string(), halves(&[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.25], (1, 8))),
    ]);
    let dir = checkpoint(t);
    let w = open(&dir, QuantConfig::Awq { group_size: 2 });
    let got = whole(&w, (2, 8));
    for (j, row) in got.iter().enumerate() {
        let scale = if j == 7 { 0.25 } else { 1.0 };
        assert_eq!(row, &vec![(15.0 - j as f32) * scale, 0.0], "column {j}: zero {j}, q 15 then q {j}");
    }
}

#[test]
fn fp8_e4m3_bytes_and_partial_blocks() {
    for (byte, want) in [(0x38, 1.0), (0x40, 2.0), (0x7E, 448.0), (0x01, 2f32.powi(-9)), (0xB8, -1.0), (0x00, 0.0)] {
        assert_eq!(fp8_e4m3_to_f32(byte), want, "{byte:#04x}");
    }
    assert!(fp8_e4m3_to_f32(0x7F).is_nan() && fp8_e4m3_to_f32(0xFF).is_nan());
    // [3, 5] of 1.0 in [2, 3] blocks: the last block row and column are partial.
    let weight = fp8_bytes(&[0x38; 15], (3, 5));
    let t = HashMap::from([
        ("l.weight".to_string(), weight),
        ("l.weight_scale_inv".to_string(), Tensor::new(&[[1f32, 2.0], [4.0, 8.0]], &Device::Cpu).unwrap()),
    ]);
    let dir = checkpoint(t);
    let w = open(&dir, QuantConfig::Fp8 { block: [2, 3] });
    assert_eq!(
        whole(&w, (5, 3)),
        vec![vec![1.0, 1.0, 1.0, 2.0, 2.0], vec![1.0, 1.0, 1.0, 2.0, 2.0], vec![4.0, 4.0, 4.0, 8.0, 8.0]]
    );
}

/// A random checkpoint linear `l` of `(in, out)` in `q`'s format.
fn random_linear(q: QuantConfig, (i, o): (usize, usize), seed: u64) -> tempfile::TempDir {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut words = |n: usize| (0..n).map(|_| rng.random::<u32>()).collect::<Vec<_>>();
    let mut t = HashMap::new();
    match q {
        QuantConfig::Gptq { bits, group_size, desc_act, .. } => {
            let per = (32 / bits) as usize;
            let groups = group_size.map_or(1, |g| i.div_ceil(g));
            t.insert("l.qweight".into(), ints(&words(i / per * o), (i / per, o)));
            t.insert("l.qzeros".into(), ints(&words(groups * o / per), (groups, o / per)));
            let mut g_idx: Vec<u32> = (0..i).map(|r| group_size.map_or(0, |g| r / g) as u32).collect();
            if desc_act {
                // Act-order: the groups in a seeded shuffled row order.
                for k in (1..i).rev() {
                    g_idx.swap(k, words(1)[0] as usize % (k + 1));
                }
            }
            t.insert("l.g_idx".into(), ints(&g_idx, (1, i)).flatten_all().unwrap());
            let scales: Vec<f32> = words(groups * o).iter().map(|w| 0.01 + (w % 100) as f32 / 1000.0).collect();
            t.insert("l.scales".into(), halves(&scales, (groups, o)));
        }
        QuantConfig::Awq { group_size } => {
            let groups = i.div_ceil(group_size);
            t.insert("l.qweight".into(), ints(&words(i * o / 8), (i, o / 8)));
            t.insert("l.qzeros".into(), ints(&words(groups * o / 8), (groups, o / 8)));
            let scales: Vec<f32> = words(groups * o).iter().map(|w| 0.01 + (w % 100) as f32 / 1000.0).collect();
            t.insert("l.scales".into(), halves(&scales, (groups, o)));
        }
        QuantConfig::Fp8 { block } => {
            // Any byte but the NaNs.
            let bytes: Vec<u8> = words(i * o).iter().map(|w| (w % 256) as u8 & !0x01 | 0x08).collect();
            let weight = fp8_bytes(&bytes, (o, i));
            t.insert("l.weight".into(), weight);
            let (r, c) = (o.div_ceil(block[0]), i.div_ceil(block[1]));
            let s: Vec<f32> = words(r * c).iter().map(|w| 1e-3 * (1 + w % 50) as f32).collect();
            t.insert("l.weight_scale_inv".into(), Tensor::from_vec(s, (r, c), &Device::Cpu).unwrap());
        }
    }
    checkpoint(t)
}

fn formats() -> [(QuantConfig, &'static str); 5] {
    [
        (QuantConfig::Gptq { bits: 4, group_size: Some(16), desc_act: false, sym: true }, "gptq-4"),
        (QuantConfig::Gptq { bits: 4, group_size: Some(8), desc_act: true, sym: false }, "gptq-4 act-order"),
        (QuantConfig::Gptq { bits: 8, group_size: None, desc_act: false, sym: true }, "gptq-8 one group"),
        (QuantConfig::Awq { group_size: 16 }, "awq"),
        (QuantConfig::Fp8 { block: [16, 24] }, "fp8"),
    ]
}

#[test]
fn tensor_parallel_cuts_are_exact_slices_of_the_whole() {
    let (i, o) = (64, 48);
    for (seed, (q, name)) in formats().into_iter().enumerate() {
        let dir = random_linear(q, (i, o), seed as u64);
        let w = open(&dir, q);
        let full = Tensor::new(whole(&w, (i, o)), &Device::Cpu).unwrap();
        // Column cuts as a fused q/k/v rank takes them (several ranges); row cuts of a half and
        // a quarter of the inputs.
        let cols: [Range<usize>; 2] = [8..24, 32..40];
        let got = load(&w, "l", (i, o), Cut::Columns(&cols)).unwrap().unwrap().dequantize().unwrap();
        let want = Tensor::cat(&[full.narrow(0, 8, 16).unwrap(), full.narrow(0, 32, 8).unwrap()], 0).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap(), "{name} columns");
        for rows in [32..64, 16..32] {
            let got = load(&w, "l", (i, o), Cut::Rows(&rows)).unwrap().unwrap().dequantize().unwrap();
            let want = full.narrow(1, rows.start, rows.len()).unwrap();
            assert_eq!(got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap(), "{name} rows {rows:?}");
        }
    }
}

#[test]
fn impossible_cuts_and_mismatched_formats_are_refused_by_name() {
    let q = QuantConfig::Gptq { bits: 4, group_size: Some(16), desc_act: false, sym: true };
    let dir = random_linear(q, (64, 48), 1);
    let w = open(&dir, q);
    let err = load(&w, "l", (64, 48), Cut::Rows(&(4..36))).unwrap_err().to_string();
    assert!(err.contains("l.qweight") && err.contains("packed"), "{err}");
    let awq = QuantConfig::Awq { group_size: 16 };
    let dir = random_linear(awq, (64, 48), 2);
    let err = load(&open(&dir, awq), "l", (64, 48), Cut::Columns(&[4..20])).unwrap_err().to_string();
    assert!(err.contains("l.qweight") && err.contains("8 columns"), "{err}");
    let fp8 = open(&random_linear(QuantConfig::Fp8 { block: [16, 16] }, (32, 32), 3), q);
    let err = load(&fp8, "l", (32, 32), Cut::Columns(&[0..32])).unwrap_err().to_string();
    assert!(err.contains("quantization_config") && err.contains("gptq"), "{err}");
    let unset = Weights::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let err = load(&unset, "l", (64, 48), Cut::Columns(&[0..48])).unwrap_err().to_string();
    assert!(err.contains("no quantization_config"), "{err}");
}

#[test]
fn the_tiled_forward_matches_the_dequantized_weight() {
    // More outputs than one tile, and a ragged last tile.
    let (i, o) = (64, TILE_COLS * 2 + 16);
    for (seed, (q, name)) in formats().into_iter().enumerate() {
        let dir = random_linear(q, (i, o), 10 + seed as u64);
        let qw = load(&open(&dir, q), "l", (i, o), Cut::Columns(&[0..o])).unwrap().unwrap();
        // Decode-sized batches take the in-register path, larger ones the tiles.
        for t in [1, 3, GEMV_MAX_TOKENS, GEMV_MAX_TOKENS + 5] {
            let x = crate::test_util::randn(&[t, i], DType::F32, &Device::Cpu);
            let want = x.matmul(&qw.dequantize().unwrap().t().unwrap()).unwrap();
            let got = qw.matmul(&x).unwrap();
            let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            // The same f32 products, summed over 64 inputs in another order.
            assert!(diff <= scale * 64.0 * f32::EPSILON, "{name} x {t}: {diff} of {scale}");
        }
        let x = crate::test_util::randn(&[3, i], DType::F32, &Device::Cpu);
        let bf = qw.matmul(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(bf.dtype(), DType::BF16, "{name}: output in the input's dtype");
        assert!(qw.resident_bytes() < i * o * 2, "{name}: under half of bf16's bytes");
    }
}

#[test]
fn quantization_configs_parse_or_name_the_field() {
    let parse = |json: &str| {
        QuantConfig::parse(std::path::Path::new("config.json"), Some(&serde_json::from_str(json).unwrap()))
    };
    assert_eq!(
        parse(r#"{"quant_method":"gptq","bits":4,"group_size":128,"desc_act":true,"sym":false}"#).unwrap(),
        Some(QuantConfig::Gptq { bits: 4, group_size: Some(128), desc_act: true, sym: false })
    );
    assert_eq!(
        parse(r#"{"quant_method":"gptq","bits":8,"group_size":-1}"#).unwrap(),
        Some(QuantConfig::Gptq { bits: 8, group_size: None, desc_act: false, sym: true })
    );
    assert_eq!(
        parse(r#"{"quant_method":"awq","bits":4,"group_size":128,"version":"gemm","zero_point":true}"#).unwrap(),
        Some(QuantConfig::Awq { group_size: 128 })
    );
    assert_eq!(
        parse(r#"{"quant_method":"fp8","activation_scheme":"dynamic","weight_block_size":[128,128]}"#).unwrap(),
        Some(QuantConfig::Fp8 { block: [128, 128] })
    );
    for (json, field) in [
        (r#"{"quant_method":"bitsandbytes"}"#, "quantization_config.quant_method"),
        (r#"{"quant_method":"gptq","bits":3,"group_size":128}"#, "quantization_config.bits"),
        (r#"{"quant_method":"gptq","bits":4,"group_size":0}"#, "quantization_config.group_size"),
        (r#"{"quant_method":"gptq","bits":4,"group_size":128,"checkpoint_format":"gptq_v2"}"#, "checkpoint_format"),
        (r#"{"quant_method":"awq","bits":4,"group_size":128,"version":"gemv"}"#, "quantization_config.version"),
        (r#"{"quant_method":"fp8","activation_scheme":"static","weight_block_size":[128,128]}"#, "activation_scheme"),
        (r#"{"quant_method":"fp8"}"#, "quantization_config.weight_block_size"),
    ] {
        let err = parse(json).unwrap_err().to_string();
        assert!(err.contains(field), "{json}: {err}");
    }
}

/// On a GPU (feature `cuda`): the kernels against the host path on the same checkpoints.
/// Skipped without a GPU unless `QWEN_REQUIRE_GPU=1`.
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;

    #[test]
    fn quantized_kernels_match_the_host_path() {
        let g = match crate::device::DeviceSpec::Cuda(0).open() {
            Ok(d) => d,
            Err(e) => {
                assert!(std::env::var("QWEN_REQUIRE_GPU").as_deref() != Ok("1"), "no GPU: {e}");
                return;
            }
        };
        let (i, o) = (64, 48);
        for (seed, (q, name)) in formats().into_iter().enumerate() {
            let dir = random_linear(q, (i, o), 20 + seed as u64);
            let host = load(&open(&dir, q), "l", (i, o), Cut::Columns(&[0..o])).unwrap().unwrap();
            let w = Weights::open(dir.path(), DType::F32, &g).unwrap();
            w.set_quant(Some(q));
            // Both cut kinds, as a tensor-parallel rank loads them.
            let dev = load(&w, "l", (i, o), Cut::Columns(&[0..o])).unwrap().unwrap();
            let dev_rows = load(&w, "l", (i, o), Cut::Rows(&(32..64))).unwrap().unwrap();
            let host_rows = load(&open(&dir, q), "l", (i, o), Cut::Rows(&(32..64))).unwrap().unwrap();
            for dtype in [DType::F32, DType::BF16] {
                // GEMV rows (1..=8) and the dequantize-then-GEMM path (20).
                for t in [1, 3, 8, 20] {
                    let x = crate::test_util::randn(&[t, i], DType::F32, &Device::Cpu).to_dtype(dtype).unwrap();
                    for (h, d, k) in [(&host, &dev, i), (&host_rows, &dev_rows, 32)] {
                        let xs = x.narrow(1, i - k, k).unwrap();
                        let want = h.matmul(&xs).unwrap().to_dtype(DType::F32).unwrap();
                        let got = d.matmul(&xs.to_device(&g).unwrap()).unwrap().to_dtype(DType::F32).unwrap();
                        let got = got.to_device(&Device::Cpu).unwrap();
                        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                        let scale = want.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                        // f32: sums in another order; bf16: one more rounding of the output, and of
                        // the dequantized weight on the GEMM path.
                        let tol = if dtype == DType::F32 { 64.0 * f32::EPSILON } else { 3.0 / 256.0 };
                        assert!(diff <= scale * tol, "{name} {dtype:?} x {t} (k {k}): {diff} of {scale}");
                    }
                }
            }
            assert!(dev.resident_bytes() <= host.resident_bytes() * 2, "{name}: resident on the device");
        }
    }
}
