//! `config.json` and `generation_config.json` of a Hugging Face checkpoint directory, validated
//! once into typed configuration. Both the older spelling (`rope_theta`, `torch_dtype`) and
//! transformers 5's (`rope_parameters: {rope_theta, rope_type}`, `dtype`) are accepted.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The model families qwen-serve runs; `config.json`'s `architectures[0]` picks one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// The original Qwen (1.8B/7B/14B/72B, Qwen-Chat): `QWenLMHeadModel`.
    QWen,
    /// Qwen1.5, Qwen2, Qwen2.5: `Qwen2ForCausalLM`.
    Qwen2,
    /// Qwen3 dense: `Qwen3ForCausalLM`.
    Qwen3,
    /// Qwen1.5-MoE, Qwen2-57B-A14B: `Qwen2MoeForCausalLM` (Qwen2 attention, routed experts plus
    /// a gated shared expert).
    Qwen2Moe,
    /// Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder MoE: `Qwen3MoeForCausalLM` (Qwen3 attention,
    /// routed experts only).
    Qwen3Moe,
}

impl Architecture {
    pub const ALL: [Architecture; 5] =
        [Architecture::QWen, Architecture::Qwen2, Architecture::Qwen3, Architecture::Qwen2Moe, Architecture::Qwen3Moe];

    pub fn hf_name(self) -> &'static str {
        match self {
            Architecture::QWen => "QWenLMHeadModel",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Qwen3 => "Qwen3ForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
            Architecture::Qwen3Moe => "Qwen3MoeForCausalLM",
        }
    }

    /// Qwen3-style attention: q/k RMSNorm, `head_dim` independent of the hidden size.
    pub fn is_qwen3(self) -> bool {
        matches!(self, Architecture::Qwen3 | Architecture::Qwen3Moe)
    }

    fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.hf_name() == name)
    }
}

/// The original Qwen's long-context tricks (Qwen Technical Report): dynamic NTK-aware rotary
/// scaling and LogN attention scaling, both keyed to the training length `seq_length`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LongContext {
    pub seq_length: usize,
    pub dynamic_ntk: bool,
    pub logn_attn: bool,
}

impl LongContext {
    /// The NTK alpha a sequence keeps for its whole life, chosen from its prompt length:
    /// `max(2^ceil(log2(L / seq_length) + 1) - 1, 1)`.
    pub fn ntk_alpha(&self, prompt_len: usize) -> f64 {
        if !self.dynamic_ntk || prompt_len == 0 {
            return 1.0;
        }
        let context_value = (prompt_len as f64 / self.seq_length as f64).log2() + 1.0;
        (2f64.powf(context_value.ceil()) - 1.0).max(1.0)
    }

    /// LogN factor for a query at 0-based position `pos`.
    pub fn logn_scale(&self, pos: usize) -> f64 {
        if self.logn_attn && pos + 1 > self.seq_length {
            ((pos + 1) as f64).ln() / (self.seq_length as f64).ln()
        } else {
            1.0
        }
    }
}

/// The mixture-of-experts MLP of `Qwen2MoeForCausalLM` / `Qwen3MoeForCausalLM`.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts each token is routed to (`num_experts_per_tok`).
    pub top_k: usize,
    /// Each routed expert's hidden width (`moe_intermediate_size`).
    pub expert_hidden: usize,
    /// Renormalise the top-k routing weights to sum to 1 (`norm_topk_prob`).
    pub norm_topk_prob: bool,
    /// The shared expert's width (`shared_expert_intermediate_size`, Qwen2-MoE); `None`: none.
    pub shared_expert_hidden: Option<usize>,
    /// Every `decoder_sparse_step`-th layer is sparse ...
    pub sparse_step: usize,
    /// ... except these (`mlp_only_layers`), which keep a dense MLP of `intermediate_size`.
    pub dense_layers: Vec<usize>,
}

