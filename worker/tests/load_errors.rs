//! Bad checkpoints and bad input give errors that name the file, tensor or value and what was
//! expected; nothing panics.

mod common;
use common::fixture;

use std::path::Path;

use candle_core::{DType, Device};
use qwen_worker::generate::{generate, GenerateParams};
use qwen_worker::model::{ContiguousKvCache, Model, SeqChunk};
use qwen_worker::sampling::SamplingParams;
use qwen_worker::{Error, ErrorKind};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// A scratch copy of a fixture that a test may break.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

fn load_err(dir: &Path) -> Error {
    match Model::load(dir, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded but should not have", dir.display()),
        Err(e) => e,
    }
}

/// Rewrites `model.safetensors` through `edit`, which may drop or alter (name, dtype, shape, bytes).
fn rewrite_weights(dir: &Path, edit: impl Fn(&mut Vec<(String, Dtype, Vec<usize>, Vec<u8>)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn missing_config_json() {
    let dir = copy_fixture("qwen2-gqa");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_err(dir.path());
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn corrupt_config_json() {
    let dir = copy_fixture("qwen2-gqa");
    std::fs::write(dir.path().join("config.json"), "{\"architectures\": [\"Qwen2ForCausalLM\",").unwrap();
    let err = load_err(dir.path());
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("config.json: invalid JSON"), "{err}");
}

#[test]
fn unknown_architecture() {
    let dir = copy_fixture("qwen3");
    let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
    std::fs::write(dir.path().join("config.json"), cfg.replace("Qwen3ForCausalLM", "MixtralForCausalLM")).unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(
        msg.contains("\"MixtralForCausalLM\"")
            && msg.contains("supported: QWenLMHeadModel, Qwen2ForCausalLM, Qwen3ForCausalLM"),
        "{msg}"
    );
}

#[test]
fn corrupt_safetensors() {
    let dir = copy_fixture("qwen2-gqa");
    std::fs::write(dir.path().join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}").unwrap();
    let err = load_err(dir.path());
    assert_eq!(err.kind(), ErrorKind::Weights);
    assert!(err.to_string().contains("model.safetensors: not a valid safetensors file"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let dir = copy_fixture("qwen2-gqa");
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_err(dir.path());
    assert_eq!(err.kind(), ErrorKind::Weights);
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn missing_tensor() {
    let dir = copy_fixture("qwen2-gqa");
    rewrite_weights(dir.path(), |t| t.retain(|(n, ..)| n != "model.layers.1.self_attn.k_proj.bias"));
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("tensor `model.layers.1.self_attn.k_proj.bias` not found"), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
}

#[test]
fn wrong_shape() {
    let dir = copy_fixture("qwen2-gqa");
    rewrite_weights(dir.path(), |t| {
        let e = t.iter_mut().find(|(n, ..)| n == "model.layers.0.mlp.up_proj.weight").unwrap();
        e.2 = vec![e.2[1], e.2[0]];
    });
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("tensor `model.layers.0.mlp.up_proj.weight` has shape [64, 96], expected [96, 64]"), "{msg}");
}

#[test]
fn unsupported_tensor_dtype() {
    let dir = copy_fixture("qwen2-gqa");
    rewrite_weights(dir.path(), |t| {
        let e = t.iter_mut().find(|(n, ..)| n == "model.norm.weight").unwrap();
        e.1 = Dtype::I32;
    });
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("`model.norm.weight` has dtype I32"), "{msg}");
}

#[test]
fn no_weights_and_missing_shard() {
    let dir = copy_fixture("qwen2-gqa");
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("expected model.safetensors or model.safetensors.index.json"), "{msg}");

    let dir = copy_fixture("qwen2-tied-bf16-sharded");
    std::fs::remove_file(dir.path().join("model-00002-of-00004.safetensors")).unwrap();
    let err = load_err(dir.path());
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains("model-00002-of-00004.safetensors"), "{err}");
}

#[test]
fn token_id_outside_the_vocabulary() {
    let mut model = Model::load(&fixture("qwen1-ntk-logn"), DType::F32, &Device::Cpu).unwrap();
    let mut cache = ContiguousKvCache::new(model.config().num_layers);
    let seq = SeqChunk { seq_id: 0, context_len: 0, len: 3, rope_alpha: 1.0 };
    let err = model.forward(&[1, 512, 2], &[seq], &mut cache).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("token id 512") && err.to_string().contains("512 ids"), "{err}");

    let params = GenerateParams { max_new_tokens: 4, sampling: SamplingParams::greedy(), stop_token_ids: vec![] };
    let err = generate(&mut model, &[7, 151_643], &params, |_| Ok(())).unwrap_err();
    assert!(err.to_string().contains("token id 151643 in prompt"), "{err}");
}

