//! The one place a wire request becomes engine parameters: defaults from
//! `generation_config.json` for unset sampling fields, and every range check, each naming the
//! field. Shape checks against the model (empty prompt, token ids, context) follow in
//! `GenerateParams::validate`.

use qwen_proto::limits::{valid_request_id, MAX_REQUEST_ID_LEN, MAX_STOP_TOKEN_IDS};
use qwen_proto::worker::GenerateRequest;

use crate::config::GenerationConfig;
use crate::error::{Error, Result};
use crate::generate::GenerateParams;
use crate::sampling::SamplingParams;

fn invalid(field: &'static str, message: impl Into<String>) -> Error {
    Error::InvalidInput { field, message: message.into() }
}

/// A client-given request id must be short and plain (it is logged and echoed).
pub fn check_request_id(id: &str) -> Result<()> {
    if valid_request_id(id) {
        return Ok(());
    }
    Err(invalid(
        "request_id",
        format!("must be 1 to {MAX_REQUEST_ID_LEN} characters of ASCII letters, digits and -_.:"),
    ))
}

pub fn to_generate_params(req: &GenerateRequest, defaults: &GenerationConfig) -> Result<GenerateParams> {
    let s = req.sampling.unwrap_or_default();
    // Like vLLM: a checkpoint that samples by default (do_sample) lends its temperature etc. to
    // requests that do not say; otherwise unset means greedy.
    let sample_by_default = defaults.do_sample.unwrap_or(false);
    let pick = |v: Option<f32>, default: Option<f64>, neutral: f64| {
        v.map(f64::from).or(if sample_by_default { default } else { None }).unwrap_or(neutral)
    };
    let top_k = match s.top_k {
        Some(k) if k < 0 => return Err(invalid("top_k", format!("{k} must be >= 0 (0 is off)"))),
        Some(k) => k as usize,
        None if sample_by_default => defaults.top_k.unwrap_or(0),
        None => 0,
    };
    let top_logprobs = req.top_logprobs as usize;
    if top_logprobs > 0 && !req.logprobs {
        return Err(invalid("top_logprobs", "needs logprobs = true"));
    }
    let sampling = SamplingParams {
        temperature: pick(s.temperature, defaults.temperature, 0.0),
        top_k,
        top_p: pick(s.top_p, defaults.top_p, 1.0),
        min_p: s.min_p.map_or(0.0, f64::from),
        repetition_penalty: pick(s.repetition_penalty, defaults.repetition_penalty, 1.0),
        presence_penalty: s.presence_penalty.map_or(0.0, f64::from),
        frequency_penalty: s.frequency_penalty.map_or(0.0, f64::from),
        seed: s.seed.unwrap_or_else(rand::random),
        logprobs: req.logprobs.then_some(top_logprobs),
    };
    sampling.validate()?;
    if !req.request_id.is_empty() {
        check_request_id(&req.request_id)?;
    }
    if req.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(invalid("stop_token_ids", format!("at most {MAX_STOP_TOKEN_IDS} ids")));
    }
    let mut stop_token_ids = req.stop_token_ids.clone();
    if !req.ignore_eos {
        stop_token_ids.extend(&defaults.eos_token_ids);
    }
    Ok(GenerateParams { max_new_tokens: req.max_new_tokens as usize, sampling, stop_token_ids })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qwen_proto::worker::SamplingParams as PbSampling;

    #[test]
    fn request_ids_and_stop_ids_are_bounded() {
        let ok = GenerateRequest { request_id: "cmpl-1f.2:a_b".into(), ..Default::default() };
        assert!(to_generate_params(&ok, &GenerationConfig::default()).is_ok());
        for id in ["a\nforged log line", &"x".repeat(MAX_REQUEST_ID_LEN + 1), "sp ace"] {
            let req = GenerateRequest { request_id: id.into(), ..Default::default() };
            let err = to_generate_params(&req, &GenerationConfig::default()).unwrap_err();
            assert!(err.to_string().contains("request_id"), "{err}");
        }
        let many = GenerateRequest { stop_token_ids: vec![1; MAX_STOP_TOKEN_IDS + 1], ..Default::default() };
        let err = to_generate_params(&many, &GenerationConfig::default()).unwrap_err();
        assert!(err.to_string().contains("stop_token_ids"), "{err}");
    }

    fn sampling_defaults() -> GenerationConfig {
        GenerationConfig {
            eos_token_ids: vec![9],
            do_sample: Some(true),
            temperature: Some(0.7),
            top_p: Some(0.8),
            top_k: Some(20),
            repetition_penalty: Some(1.05),
            ..GenerationConfig::default()
        }
    }

    #[test]
    fn unset_fields_take_generation_config_defaults() {
        let req = GenerateRequest { max_new_tokens: 4, ..Default::default() };
        let p = to_generate_params(&req, &sampling_defaults()).unwrap();
        assert_eq!((p.sampling.temperature, p.sampling.top_k, p.sampling.top_p), (0.7, 20, 0.8));
        assert_eq!(p.stop_token_ids, vec![9]);
        let greedy = GenerateRequest {
            sampling: Some(PbSampling { temperature: Some(0.0), ..Default::default() }),
            ..req.clone()
        };
        assert!(to_generate_params(&greedy, &sampling_defaults()).unwrap().sampling.is_greedy());
        let p = to_generate_params(&req, &GenerationConfig::default()).unwrap();
        assert!(p.sampling.is_greedy() && p.stop_token_ids.is_empty());
        let ignore = GenerateRequest { ignore_eos: true, stop_token_ids: vec![3], ..req };
        assert_eq!(to_generate_params(&ignore, &sampling_defaults()).unwrap().stop_token_ids, vec![3]);
    }

    #[test]
    fn out_of_range_fields_are_named() {
        let with = |s: PbSampling| GenerateRequest { sampling: Some(s), max_new_tokens: 1, ..Default::default() };
        let cases = [
            (with(PbSampling { top_k: Some(-1), ..Default::default() }), "top_k"),
            (with(PbSampling { temperature: Some(-0.5), ..Default::default() }), "temperature"),
            (with(PbSampling { top_p: Some(1.5), ..Default::default() }), "top_p"),
            (with(PbSampling { top_p: Some(0.0), ..Default::default() }), "top_p"),
            (GenerateRequest { top_logprobs: 3, ..Default::default() }, "top_logprobs"),
        ];
        for (req, field) in cases {
            let err = to_generate_params(&req, &GenerationConfig::default()).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }
}