impl MoeConfig {
    /// Whether layer `i` routes to experts (transformers' rule).
    pub fn is_sparse(&self, layer: usize) -> bool {
        !self.dense_layers.contains(&layer) && (layer + 1) % self.sparse_step == 0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Width of the gated MLP's hidden layer (for the original Qwen: `intermediate_size / 2`).
    pub mlp_hidden: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Leading dims of each head that rotary embeds (`head_dim` except for partial rotary).
    pub rotary_dim: usize,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub qkv_bias: bool,
    pub qk_norm: bool,
    /// The dtype the checkpoint declares (`torch_dtype` / `dtype`), if any.
    pub declared_dtype: Option<DType>,
    pub long_context: Option<LongContext>,
    /// The experts of a mixture-of-experts model.
    pub moe: Option<MoeConfig>,
    /// `quantization_config`: the format of the quantized linears, if any.
    pub quant: Option<crate::quant::QuantConfig>,
}

/// A JSON object plus the file it came from, so every error names file and field.
struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::field(self.path, field, message)
    }

    fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {v}"))),
        }
    }

    fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| self.err(field, "missing (required)"))
    }

    fn positive(&self, field: &str) -> Result<usize> {
        match self.usize(field)? {
            0 => Err(self.err(field, "must be greater than 0")),
            n => Ok(n),
        }
    }

    fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(field)?.unwrap_or(default))
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    fn opt_str(&self, field: &str) -> Result<Option<&'a str>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(field, format!("expected a string, found {v}"))),
        }
    }

    fn object(&self, field: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.err(field, format!("expected an object, found {v}"))),
        }
    }
}

fn read_json(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_object(path, &text)
}

/// `text` as a JSON object; `path` names it in errors.
fn parse_object(path: &Path, text: &str) -> Result<Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => {
            Err(Error::field(path, "(top level)", format!("expected a JSON object, found {}", type_name(&other))))
        }
        Err(source) => Err(Error::Json { path: path.to_path_buf(), source }),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub fn parse_dtype(path: &Path, field: &str, name: &str) -> Result<DType> {
    match name {
        "float32" | "f32" => Ok(DType::F32),
        "float16" | "f16" | "half" => Ok(DType::F16),
        "bfloat16" | "bf16" => Ok(DType::BF16),
        other => Err(Error::field(
            path,
            field,
            format!("unsupported dtype {other:?}; supported: float32, float16, bfloat16"),
        )),
    }
}

impl ModelConfig {
    /// Reads and validates `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let map = read_json(&path)?;
        Self::from_map(&path, &map)
    }

    /// Parses a `config.json` given as text; `origin` names it in errors.
    pub fn from_json_str(origin: &str, json: &str) -> Result<Self> {
        let path = Path::new(origin);
        Self::from_map(path, &parse_object(path, json)?)
    }

    fn from_map(path: &Path, map: &Map<String, Value>) -> Result<Self> {
        let f = Fields { path, map };
        let architecture = architecture(&f)?;
        let declared_dtype = match f.opt_str("dtype")?.or(f.opt_str("torch_dtype")?) {
            Some(name) => Some(parse_dtype(path, "torch_dtype", name)?),
            None => None,
        };
        let cfg = match architecture {
            Architecture::QWen => qwen_config(&f, declared_dtype)?,
            Architecture::Qwen2 | Architecture::Qwen3 => qwen2_config(&f, architecture, declared_dtype)?,
            Architecture::Qwen2Moe | Architecture::Qwen3Moe => ModelConfig {
                moe: Some(moe_config(&f, architecture)?),
                ..qwen2_config(&f, architecture, declared_dtype)?
            },
        };
        let cfg = ModelConfig { quant: crate::quant::QuantConfig::parse(path, map.get("quantization_config"))?, ..cfg };
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if self.num_heads % self.num_kv_heads != 0 {
            return Err(Error::field(
                path,
                "num_key_value_heads",
                format!("{} does not divide num_attention_heads = {}", self.num_kv_heads, self.num_heads),
            ));
        }
        if self.rotary_dim == 0 || self.rotary_dim % 2 != 0 || self.rotary_dim > self.head_dim {
            return Err(Error::field(
                path,
                "rotary_pct",
                format!("rotary dims {} must be even and within head_dim {}", self.rotary_dim, self.head_dim),
            ));
        }
        // Bounds far above any real checkpoint keep every size product in range.
        const MAX_DIM: usize = 1 << 20;
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.mlp_hidden),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v > MAX_DIM {
                return Err(Error::field(path, field, format!("{v} is larger than the supported {MAX_DIM}")));
            }
        }
        if let Some(moe) = &self.moe {
            for (field, v) in [
                ("num_experts", moe.num_experts),
                ("moe_intermediate_size", moe.expert_hidden),
                ("shared_expert_intermediate_size", moe.shared_expert_hidden.unwrap_or(0)),
            ] {
                if v > MAX_DIM {
                    return Err(Error::field(path, field, format!("{v} is larger than the supported {MAX_DIM}")));
                }
            }
            if let Some(&l) = moe.dense_layers.iter().find(|&&l| l >= self.num_layers) {
                let message = format!("layer {l} is past num_hidden_layers = {}", self.num_layers);
                return Err(Error::field(path, "mlp_only_layers", message));
            }
        }
        if self.num_heads * self.head_dim > MAX_DIM {
            return Err(Error::field(path, "num_attention_heads", "num_attention_heads * head_dim is too large"));
        }
        if let Some(lc) = self.long_context.filter(|lc| lc.logn_attn && lc.seq_length < 2) {
            return Err(Error::field(
                path,
                "seq_length",
                format!("{} must be at least 2 with use_logn_attn", lc.seq_length),
            ));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(self.rms_norm_eps) || !positive(self.rope_theta) {
            return Err(Error::field(path, "rms_norm_eps/rope_theta", "must be positive"));
        }
        Ok(())
    }

    /// Longest sequence (prompt + generated) the model accepts: `max_position_embeddings`, or for
    /// the original Qwen with dynamic NTK the 32768 tokens its LogN table covers.
    pub fn max_context(&self) -> usize {
        match self.long_context {
            Some(lc) if lc.dynamic_ntk => self.max_position_embeddings.max(32_768),
            _ => self.max_position_embeddings,
        }
    }

    /// Per-sequence NTK alpha for a prompt of `prompt_len` tokens (1 for models without it).
    pub fn ntk_alpha(&self, prompt_len: usize) -> f64 {
        self.long_context.map_or(1.0, |lc| lc.ntk_alpha(prompt_len))
    }
}

