use candle_core::Device;
use qwen_proto::worker::Choices;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;

/// The qwen3 fixture's byte-level BPE tokenizer with its model's vocabulary and eos.
fn compiler() -> (GrammarCompiler, Tokenizer) {
    let (g, tok, _) = compiler_eos();
    (g, tok)
}

fn compiler_eos() -> (GrammarCompiler, Tokenizer, u32) {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen3");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    let eos = config["eos_token_id"].as_u64().unwrap() as u32;
    (GrammarCompiler::new(&tok, vocab, &[eos]).unwrap(), tok, eos)
}

fn schema(text: &str) -> Constraint {
    Constraint { kind: Some(Kind::JsonSchema(text.into())) }
}

/// Walks the grammar choosing uniformly among allowed tokens (a worst case for a model: any
/// allowed token at all); returns the text once the grammar is complete.
fn walk(c: &mut TokenConstraint, tok: &Tokenizer, rng: &mut ChaCha8Rng, limit: usize) -> String {
    let mut ids = Vec::new();
    for _ in 0..limit {
        let allowed = c.allowed().unwrap().to_list();
        let t = allowed[rng.random_range(0..allowed.len())];
        let done = c.consume(t).unwrap();
        // The grammar ends on its last token or on the eos it then allows; eos is not text.
        if tok.decode(&[t]).unwrap() != "<|endoftext|>" {
            ids.push(t);
        }
        if done {
            return tok.decode(&ids).unwrap();
        }
    }
    panic!("grammar not complete after {limit} tokens: {:?}", tok.decode(&ids));
}

const PERSON: &str = r#"{"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"enum": ["a", "b\"c", "ü"]}, "maxItems": 3},
    "ok": {"type": "boolean"}
  }, "required": ["name", "age", "ok"], "additionalProperties": false}"#;

#[test]
fn random_walks_under_a_json_schema_always_validate() {
    let (g, tok) = compiler();
    let validator = jsonschema::validator_for(&serde_json::from_str(PERSON).unwrap()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for i in 0..200 {
        let mut c = g.compile(&schema(PERSON)).unwrap();
        let text = walk(&mut c, &tok, &mut rng, 400);
        let value: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("walk {i}: {text:?}: {e}"));
        assert!(validator.is_valid(&value), "walk {i}: {text}");
    }
}

#[test]
fn choice_regex_and_json_object_constrain_the_text() {
    let (g, tok) = compiler();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let choices = vec!["yes".to_string(), "no".to_string(), "maybe not".to_string()];
    let choice = Constraint { kind: Some(Kind::Choice(Choices { choices: choices.clone() })) };
    let regex = Constraint { kind: Some(Kind::Regex(r"[0-9]{3}-[a-z]{2}".into())) };
    for _ in 0..20 {
        let text = walk(&mut g.compile(&choice).unwrap(), &tok, &mut rng, 50);
        assert!(choices.contains(&text), "{text}");
        let text = walk(&mut g.compile(&regex).unwrap(), &tok, &mut rng, 50);
        assert!(text.len() == 6 && text.as_bytes()[3] == b'-', "{text}");
    }
    let object = Constraint { kind: Some(Kind::JsonObject(true)) };
    let mut c = g.compile(&object).unwrap();
    let first = c.allowed().unwrap();
    assert_eq!(tok.decode(&first.to_list()).unwrap(), "{", "a JSON object starts with a brace, compact");
}

#[test]
fn bad_grammars_are_refused_naming_the_constraint() {
    let (g, _) = compiler();
    let big = format!("\"{}\"", "a".repeat(MAX_CONSTRAINT_BYTES));
    let cases = [
        (schema("{not json"), "not JSON"),
        (schema("[1, 2]"), "JSON object"),
        (schema(r#"{"type": "string", "minLength": 5, "maxLength": 2}"#), ""),
        (Constraint { kind: Some(Kind::Regex("(".into())) }, ""),
        (Constraint { kind: Some(Kind::Lark("start: missing_rule".into())) }, ""),
        (Constraint { kind: Some(Kind::Choice(Choices { choices: vec![] })) }, "choice"),
        (Constraint { kind: Some(Kind::Regex(big)) }, "bytes of grammar"),
        (Constraint { kind: None }, "no grammar"),
    ];
    for (c, needle) in cases {
        let e = g.compile(&c).err().unwrap_or_else(|| panic!("{c:?} compiled"));
        let msg = e.to_string();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidInput, "{msg}");
        assert!(msg.starts_with("invalid input: constraint: ") && msg.contains(needle), "{msg}");
        assert!(msg.len() < 700, "bounded: {}", msg.len());
    }
}

#[test]
fn device_and_host_masks_agree() {
    let (g, _) = compiler();
    let mut a = g.compile(&schema(PERSON)).unwrap();
    let mut b = g.compile(&Constraint { kind: Some(Kind::Regex("[a-c]+".into())) }).unwrap();
    let (ma, mb) = (a.allowed().unwrap(), b.allowed().unwrap());
    let vocab = ma.len().min(mb.len());
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let rows: Vec<f32> = (0..2 * vocab).map(|_| rng.random_range(-4.0..4.0)).collect();
    let t = Tensor::from_vec(rows.clone(), (2, vocab), &Device::Cpu).unwrap();
    let mut scratch = Vec::new();
    let masked = f32_rows(&mask_rows(&t, &[&ma, &mb], &mut scratch).unwrap());
    for (i, m) in [&ma, &mb].into_iter().enumerate() {
        let mut host = rows[i * vocab..(i + 1) * vocab].to_vec();
        mask_host_row(m, &mut host);
        assert_eq!(masked[i], host);
        let kept = host.iter().filter(|x| x.is_finite()).count();
        assert_eq!(kept, m.num_set());
    }
}
