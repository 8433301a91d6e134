//! `qwen-worker generate` and `tokenize` as a user runs them: real processes, committed fixtures.

use qwen_tests::{fixture, golden, ids, qwen_worker};
use serde_json::Value;

/// `qwen-worker generate --model MODEL --prompt-ids IDS --max-new-tokens N --json EXTRA...`, parsed.
fn generate_json(model: &std::path::Path, prompt: &[u32], max_new_tokens: usize, extra: &[&str]) -> Value {
    let prompt = prompt.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let n = max_new_tokens.to_string();
    let mut args =
        vec!["generate", "--model", model.to_str().unwrap(), "--prompt-ids", &prompt, "--max-new-tokens", &n, "--json"];
    args.extend_from_slice(extra);
    stdout_json(&qwen_worker(&args))
}

fn stdout_json(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "exit {:?}\nstderr: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout.clone()).unwrap();
    assert_eq!(text.trim().lines().count(), 1, "--json prints exactly one line: {text}");
    serde_json::from_str(text.trim()).unwrap()
}

#[test]
fn generate_prompt_ids_json_matches_golden_greedy() {
    let model = fixture("qwen1-ntk-logn");
    for case in golden("qwen1-ntk-logn")["cases"].as_array().unwrap() {
        let want = ids(&case["greedy"]);
        let json = generate_json(&model, &ids(&case["prompt_ids"]), want.len(), &["--ignore-eos"]);
        assert_eq!(ids(&json["token_ids"]), want);
        assert!(json["text"].is_null(), "no tokenizer in this fixture, so no text");
        assert!(json["ttft_ms"].as_f64().unwrap() > 0.0);
        assert!(json["tokens_per_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn generate_text_prompt_streams_and_matches_golden() {
    let model = fixture("qwen2-gqa");
    let g = &golden("qwen2-gqa")["text_prompt"];
    let n = ids(&g["greedy"]).len().to_string();
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        g["text"].as_str().unwrap(),
        "--max-new-tokens",
        &n,
        "--ignore-eos",
    ];

    let mut json_args = args.to_vec();
    json_args.push("--json");
    let json = stdout_json(&qwen_worker(&json_args));
    assert_eq!(ids(&json["token_ids"]), ids(&g["greedy"]));
    assert_eq!(json["text"].as_str().unwrap(), g["greedy_text"].as_str().unwrap());

    let out = qwen_worker(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.trim_end_matches('\n'), g["greedy_text"].as_str().unwrap());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("time to first token") && stderr.contains("tokens/s"), "{stderr}");
}

#[test]
fn generate_stops_at_the_models_eos_ids() {
    // generation_config.json of the fixture lists its eos ids; a prompt whose greedy path hits
    // one must stop there unless --ignore-eos.
    let model = fixture("qwen2-gqa");
    let gen_cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("generation_config.json")).unwrap()).unwrap();
    let eos = ids(&gen_cfg["eos_token_id"]);
    let g = golden("qwen2-gqa");
    let mut candidates: Vec<&Value> = g["cases"].as_array().unwrap().iter().collect();
    candidates.push(&g["text_prompt"]);
    let (prompt, until_eos) = candidates
        .iter()
        .find_map(|c| {
            let greedy = ids(&c["greedy"]);
            greedy.iter().position(|t| eos.contains(t)).map(|p| (ids(&c["prompt_ids"]), greedy[..=p].to_vec()))
        })
        .expect("the qwen2-gqa fixture has a greedy path through an eos id");
    let json = generate_json(&model, &prompt, 32, &[]);
    assert_eq!(ids(&json["token_ids"]), until_eos);
    assert_eq!(json["finish_reason"], "stop");
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let model = fixture("qwen3");
    let run = |seed: &str| {
        let extra = ["--temperature", "1.5", "--top-p", "0.95", "--seed", seed, "--ignore-eos"];
        ids(&generate_json(&model, &[5, 6, 7], 24, &extra)["token_ids"])
    };
    let a = run("1");
    assert_eq!(a, run("1"));
    assert_ne!(a, run("2"), "different seeds should differ over 24 tokens at temperature 1.5");
}

#[test]
fn tokenize_prints_the_ids() {
    let model = fixture("qwen2-gqa");
    let g = &golden("qwen2-gqa")["text_prompt"];
    let out =
        qwen_worker(&["tokenize", "--model", model.to_str().unwrap(), "--text", g["text"].as_str().unwrap(), "--json"]);
    assert_eq!(ids(&stdout_json(&out)["token_ids"]), ids(&g["prompt_ids"]));
}

#[test]
fn flags_come_from_the_environment_too() {
    let model = fixture("qwen2-gqa");
    let out = std::process::Command::new(qwen_tests::bin("qwen-worker"))
        .args(["tokenize", "--json"])
        .env("QWEN_MODEL", &model)
        .env("QWEN_TEXT", "Hello, world!")
        .output()
        .unwrap();
    let json = stdout_json(&out);
    assert!(!ids(&json["token_ids"]).is_empty());
}

fn failure(args: &[&str]) -> String {
    let out = qwen_worker(args);
    assert!(!out.status.success(), "expected failure for {args:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    let qwen1 = fixture("qwen1-ntk-logn");
    let qwen1 = qwen1.to_str().unwrap();
    let err = failure(&["generate", "--model", "/nonexistent/model", "--prompt-ids", "1"]);
    assert!(err.contains("/nonexistent/model/config.json"), "{err}");
    let err = failure(&["generate", "--model", qwen1, "--prompt-ids", "1,600"]);
    assert!(err.contains("token id 600 in prompt"), "{err}");
    let err = failure(&["generate", "--model", qwen1, "--prompt", "hello"]);
    assert!(err.contains("needs a tokenizer") && err.contains("--prompt-ids"), "{err}");
    let err = failure(&["generate", "--model", qwen1, "--prompt-ids", "1,x"]);
    assert!(err.contains("--prompt-ids"), "{err}");
    let err = failure(&["generate", "--model", qwen1, "--prompt-ids", "1", "--temperature=-1"]);
    assert!(err.contains("temperature"), "{err}");
    let err = failure(&["generate", "--model", qwen1, "--prompt-ids", "1", "--max-new-tokens", "100000"]);
    assert!(err.contains("max_new_tokens") && err.contains("context length"), "{err}");
}