fn architecture(f: &Fields) -> Result<Architecture> {
    let supported = Architecture::ALL.map(|a| a.hf_name()).join(", ");
    let name = match f.map.get("architectures") {
        Some(Value::Array(list)) => match list.first() {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(f.err("architectures", "expected a non-empty list of strings")),
        },
        Some(v) => return Err(f.err("architectures", format!("expected a list, found {v}"))),
        None => match f.opt_str("model_type")? {
            Some("qwen") => return Ok(Architecture::QWen),
            Some("qwen2") => return Ok(Architecture::Qwen2),
            Some("qwen3") => return Ok(Architecture::Qwen3),
            Some("qwen2_moe") => return Ok(Architecture::Qwen2Moe),
            Some("qwen3_moe") => return Ok(Architecture::Qwen3Moe),
            Some(other) => other.to_string(),
            None => return Err(f.err("architectures", format!("missing; expected one of {supported}"))),
        },
    };
    Architecture::from_hf_name(&name).ok_or_else(|| Error::UnknownArchitecture {
        path: f.path.to_path_buf(),
        found: name,
        supported,
    })
}

/// Rotary base from `rope_theta` or `rope_parameters.rope_theta`; scaled rotary variants are
/// refused rather than silently run as plain rotary.
fn rope_theta(f: &Fields) -> Result<f64> {
    let mut theta = f.opt_f64("rope_theta")?;
    for field in ["rope_parameters", "rope_scaling"] {
        let Some(params) = f.object(field)? else {
            continue;
        };
        let sub = Fields { path: f.path, map: params };
        if let Some(t) = sub.opt_f64("rope_theta")? {
            theta = Some(t);
        }
        let kind = sub.opt_str("rope_type")?.or(sub.opt_str("type")?).unwrap_or("default");
        if kind != "default" {
            return Err(f.err(
                &format!("{field}.rope_type"),
                format!("{kind:?} rotary scaling is not supported; supported: default"),
            ));
        }
    }
    Ok(theta.unwrap_or(10_000.0))
}

