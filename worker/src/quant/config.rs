//! `config.json`'s `quantization_config`: which format the checkpoint's quantized linears use.
//! Anything this worker cannot run exactly is refused, naming the field.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A quantized checkpoint's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantConfig {
    /// AutoGPTQ's v1 format: `qweight` int32 `[in / (32 / bits), out]`, `qzeros` storing
    /// zero − 1, f16 `scales` `[groups, out]`, `g_idx` `[in]` (act-order when not monotone).
    Gptq { bits: u32, group_size: Option<usize>, desc_act: bool, sym: bool },
    /// AutoAWQ's GEMM format: 4-bit, `qweight` `[in, out / 8]` in AWQ's nibble order.
    Awq { group_size: usize },
    /// float8_e4m3fn weights with f32 `weight_scale_inv` per `[out, in]` block.
    Fp8 { block: [usize; 2] },
}

impl QuantConfig {
    /// The format's name as users write it (`gptq`, `awq`, `fp8`).
    pub fn method(&self) -> &'static str {
        match self {
            QuantConfig::Gptq { .. } => "gptq",
            QuantConfig::Awq { .. } => "awq",
            QuantConfig::Fp8 { .. } => "fp8",
        }
    }

    /// Reads `quantization_config` of the config at `path` (`None` when absent or null).
    pub fn parse(path: &Path, value: Option<&Value>) -> Result<Option<Self>> {
        let map = match value {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Object(m)) => m,
            Some(v) => return Err(Error::field(path, "quantization_config", format!("expected an object, found {v}"))),
        };
        let q = Fields { path, map };
        let method = q.str("quant_method")?.unwrap_or_default().to_ascii_lowercase();
        match method.as_str() {
            "gptq" => q.gptq(),
            "awq" => q.awq(),
            "fp8" => q.fp8(),
            other => Err(q.err(
                "quant_method",
                format!("{other:?} is not supported; supported: \"gptq\", \"awq\", \"fp8\" (block-wise)"),
            )),
        }
    }
}

struct Fields<'a> {
    path: &'a Path,
    map: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> Error {
        Error::field(self.path, &format!("quantization_config.{field}"), message)
    }

    fn str(&self, field: &str) -> Result<Option<&str>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(field, format!("expected a string, found {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.err(field, format!("expected true or false, found {v}"))),
        }
    }

    fn int(&self, field: &str) -> Result<Option<i64>> {
        match self.map.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| self.err(field, format!("expected an integer, found {v}"))),
        }
    }

    /// `field` as a group size; -1 (one group per column) is `None` where `allow_none`.
    fn group_size(&self, field: &str, allow_none: bool) -> Result<Option<usize>> {
        match self.int(field)? {
            Some(-1) if allow_none => Ok(None),
            Some(g) if (1..=1 << 20).contains(&g) => Ok(Some(g as usize)),
            Some(g) => Err(self.err(field, format!("{g} is not a positive group size"))),
            None => Err(self.err(field, "missing (required)")),
        }
    }

    fn gptq(&self) -> Result<Option<QuantConfig>> {
        let bits = match self.int("bits")? {
            Some(b @ (4 | 8)) => b as u32,
            Some(b) => return Err(self.err("bits", format!("{b}-bit GPTQ is not supported; supported: 4, 8"))),
            None => return Err(self.err("bits", "missing (required)")),
        };
        if let Some(format) = self.str("checkpoint_format")?.filter(|f| !f.eq_ignore_ascii_case("gptq")) {
            return Err(self.err("checkpoint_format", format!("{format:?} is not supported; supported: \"gptq\" (v1)")));
        }
        Ok(Some(QuantConfig::Gptq {
            bits,
            group_size: self.group_size("group_size", true)?,
            desc_act: self.bool_or("desc_act", false)?,
            sym: self.bool_or("sym", true)?,
        }))
    }

    fn awq(&self) -> Result<Option<QuantConfig>> {
        match self.int("bits")?.or(self.int("w_bit")?) {
            Some(4) | None => {}
            Some(b) => return Err(self.err("bits", format!("{b}-bit AWQ is not supported; supported: 4"))),
        }
        if let Some(v) = self.str("version")?.filter(|v| !v.eq_ignore_ascii_case("gemm")) {
            return Err(self.err("version", format!("AWQ {v:?} packing is not supported; supported: \"gemm\"")));
        }
        if !self.bool_or("zero_point", true)? {
            return Err(self.err("zero_point", "AWQ without zero points is not supported"));
        }
        // AutoAWQ's own config spells it q_group_size.
        let field = if self.map.contains_key("q_group_size") { "q_group_size" } else { "group_size" };
        let group_size = self.group_size(field, false)?.ok_or_else(|| self.err(field, "missing (required)"))?;
        Ok(Some(QuantConfig::Awq { group_size }))
    }

    fn fp8(&self) -> Result<Option<QuantConfig>> {
        if let Some(s) = self.str("activation_scheme")?.filter(|s| !s.eq_ignore_ascii_case("dynamic")) {
            return Err(self.err("activation_scheme", format!("{s:?} is not supported; supported: \"dynamic\"")));
        }
        if let Some(f) = self.str("fmt")?.filter(|f| !f.eq_ignore_ascii_case("e4m3")) {
            return Err(self.err("fmt", format!("{f:?} is not supported; supported: \"e4m3\"")));
        }
        let block = match self.map.get("weight_block_size") {
            Some(Value::Array(a)) if a.len() == 2 => {
                let dim = |v: &Value| v.as_u64().filter(|&n| (1..=1 << 16).contains(&n)).map(|n| n as usize);
                match (dim(&a[0]), dim(&a[1])) {
                    (Some(r), Some(c)) => [r, c],
                    _ => return Err(self.err("weight_block_size", "expected two positive integers")),
                }
            }
            None | Some(Value::Null) => {
                return Err(self.err("weight_block_size", "missing: only block-wise FP8 is supported"));
            }
            Some(v) => return Err(self.err("weight_block_size", format!("expected [rows, cols], found {v}"))),
        };
        Ok(Some(QuantConfig::Fp8 { block }))
    }
}