#[test]
fn bad_generation_parameters_name_the_field() {
    let mut model = Model::load(&fixture("qwen2-gqa"), DType::F32, &Device::Cpu).unwrap();
    let base = GenerateParams { max_new_tokens: 4, sampling: SamplingParams::greedy(), stop_token_ids: vec![] };
    let cases = [
        (vec![], base.clone(), "prompt"),
        (vec![1], GenerateParams { max_new_tokens: 0, ..base.clone() }, "max_new_tokens"),
        (vec![1; 250], GenerateParams { max_new_tokens: 10, ..base.clone() }, "context length 256"),
        (
            vec![1],
            GenerateParams {
                sampling: SamplingParams { temperature: -1.0, ..SamplingParams::default() },
                ..base.clone()
            },
            "temperature",
        ),
        (
            vec![1],
            GenerateParams {
                sampling: SamplingParams { temperature: 1.0, top_p: 1.5, ..SamplingParams::default() },
                ..base.clone()
            },
            "top_p",
        ),
    ];
    for (prompt, params, field) in cases {
        let err = generate(&mut model, &prompt, &params, |_| Ok(())).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
}

/// A rank's slice read from the memory map equals the same slice of the whole tensor.
#[test]
fn ranges_read_the_same_values_as_slicing_the_whole_tensor() {
    let w = qwen_worker::weights::Weights::open(&fixture("qwen2-tied-bf16-sharded"), DType::F32, &Device::Cpu).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let full = w.get(name, &[96, 64]).unwrap();
    let rows = w.get_ranges(name, &[96, 64], 0, &[24..48, 0..8]).unwrap();
    let want = candle_core::Tensor::cat(&[full.narrow(0, 24, 24).unwrap(), full.narrow(0, 0, 8).unwrap()], 0).unwrap();
    assert_eq!(rows.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
    let cols = w.get_ranges(name, &[96, 64], 1, std::slice::from_ref(&(16..32))).unwrap();
    assert_eq!(cols.to_vec2::<f32>().unwrap(), full.narrow(1, 16, 16).unwrap().to_vec2::<f32>().unwrap());
    let err = w.get_ranges(name, &[96, 64], 1, std::slice::from_ref(&(60..70))).unwrap_err();
    assert!(err.to_string().contains("60..70"), "{err}");
}

#[test]
fn bad_moe_checkpoints_name_the_tensor_or_field() {
    // A missing expert tensor.
    let dir = copy_fixture("qwen2-moe");
    rewrite_weights(dir.path(), |t| t.retain(|(n, ..)| n != "model.layers.2.mlp.experts.5.up_proj.weight"));
    let msg = load_err(dir.path()).to_string();
    assert!(msg.contains("model.layers.2.mlp.experts.5.up_proj.weight"), "{msg}");

    // More experts per token than experts, a dense layer past the last, no expert count.
    let edits: [(&str, &str, &str); 3] = [
        ("\"num_experts_per_tok\": 2", "\"num_experts_per_tok\": 7", "num_experts_per_tok"),
        ("\"mlp_only_layers\": [\n    1\n  ]", "\"mlp_only_layers\": [9]", "mlp_only_layers"),
        ("\"num_experts\": 6", "\"num_expertz\": 6", "num_experts"),
    ];
    for (from, to, field) in edits {
        let dir = copy_fixture("qwen2-moe");
        let cfg = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        assert!(cfg.contains(from), "fixture config lacks {from:?}");
        std::fs::write(dir.path().join("config.json"), cfg.replace(from, to)).unwrap();
        let err = load_err(dir.path());
        assert_eq!(err.kind(), ErrorKind::Config, "{err}");
        assert!(err.to_string().contains(&format!("`{field}`")), "{field}: {err}");
    }
}

/// Rewrites `config.json` through `edit`.
fn rewrite_config(dir: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&path, cfg.to_string()).unwrap();
}

#[test]
fn bad_quantized_checkpoints_name_the_field_or_tensor() {
    // A format this worker cannot run exactly.
    let dir = copy_fixture("qwen2-gptq-int4");
    rewrite_config(dir.path(), |c| c["quantization_config"]["bits"] = 3.into());
    let err = load_err(dir.path()).to_string();
    assert!(err.contains("quantization_config.bits") && err.contains("config.json"), "{err}");
    // A packed tensor missing, or in the wrong shape.
    let dir = copy_fixture("qwen2-gptq-int4");
    rewrite_weights(dir.path(), |t| t.retain(|(n, ..)| n != "model.layers.1.mlp.down_proj.qzeros"));
    let err = load_err(dir.path()).to_string();
    assert!(err.contains("model.layers.1.mlp.down_proj.qzeros"), "{err}");
    let dir = copy_fixture("qwen2-awq");
    rewrite_weights(dir.path(), |t| {
        let s = t.iter_mut().find(|(n, ..)| n == "model.layers.0.self_attn.q_proj.scales").unwrap();
        s.2.reverse();
        s.3.truncate(s.2.iter().product::<usize>() * 2);
    });
    let err = load_err(dir.path()).to_string();
    assert!(err.contains("model.layers.0.self_attn.q_proj.scales"), "{err}");
    // Quantized tensors with no quantization_config, or under another format's name.
    let dir = copy_fixture("qwen3-fp8");
    rewrite_config(dir.path(), |c| {
        c.as_object_mut().unwrap().remove("quantization_config");
    });
    let err = load_err(dir.path()).to_string();
    assert!(err.contains("no quantization_config"), "{err}");
    let dir = copy_fixture("qwen3-fp8");
    rewrite_config(dir.path(), |c| {
        c["quantization_config"] = serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 16})
    });
    let err = load_err(dir.path()).to_string();
    assert!(err.contains("not stored as awq"), "{err}");
}