fn qwen2_config(f: &Fields, architecture: Architecture, declared_dtype: Option<DType>) -> Result<ModelConfig> {
    let hidden_size = f.positive("hidden_size")?;
    let num_heads = f.positive("num_attention_heads")?;
    let qwen3 = architecture.is_qwen3();
    // transformers reads `head_dim` when the config has it; Qwen3's own default is 128 (Qwen3-MoE
    // has none: hidden_size / heads).
    let head_dim = match f.opt_usize("head_dim")? {
        Some(d) => d,
        None if architecture == Architecture::Qwen3 => 128,
        None if hidden_size % num_heads != 0 => {
            return Err(f.err("num_attention_heads", format!("{num_heads} does not divide hidden_size = {hidden_size}")))
        }
        None => hidden_size / num_heads,
    };
    if head_dim == 0 {
        return Err(f.err("head_dim", "must be greater than 0"));
    }
    if f.bool_or("use_sliding_window", false)? {
        return Err(f.err("use_sliding_window", "sliding-window attention is not supported; set it to false"));
    }
    let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
    if num_kv_heads == 0 {
        return Err(f.err("num_key_value_heads", "must be greater than 0"));
    }
    Ok(ModelConfig {
        architecture,
        vocab_size: f.positive("vocab_size")?,
        hidden_size,
        num_layers: f.positive("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        mlp_hidden: f.positive("intermediate_size")?,
        rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)?,
        rope_theta: rope_theta(f)?,
        rotary_dim: head_dim,
        max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(32_768),
        tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
        qkv_bias: match architecture {
            _ if qwen3 => f.bool_or("attention_bias", false)?,
            Architecture::Qwen2Moe => f.bool_or("qkv_bias", true)?,
            _ => true,
        },
        qk_norm: qwen3,
        declared_dtype,
        long_context: None,
        moe: None,
        quant: None,
    })
}

fn moe_config(f: &Fields, architecture: Architecture) -> Result<MoeConfig> {
    // Published checkpoints say `num_experts`; transformers 5 writes `num_local_experts`.
    let num_experts = match f.opt_usize("num_experts")? {
        Some(_) => f.positive("num_experts")?,
        None if f.map.contains_key("num_local_experts") => f.positive("num_local_experts")?,
        None => f.positive("num_experts")?,
    };
    let top_k = f.positive("num_experts_per_tok")?;
    if top_k > num_experts {
        return Err(f.err("num_experts_per_tok", format!("{top_k} is more than num_experts = {num_experts}")));
    }
    // Qwen2-MoE's shared expert; 0 (or absent, Qwen3-MoE) means none.
    let shared_expert_hidden = match architecture {
        Architecture::Qwen2Moe => f.opt_usize("shared_expert_intermediate_size")?.filter(|&n| n > 0),
        _ => None,
    };
    let dense_layers = match f.map.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_u64().map(|n| n as usize))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| f.err("mlp_only_layers", "expected a list of layer indices"))?,
        Some(v) => return Err(f.err("mlp_only_layers", format!("expected a list, found {v}"))),
    };
    Ok(MoeConfig {
        num_experts,
        top_k,
        expert_hidden: f.positive("moe_intermediate_size")?,
        norm_topk_prob: f.bool_or("norm_topk_prob", false)?,
        shared_expert_hidden,
        sparse_step: match f.opt_usize("decoder_sparse_step")? {
            None => 1,
            Some(0) => return Err(f.err("decoder_sparse_step", "must be greater than 0")),
            Some(n) => n,
        },
        dense_layers,
    })
}

