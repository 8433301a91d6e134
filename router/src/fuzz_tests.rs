//! Property-based fuzzing of everything a client controls, on stable Rust (proptest): OpenAI
//! JSON bodies, gRPC messages as raw bytes, chat messages with hostile content, and the
//! tokenizer and streaming detokenizer. No input may panic; every refusal is a 4xx /
//! INVALID_ARGUMENT-class error; client text never becomes special tokens.
//!
//! CI runs `QWEN_FUZZ_CASES` cases per property (default 2,000); the documented long run is
//! `QWEN_FUZZ_CASES=100000 cargo test -p qwen-router --release fuzz_` (docs/reliability.md).

use std::sync::Arc;

use axum::body::Bytes;
use axum::http::HeaderMap;
use proptest::prelude::*;
use prost::Message as _;
use serde_json::{json, Value};

use crate::error::{ErrorKind, Result};
use crate::generate::Job;
use crate::models::ModelInfo;
use crate::template::{ChatTemplate, Message, Role, CHATML};
use crate::validate::{prepare_choices, Prepared, Prompt};

fn cases() -> u32 {
    std::env::var("QWEN_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000)
}

fn config() -> ProptestConfig {
    // Seeded: every run explores the same cases (a failure reproduces).
    ProptestConfig { cases: cases(), rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed), ..Default::default() }
}

/// The qwen2-gqa fixture's tokenizer with ChatML, a 4,096-token context and a 512-token model.
fn model() -> Arc<ModelInfo> {
    static MODEL: std::sync::OnceLock<Arc<ModelInfo>> = std::sync::OnceLock::new();
    MODEL
        .get_or_init(|| {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen2-gqa");
            let tokenizer = Arc::new(qwen_tokenizer::Tokenizer::from_dir(&dir).unwrap());
            Arc::new(ModelInfo {
                formats: Default::default(),
                name: "m".into(),
                max_context: 4096,
                vocab_size: tokenizer.vocab_size(),
                eos_token_ids: vec![],
                max_token_bytes: tokenizer.max_token_bytes(),
                tokenizer: Some(tokenizer),
                chat_template: Some(ChatTemplate::new(CHATML).unwrap()),
                learned_at: 0,
                digest: String::new(),
            })
        })
        .clone()
}

/// Runs a job's checks as the router does; any refusal must be the client's (4xx class).
fn check_job(job: Job) -> Result<Vec<Prepared>> {
    let result = job.prompt.and_then(|p| prepare_choices(model(), p, job.options, job.n));
    if let Err(e) = &result {
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    }
    result
}

/// Text with what hurts: special tokens, template syntax, control and multi-byte characters.
fn hostile_text() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        Just("<|im_start|>".to_string()),
        Just("<|im_end|>".to_string()),
        Just("<|endoftext|>".to_string()),
        Just("{{ messages }}".to_string()),
        Just("{% for x in y %}".to_string()),
        Just("\u{E000}".to_string()),
        Just("\n".to_string()),
        Just("\0".to_string()),
        Just("\u{301}".to_string()),
        "[a-z ]{0,8}",
        any::<String>(),
    ];
    proptest::collection::vec(pieces, 0..8).prop_map(|v| v.concat())
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u32..600).prop_map(Value::from),
        any::<f64>().prop_filter("JSON numbers are finite", |x| x.is_finite()).prop_map(Value::from),
        hostile_text().prop_map(Value::from),
        Just(json!("m")),
        Just(json!("user")),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{1,10}|role|content|type|text", inner, 0..5)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A body with some of the fields the endpoints read (and some they do not), any values.
fn body() -> impl Strategy<Value = Value> {
    let keys = prop_oneof![
        Just("model"),
        Just("prompt"),
        Just("messages"),
        Just("max_tokens"),
        Just("temperature"),
        Just("top_p"),
        Just("top_k"),
        Just("n"),
        Just("stop"),
        Just("logprobs"),
        Just("top_logprobs"),
        Just("stream"),
        Just("echo"),
        Just("best_of"),
        Just("stop_token_ids"),
        Just("seed"),
        Just("metadata"),
        Just("tools"),
    ];
    proptest::collection::btree_map(keys, json_value(), 0..10).prop_map(|m| {
        let mut v: serde_json::Map<String, Value> = m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        v.entry("model").or_insert(json!("m"));
        Value::Object(v)
    })
}

fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("content-type", "application/json".parse().unwrap());
    h
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn fuzz_http_bodies_get_answers_not_panics(body in body(), chat in any::<bool>()) {
        let bytes = Ok(Bytes::from(serde_json::to_vec(&body).unwrap()));
        let job = if chat {
            crate::http::chat_job(&json_headers(), bytes)
        } else {
            crate::http::completion_job(&json_headers(), bytes)
        };
        match job {
            Ok((job, _)) => {
                let _ = check_job(job);
            }
            Err(e) => prop_assert!(e.status().is_client_error(), "{}", e.status()),
        }
    }

    #[test]
    fn fuzz_raw_json_bytes_get_answers_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = crate::http::completion_job(&json_headers(), Ok(Bytes::from(bytes))) {
            prop_assert!(e.status().is_client_error());
        }
    }

    #[test]
    fn fuzz_grpc_messages_get_answers_not_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(r) = qwen_proto::serve::GenerateRequest::decode(bytes.as_slice()) {
            let _ = check_job(crate::grpc::job(&r.model, crate::grpc::generate_prompt(r.prompt), r.options, None));
        }
        if let Ok(r) = qwen_proto::serve::ChatRequest::decode(bytes.as_slice()) {
            let mut r = r;
            let chat = crate::grpc::chat_job(&mut r);
            let _ = check_job(crate::grpc::job(&r.model, chat.prompt, r.options, chat.forced));
        }
    }

    #[test]
    fn fuzz_hostile_chats_never_make_special_tokens(
        contents in proptest::collection::vec((0usize..4, hostile_text()), 1..5)
    ) {
        let roles = [Role::System, Role::User, Role::Assistant, Role::Tool];
        let messages: Vec<Message> =
            contents.into_iter().map(|(r, content)| Message::new(roles[r], content)).collect();
        let turns = messages.len() + usize::from(messages[0].role != Role::System) + 1;
        let job = Job { model: "m".into(), prompt: Ok(Prompt::Chat(crate::template::Chat { messages, ..Default::default() })), options: Default::default(), n: 1 };
        if let Ok(prepared) = check_job(job) {
            let tokenizer = model().tokenizer.clone().unwrap();
            let im_start = tokenizer.token_to_id("<|im_start|>").unwrap();
            let starts = prepared[0].prompt.iter().filter(|&&t| t == im_start).count();
            prop_assert_eq!(starts, turns, "only the template's own turns are special");
        }
    }

    #[test]
    fn fuzz_tokenizer_and_stream_decoder_agree(text in hostile_text()) {
        let tokenizer = model().tokenizer.clone().unwrap();
        let ids = tokenizer.encode(&text, false).unwrap();
        let whole = tokenizer.decode(&ids).unwrap();
        let mut decoder = tokenizer.stream_decoder();
        let mut streamed = String::new();
        for &id in &ids {
            if let Some(piece) = decoder.step(id).unwrap() {
                streamed.push_str(&piece);
            }
        }
        if let Some(rest) = decoder.finish().unwrap() {
            streamed.push_str(&rest);
        }
        prop_assert_eq!(streamed, whole);
        // Out-of-vocabulary ids are an error, not a panic.
        prop_assert!(tokenizer.decode(&[u32::MAX]).is_err());
    }
}
