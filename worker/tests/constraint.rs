//! Structured outputs through the engine on a random-weight model: every constrained
//! generation, sampled at temperature 1 (the model's preferences are noise, so only the mask
//! keeps the text valid), parses and validates against its schema; unconstrained requests in the
//! same batches still get their golden tokens; a completed grammar ends the request.

mod common;
use common::{fixture, ids};

use candle_core::{DType, Device};
use qwen_proto::worker::{constraint::Kind, Constraint};
use qwen_worker::constraint::GrammarCompiler;
use qwen_worker::engine::runner::{spawn, EngineConfig, EngineHandle, NewRequest};
use qwen_worker::engine::scheduler::SchedulerConfig;
use qwen_worker::engine::sequence::{Event, FinishReason};
use qwen_worker::generate::GenerateParams;
use qwen_worker::kernels::KernelMode;
use qwen_worker::model::Model;
use qwen_worker::sampling::SamplingParams;
use qwen_worker::tokenizer::Tokenizer;
use serde_json::Value;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const NAME: &str = "qwen3";

const SCHEMA: &str = r#"{"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "alerts": {"type": "array", "items": {"type": "boolean"}, "maxItems": 4}
  }, "required": ["city", "days", "unit"], "additionalProperties": false}"#;

struct Setup {
    engine: EngineHandle,
    grammars: GrammarCompiler,
    tokenizer: Tokenizer,
    eos: u32,
}

fn setup(kernels: KernelMode) -> Setup {
    let dir = fixture(NAME);
    let mut model = Model::load(&dir, DType::F32, &Device::Cpu).unwrap();
    model.set_kernels(kernels);
    let config: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let eos = config["eos_token_id"].as_u64().unwrap() as u32;
    let tokenizer = Tokenizer::from_dir(&dir).unwrap();
    let grammars = GrammarCompiler::new(&tokenizer, model.config().vocab_size, &[eos]).unwrap();
    let config = EngineConfig {
        scheduler: SchedulerConfig { block_size: 16, max_batch_tokens: 512, max_seqs: 64 },
        num_blocks: 2048,
        model_name: NAME.into(),
        observer: None,
        decode_graphs: false,
    };
    Setup { engine: spawn(model, config).unwrap().0, grammars, tokenizer, eos }
}

fn submit(
    s: &Setup,
    id: String,
    prompt: &[u32],
    n: usize,
    sampling: SamplingParams,
    schema: Option<&str>,
) -> UnboundedReceiver<Event> {
    let (tx, rx) = unbounded_channel();
    let constraint =
        schema.map(|t| Box::new(s.grammars.compile(&Constraint { kind: Some(Kind::JsonSchema(t.into())) }).unwrap()));
    let params = GenerateParams { max_new_tokens: n, sampling, stop_token_ids: vec![s.eos] };
    s.engine.submit(NewRequest { request_id: id, prompt: prompt.to_vec(), params, events: tx, constraint }).unwrap();
    rx
}

fn collect(mut rx: UnboundedReceiver<Event>) -> (Vec<u32>, FinishReason, Option<String>) {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("stream ends with Finished") {
            Event::Token { token, .. } => tokens.push(token),
            Event::Finished { reason, message, .. } => return (tokens, reason, message),
        }
    }
}

fn goldens() -> Vec<(Vec<u32>, Vec<u32>)> {
    let g: Value = serde_json::from_str(&std::fs::read_to_string(fixture(NAME).join("golden.json")).unwrap()).unwrap();
    g["cases"].as_array().unwrap().iter().map(|c| (ids(&c["prompt_ids"]), ids(&c["greedy"]))).collect()
}

/// 1,000 seeded generations in waves of 50 (half on the host sampler with logprobs, half on the
/// device sampler of the fused path), each wave batched with unconstrained greedy golden requests.
#[test]
fn a_thousand_random_weight_generations_all_validate() {
    let validator = jsonschema::validator_for(&serde_json::from_str(SCHEMA).unwrap()).unwrap();
    let cases = goldens();
    for kernels in [KernelMode::Plain, KernelMode::Fused] {
        let s = setup(kernels);
        for wave in 0..10u64 {
            let mut constrained = Vec::new();
            for i in 0..50u64 {
                let seed = wave * 50 + i;
                let sampling = SamplingParams {
                    temperature: 1.0,
                    seed,
                    logprobs: (i % 2 == 0).then_some(0),
                    ..SamplingParams::default()
                };
                constrained.push((seed, submit(&s, format!("c{seed}"), &[1, 2, 3], 120, sampling, Some(SCHEMA))));
            }
            let free: Vec<_> = cases
                .iter()
                .enumerate()
                .map(|(i, (p, want))| {
                    (submit(&s, format!("g{wave}-{i}"), p, want.len(), SamplingParams::greedy(), None), want)
                })
                .collect();
            for (seed, rx) in constrained {
                let (tokens, reason, message) = collect(rx);
                assert_eq!((reason, message), (FinishReason::Stop, None), "seed {seed}");
                let text = s.tokenizer.decode(tokens.strip_suffix(&[s.eos]).unwrap_or(&tokens)).unwrap();
                let value: Value =
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{kernels:?} seed {seed}: {text:?}: {e}"));
                assert!(validator.is_valid(&value), "{kernels:?} seed {seed}: {text}");
            }
            for (i, (rx, want)) in free.into_iter().enumerate() {
                assert_eq!(&collect(rx).0, want, "{kernels:?}: unconstrained request {i} next to constrained ones");
            }
        }
    }
}

/// A grammar that ends (a choice) stops the request at once, even with no stop token at all.
#[test]
fn a_completed_grammar_ends_the_request() {
    let s = setup(KernelMode::Plain);
    let (tx, rx) = unbounded_channel();
    let choice = Constraint {
        kind: Some(Kind::Choice(qwen_proto::worker::Choices { choices: vec!["north".into(), "south".into()] })),
    };
    let params = GenerateParams {
        max_new_tokens: 50,
        sampling: SamplingParams { temperature: 1.0, seed: 1, ..Default::default() },
        stop_token_ids: vec![],
    };
    let constraint = Some(Box::new(s.grammars.compile(&choice).unwrap()));
    s.engine
        .submit(NewRequest { request_id: "dir".into(), prompt: vec![5, 6], params, events: tx, constraint })
        .unwrap();
    let (tokens, reason, _) = collect(rx);
    let text = s.tokenizer.decode(&tokens).unwrap();
    assert!(text == "north" || text == "south", "{text:?}");
    assert_eq!(reason, FinishReason::Stop);
}