fn qwen_config(f: &Fields, declared_dtype: Option<DType>) -> Result<ModelConfig> {
    if !f.bool_or("no_bias", true)? {
        return Err(f.err("no_bias", "false is not supported: QWen checkpoints have biases only on attn.c_attn"));
    }
    let intermediate = f.positive("intermediate_size")?;
    if intermediate % 2 != 0 {
        return Err(
            f.err("intermediate_size", format!("{intermediate} must be even (the MLP is intermediate_size / 2 wide)"))
        );
    }
    let num_heads = f.positive("num_attention_heads")?;
    let head_dim = f.positive("kv_channels")?;
    let rotary_pct = f.f64_or("rotary_pct", 1.0)?;
    if !(rotary_pct > 0.0 && rotary_pct <= 1.0) {
        return Err(f.err("rotary_pct", format!("{rotary_pct} must be in (0, 1]")));
    }
    let seq_length = f.positive("seq_length")?;
    // Old Qwen checkpoints spell the dtype as bf16/fp16/fp32 flags.
    let declared_dtype = declared_dtype.or(if f.bool_or("bf16", false)? {
        Some(DType::BF16)
    } else if f.bool_or("fp16", false)? {
        Some(DType::F16)
    } else if f.bool_or("fp32", false)? {
        Some(DType::F32)
    } else {
        None
    });
    Ok(ModelConfig {
        architecture: Architecture::QWen,
        vocab_size: f.positive("vocab_size")?,
        hidden_size: f.positive("hidden_size")?,
        num_layers: f.positive("num_hidden_layers")?,
        num_heads,
        num_kv_heads: num_heads,
        head_dim,
        mlp_hidden: intermediate / 2,
        rms_norm_eps: f.f64_or("layer_norm_epsilon", 1e-6)?,
        rope_theta: f.f64_or("rotary_emb_base", 10_000.0)?,
        rotary_dim: (head_dim as f64 * rotary_pct) as usize,
        max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(seq_length),
        tie_word_embeddings: false,
        qkv_bias: true,
        qk_norm: false,
        declared_dtype,
        moe: None,
        quant: None,
        long_context: Some(LongContext {
            seq_length,
            // QWenConfig turns both on unless the checkpoint says otherwise.
            dynamic_ntk: f.bool_or("use_dynamic_ntk", true)?,
            logn_attn: f.bool_or("use_logn_attn", true)?,
        }),
    })
}

/// Generation defaults from `generation_config.json`; every field optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
}

impl GenerationConfig {
    /// Reads `DIR/generation_config.json` when present; falls back to `config.json`'s eos id.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path: PathBuf = dir.join("generation_config.json");
        let mut cfg = if path.exists() { Self::from_map(&path, &read_json(&path)?)? } else { Self::default() };
        if cfg.eos_token_ids.is_empty() {
            let config_path = dir.join("config.json");
            let map = read_json(&config_path)?;
            cfg.eos_token_ids = token_ids(&Fields { path: &config_path, map: &map }, "eos_token_id")?;
        }
        Ok(cfg)
    }

    /// Parses a `config.json` given as text; `origin` names it in errors.
    pub fn from_json_str(origin: &str, json: &str) -> Result<Self> {
        let path = Path::new(origin);
        Self::from_map(path, &parse_object(path, json)?)
    }

    fn from_map(path: &Path, map: &Map<String, Value>) -> Result<Self> {
        let f = Fields { path, map };
        let single = |field: &str| -> Result<Option<u32>> { Ok(token_ids(&f, field)?.first().copied()) };
        Ok(GenerationConfig {
            eos_token_ids: token_ids(&f, "eos_token_id")?,
            bos_token_id: single("bos_token_id")?,
            pad_token_id: single("pad_token_id")?,
            do_sample: match f.map.get("do_sample") {
                None | Some(Value::Null) => None,
                Some(_) => Some(f.bool_or("do_sample", false)?),
            },
            temperature: f.opt_f64("temperature")?,
            top_p: f.opt_f64("top_p")?,
            top_k: f.opt_usize("top_k")?,
            repetition_penalty: f.opt_f64("repetition_penalty")?,
            max_new_tokens: f.opt_usize("max_new_tokens")?,
        })
    }
}

