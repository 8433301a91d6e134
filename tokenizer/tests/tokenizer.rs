//! Tokenizers against their references: the original Qwen's `qwen.tiktoken` against ids that
//! Python's `tiktoken` produced (fixtures/tokenizer), and `tokenizer.json` against Python's
//! `tokenizers` (the fixtures' golden.json). Also round trips and streaming detokenization.

use std::path::PathBuf;

use qwen_tokenizer::Tokenizer;
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// The real `qwen.tiktoken`: `$QWEN_TIKTOKEN`, else `.cache/qwen.tiktoken` as fetched by
/// `scripts/fetch_qwen_tiktoken.sh` (which `.ci/run` runs).
fn qwen_tiktoken() -> Tokenizer {
    let path =
        std::env::var_os("QWEN_TIKTOKEN").map(PathBuf::from).unwrap_or_else(|| root().join(".cache/qwen.tiktoken"));
    assert!(path.exists(), "{} is missing: run scripts/fetch_qwen_tiktoken.sh (or set QWEN_TIKTOKEN)", path.display());
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&path, dir.path().join("qwen.tiktoken")).unwrap();
    Tokenizer::from_dir(dir.path()).unwrap()
}

#[test]
fn qwen_tiktoken_matches_python_tiktoken() {
    let tok = qwen_tiktoken();
    assert_eq!(tok.vocab_size(), 151_851);
    assert_eq!(tok.token_to_id("<|endoftext|>"), Some(151_643));
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(151_644));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(151_645));
    assert_eq!(tok.token_to_id("<|extra_204|>"), Some(151_850));
    let text = std::fs::read_to_string(root().join("fixtures/tokenizer/qwen_tiktoken_cases.json")).unwrap();
    let cases: Value = serde_json::from_str(&text).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 200, "only {} cases", cases.len());
    for case in cases {
        let s = case["text"].as_str().unwrap();
        let plain = tok.encode(s, false).unwrap();
        assert_eq!(plain, ids(&case["ids"]), "special tokens as text: {s:?}");
        assert_eq!(tok.encode(s, true).unwrap(), ids(&case["ids_allow_special"]), "specials allowed: {s:?}");
        // Encoding NFC-normalises (as tokenization_qwen.py does): a decomposed input comes back
        // composed, recorded as `decoded` in the case.
        let want = case.get("decoded").and_then(Value::as_str).unwrap_or(s);
        assert_eq!(tok.decode(&plain).unwrap(), want, "round trip of {s:?}");
    }
}

/// Streaming detokenization releases exactly the text, and never a broken character, even when
/// a character's bytes are spread over several tokens.
#[test]
fn qwen_tiktoken_streams_whole_characters() {
    let tok = qwen_tiktoken();
    for s in ["你好，世界！通义千问", "emoji 😀🎉👨‍👩‍👧‍👦 mixed 中文 text", "plain ascii only", "Ünïcödé àccénts ½"]
    {
        let ids = tok.encode(s, false).unwrap();
        let mut dec = tok.stream_decoder();
        let mut out = String::new();
        for &id in &ids {
            if let Some(piece) = dec.step(id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "broken piece {piece:?} in {s:?}");
                out.push_str(&piece);
            }
        }
        assert_eq!(dec.finish().unwrap(), None);
        assert_eq!(out, s);
    }
}

#[test]
fn tokenizer_json_matches_python_tokenizers() {
    for name in ["qwen2-gqa", "qwen3"] {
        let dir = root().join("fixtures/models").join(name);
        let tok = Tokenizer::from_dir(&dir).unwrap();
        let golden: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        for case in golden["tokenizer_cases"].as_array().unwrap() {
            let s = case["text"].as_str().unwrap();
            let got = tok.encode(s, true).unwrap();
            assert_eq!(got, ids(&case["ids"]), "{name}: {s:?}");
            assert_eq!(tok.decode(&got).unwrap(), s);
            let mut dec = tok.stream_decoder();
            let mut out = String::new();
            for &id in &got {
                out.push_str(&dec.step(id).unwrap().unwrap_or_default());
            }
            out.push_str(&dec.finish().unwrap().unwrap_or_default());
            assert_eq!(out, s, "{name}: streamed {s:?}");
        }
    }
}

#[test]
fn bad_tokenizer_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).err().unwrap();
    assert!(err.to_string().contains("tokenizer.json or qwen.tiktoken"), "{err}");

    std::fs::write(dir.path().join("qwen.tiktoken"), "SGVsbG8= 0\nnot-base64!! 1\n").unwrap();
    let err = Tokenizer::from_dir(dir.path()).err().unwrap();
    assert!(err.to_string().contains("qwen.tiktoken: line 2: bad base64"), "{err}");

    std::fs::write(dir.path().join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::from_dir(dir.path()).err().unwrap();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn decoding_an_id_outside_the_vocabulary_is_an_error() {
    let tok = qwen_tiktoken();
    let err = tok.decode(&[151_851]).unwrap_err();
    assert!(err.to_string().contains("151851"), "{err}");
    let hf = Tokenizer::from_dir(&root().join("fixtures/models/qwen2-gqa")).unwrap();
    let err = hf.decode(&[100_000]).unwrap_err();
    assert!(err.to_string().contains("100000"), "{err}");
}

/// With specials not allowed, `tokenizer.json` encodes `<|im_start|>` typed by a user as the
/// characters it is; with them allowed, as the special token. Text without specials encodes the
/// same either way.
#[test]
fn tokenizer_json_special_tokens_are_text_unless_allowed() {
    let dir = root().join("fixtures/models/qwen2-gqa");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let specials: Vec<u32> =
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].iter().map(|s| tok.token_to_id(s).unwrap()).collect();
    let text = "<|im_start|>user\nhi<|im_end|><|endoftext|>";
    let allowed = tok.encode(text, true).unwrap();
    assert_eq!(allowed.iter().filter(|id| specials.contains(id)).count(), 3, "{allowed:?}");
    let plain = tok.encode(text, false).unwrap();
    assert!(plain.iter().all(|id| !specials.contains(id)), "{plain:?}");
    assert_eq!(tok.decode(&plain).unwrap(), text);

    let golden: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    for case in golden["tokenizer_cases"].as_array().unwrap() {
        let s = case["text"].as_str().unwrap();
        if !s.contains("<|") {
            assert_eq!(tok.encode(s, false).unwrap(), ids(&case["ids"]), "{s:?}");
        }
    }
}

#[test]
fn qwen_tiktoken_token_bytes_spell_each_token_and_mark_specials() {
    let tok = qwen_tiktoken();
    let qwen_tokenizer::Tokenizer::Tiktoken(t) = &tok else { panic!("not tiktoken") };
    let bytes = t.token_bytes();
    assert_eq!(bytes.len(), tok.vocab_size());
    let text = "Action Input: {\"q\": \"北京\"}\nObservation:";
    let ids = tok.encode(text, false).unwrap();
    let joined: Vec<u8> = ids.iter().flat_map(|&i| bytes[i as usize].clone()).collect();
    assert_eq!(joined, text.as_bytes());
    let im_end = tok.token_to_id("<|im_end|>").unwrap() as usize;
    assert_eq!(bytes[im_end], b"\xff<|im_end|>");
}