/// A token-id field that may be a single integer or a list of them.
fn token_ids(f: &Fields, field: &str) -> Result<Vec<u32>> {
    let as_id = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| f.err(field, format!("expected a token id, found {v}")))
    };
    match f.map.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(list)) => list.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ModelConfig> {
        let map: Map<String, Value> = serde_json::from_str(json).unwrap();
        ModelConfig::from_map(Path::new("config.json"), &map)
    }

    const QWEN2: &str = r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":100,"hidden_size":64,
        "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"intermediate_size":96"#;

    #[test]
    fn both_rope_theta_spellings() {
        let old = parse(&format!("{QWEN2},\"rope_theta\":5.0,\"torch_dtype\":\"bfloat16\"}}")).unwrap();
        let new = parse(&format!(
            "{QWEN2},\"rope_parameters\":{{\"rope_theta\":5.0,\"rope_type\":\"default\"}},\"dtype\":\"bfloat16\"}}"
        ))
        .unwrap();
        assert_eq!(old, new);
        assert_eq!(old.rope_theta, 5.0);
        assert_eq!(old.declared_dtype, Some(DType::BF16));
        assert_eq!(old.head_dim, 16);
    }

    #[test]
    fn scaled_rope_is_refused_by_name() {
        let err = parse(&format!("{QWEN2},\"rope_scaling\":{{\"type\":\"yarn\",\"factor\":4.0}}}}")).unwrap_err();
        assert!(err.to_string().contains("rope_scaling.rope_type"), "{err}");
        assert!(err.to_string().contains("yarn"), "{err}");
    }

    #[test]
    fn errors_name_the_field() {
        let err = parse(r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":100}"#).unwrap_err();
        assert!(err.to_string().contains("`hidden_size`: missing"), "{err}");
        let err = parse(&format!("{QWEN2},\"rms_norm_eps\":\"small\"}}")).unwrap_err();
        assert!(err.to_string().contains("`rms_norm_eps`: expected a number"), "{err}");
        let err = parse(&QWEN2.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3").replace("96", "96}"))
            .unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }

    #[test]
    fn unknown_architecture_lists_supported() {
        let err = parse(r#"{"architectures":["LlamaForCausalLM"]}"#).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"LlamaForCausalLM\"") && msg.contains("Qwen2ForCausalLM"), "{msg}");
        assert_eq!(err.kind(), crate::error::ErrorKind::Config);
    }

    #[test]
    fn qwen_ntk_alpha_and_logn() {
        let lc = LongContext { seq_length: 16, dynamic_ntk: true, logn_attn: true };
        assert_eq!(lc.ntk_alpha(5), 1.0);
        assert_eq!(lc.ntk_alpha(16), 1.0);
        assert_eq!(lc.ntk_alpha(19), 3.0);
        assert_eq!(lc.ntk_alpha(40), 7.0);
        assert_eq!(lc.logn_scale(15), 1.0);
        assert!((lc.logn_scale(31) - 32f64.ln() / 16f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn head_dim_defaults_follow_transformers() {
        let qwen3 = parse(&QWEN2.replace("Qwen2ForCausalLM", "Qwen3ForCausalLM").replace("96", "96}")).unwrap();
        assert_eq!(qwen3.head_dim, 128);
        assert!(qwen3.qk_norm && !qwen3.qkv_bias);
        let qwen2 = parse(&format!("{QWEN2},\"head_dim\":32}}")).unwrap();
        assert_eq!(qwen2.head_dim, 32);
    }

    #[test]
    fn unsupported_or_absurd_values_are_refused_by_field() {
        let err = parse(&format!("{QWEN2},\"use_sliding_window\":true}}")).unwrap_err();
        assert!(err.to_string().contains("`use_sliding_window`"), "{err}");
        let err = parse(&QWEN2.replace("\"vocab_size\":100", "\"vocab_size\":100000000000").replace("96", "96}"))
            .unwrap_err();
        assert!(err.to_string().contains("`vocab_size`"), "{err}");
        let err = parse(&QWEN2.replace("\"num_attention_heads\":4", "\"num_attention_heads\":0").replace("96", "96}"))
            .unwrap_err();
        assert!(err.to_string().contains("`num_attention_heads`: must be greater than 0"), "{err}");
    }

    const QWEN: &str = r#"{"architectures":["QWenLMHeadModel"],"vocab_size":100,"hidden_size":64,
        "num_hidden_layers":2,"num_attention_heads":4,"kv_channels":16,"intermediate_size":256"#;

    #[test]
    fn qwen_defaults_and_checks() {
        let cfg = parse(&format!("{QWEN},\"seq_length\":2048}}")).unwrap();
        let lc = cfg.long_context.unwrap();
        assert!(lc.dynamic_ntk && lc.logn_attn, "QWenConfig defaults both on");
        assert_eq!((cfg.mlp_hidden, cfg.rotary_dim, cfg.num_kv_heads), (128, 16, 4));
        assert_eq!(cfg.max_context(), 32_768);
        let err = parse(&format!("{QWEN},\"seq_length\":1}}")).unwrap_err();
        assert!(err.to_string().contains("`seq_length`"), "{err}");
        let err = parse(&format!("{QWEN},\"seq_length\":8,\"rotary_pct\":1.5}}")).unwrap_err();
        assert!(err.to_string().contains("`rotary_pct`"), "{err}");
        let err = parse(&format!("{QWEN},\"seq_length\":8,\"no_bias\":false}}")).unwrap_err();
        assert!(err.to_string().contains("`no_bias`"), "{err}");
    }
}
