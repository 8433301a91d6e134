use super::*;

fn http(body: Value) -> Result<Option<ConstraintSpec>> {
    serde_json::from_value::<HttpFields>(body).unwrap().constraint()
}

fn kind(spec: Option<ConstraintSpec>) -> (String, Kind) {
    match spec {
        Some(ConstraintSpec::Grammar { field, constraint }) => (field, constraint.kind.unwrap()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn each_spelling_becomes_one_worker_constraint() {
    let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let cases = [
        (serde_json::json!({"response_format": {"type": "json_object"}}), Kind::JsonObject(true)),
        (
            serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": true}}}),
            Kind::JsonSchema(schema.to_string()),
        ),
        (serde_json::json!({"guided_json": schema}), Kind::JsonSchema(schema.to_string())),
        (serde_json::json!({"guided_regex": "[a-z]+"}), Kind::Regex("[a-z]+".into())),
        (
            serde_json::json!({"guided_choice": ["a", "b"]}),
            Kind::Choice(Choices { choices: vec!["a".into(), "b".into()] }),
        ),
        (serde_json::json!({"guided_grammar": "start: \"x\""}), Kind::Lark("start: \"x\"".into())),
        (
            serde_json::json!({"structured_outputs": {"choice": ["y"]}}),
            Kind::Choice(Choices { choices: vec!["y".into()] }),
        ),
        (serde_json::json!({"structured_outputs": {"json": schema}}), Kind::JsonSchema(schema.to_string())),
    ];
    for (body, want) in cases {
        assert_eq!(kind(http(body.clone()).unwrap()).1, want, "{body}");
    }
    assert_eq!(http(serde_json::json!({"response_format": {"type": "text"}})).unwrap(), None);
    assert_eq!(http(serde_json::json!({})).unwrap(), None);
}

#[test]
fn bad_structured_outputs_name_their_field() {
    let big = "a".repeat(MAX_CONSTRAINT_BYTES + 1);
    let cases = [
        (serde_json::json!({"response_format": {"type": "xml"}}), "response_format.type"),
        (
            serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "response_format.json_schema.schema",
        ),
        (
            serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}}),
            "response_format.json_schema.schema",
        ),
        (serde_json::json!({"guided_json": "not json"}), "guided_json"),
        (serde_json::json!({"guided_choice": []}), "guided_choice"),
        (serde_json::json!({"guided_regex": big}), "guided_regex"),
        (serde_json::json!({"guided_regex": ""}), "guided_regex"),
        (serde_json::json!({"guided_regex": "a", "guided_choice": ["b"]}), "guided_choice"),
        (serde_json::json!({"structured_outputs": {"regex": "a", "choice": ["b"]}}), "structured_outputs"),
        (serde_json::json!({"structured_outputs": {"choice": [1]}}), "structured_outputs.choice"),
    ];
    for (body, field) in cases {
        match http(body.clone()) {
            Err(RouterError::Invalid { field: f, .. }) => assert_eq!(f, field, "{body}"),
            other => panic!("{body}: {other:?}"),
        }
    }
}

fn weather() -> Value {
    serde_json::json!({"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": false}}})
}

#[test]
fn forced_calls_are_written_in_the_model_format() {
    let tools = [weather(), serde_json::json!({"type": "function", "function": {"name": "now"}})];
    let named = ConstraintSpec::ToolCall { name: Some("now".into()), single: true };
    let Some(Kind::Lark(g)) = resolve(named, Some(ToolFormat::Hermes), Some(&tools)).unwrap().kind else { panic!() };
    assert!(g.starts_with("start: call\n") && g.contains("\"const\":\"now\"") && !g.contains("get_weather"), "{g}");
    let required = ConstraintSpec::ToolCall { name: None, single: false };
    let Some(Kind::Lark(g)) = resolve(required.clone(), Some(ToolFormat::React), Some(&tools)).unwrap().kind else {
        panic!()
    };
    assert!(g.contains(r#""get_weather\nAction Input: " a0"#) && g.contains("a1: %json"), "{g}");
    let Some(Kind::Lark(g)) = resolve(required.clone(), Some(ToolFormat::Qwen3Coder), Some(&tools)).unwrap().kind
    else {
        panic!()
    };
    assert!(g.contains(r#""<parameter=city>\n" v0_0"#) && g.contains(r#"v0_0[suffix="\n</parameter>\n"]"#), "{g}");
    assert!(g.contains(r#"f1: "<function=now>\n" "</function>""#), "{g}");
    let refusals = [
        (resolve(required.clone(), None, Some(&tools)), "tool_choice"),
        (resolve(required, Some(ToolFormat::Hermes), None), "tool_choice"),
        (
            resolve(
                ConstraintSpec::ToolCall { name: Some("x".into()), single: true },
                Some(ToolFormat::Hermes),
                Some(&tools),
            ),
            "tool_choice.function.name",
        ),
    ];
    for (r, field) in refusals {
        match r {
            Err(RouterError::Invalid { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{other:?}"),
        }
    }
}

/// Random walks through the forced-call grammars (a byte-level vocabulary, any allowed byte at
/// each step) always give text the turn parser reads as calls of the offered tools, with
/// arguments valid for their schema.
#[test]
fn forced_call_grammars_compile_and_parse_back_as_calls() {
    use crate::agent::{Formats, ToolSchemas, Turn, TurnOptions};
    use llguidance::api::TopLevelGrammar;
    use llguidance::toktrie::ApproximateTokEnv;
    use llguidance::{Matcher, ParserFactory};
    use rand::{Rng, SeedableRng};

    let tools = [
        weather(),
        serde_json::json!({"type": "function", "function": {"name": "pick", "parameters": {
            "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
            // Extra keys would let a random walk write numbers like 9E99999, which JSON allows
            // and no f64 holds.
            "additionalProperties": false}}}),
    ];
    let env = ApproximateTokEnv::single_byte_env();
    let factory = ParserFactory::new_simple(&env).unwrap();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let cases = [
        (ToolFormat::Hermes, false),
        (ToolFormat::Hermes, true),
        (ToolFormat::React, true),
        (ToolFormat::Qwen3Coder, false),
        (ToolFormat::Qwen3Coder, true),
    ];
    for (format, single) in cases {
        let spec = ConstraintSpec::ToolCall { name: None, single };
        let Some(Kind::Lark(lark)) = resolve(spec, Some(format), Some(&tools)).unwrap().kind else { panic!() };
        let opts = TurnOptions {
            formats: Formats { reasoning: None, tools: Some(format) },
            reasoning_open: false,
            tools: true,
            single_call: single,
            schemas: std::sync::Arc::new(ToolSchemas::from_tools(&tools)),
        };
        for walk in 0..30 {
            let mut m = Matcher::new(Ok(factory.create_parser(TopLevelGrammar::from_lark(lark.clone())).unwrap()));
            let mut text = Vec::new();
            // String contents are unbounded: past 300 bytes, end them as soon as allowed (a JSON
            // string at its quote, a Qwen3-Coder text value at its closing tag).
            while !m.is_stopped() {
                let allowed = m.compute_mask().unwrap();
                // A Qwen3-Coder text value ends at its closing tag: spell it out.
                let close = b"\n</parameter>";
                let typed = (0..close.len()).rev().find(|&k| text.ends_with(&close[..k])).map(|k| close[k] as u32);
                let enders: Vec<u32> =
                    if format == ToolFormat::Qwen3Coder { typed.into_iter().collect() } else { vec![b'"' as u32] };
                // The grammar's own end first (several calls could otherwise go on forever).
                let eos = env.tok_trie().eos_token();
                let ender = std::iter::once(eos).chain(enders).find(|&e| allowed.is_allowed(e));
                let t = if let (true, Some(e)) = (text.len() > 300, ender) {
                    e
                } else {
                    let list = allowed.to_list();
                    list[rng.random_range(0..list.len())]
                };
                m.consume_token(t).unwrap();
                if t < 256 {
                    text.push(t as u8);
                }
                assert!(text.len() < 5000, "{format:?}: runaway walk: {:?}", String::from_utf8_lossy(&text[4800..]));
            }
            let text = String::from_utf8_lossy(&text).into_owned();
            let turn = Turn::parse(&opts, &text);
            assert!(!turn.calls.is_empty(), "{format:?} walk {walk}: no call in {text:?}");
            for call in &turn.calls {
                let args: Value = serde_json::from_str(&call.arguments).unwrap();
                match call.name.as_str() {
                    "get_weather" => assert!(args["city"].is_string(), "{text}"),
                    "pick" => assert!(args["n"].as_u64().is_some_and(|n| n <= 9), "{text}"),
                    other => panic!("{other} in {text}"),
                }
            }
            if single {
                assert_eq!(turn.calls.len(), 1, "{text}");
            }
        }
    }
}

/// A forced call fills an empty constraint, also on gRPC without options, and a request's own
/// grammar beside it is refused under the field the client used (once prefixed, on gRPC).
#[test]
fn a_forced_call_needs_the_constraint_to_itself() {
    let forced = || Some(ConstraintSpec::ToolCall { name: None, single: false });
    let mut empty = None;
    force_call(&mut empty, forced()).unwrap();
    assert_eq!(empty, forced());
    let prompt = || Ok(crate::validate::Prompt::Text("x".into()));
    assert_eq!(crate::grpc::job("m", prompt(), None, forced()).options.constraint, forced());
    let own = qwen_proto::serve::Constraint { kind: Some(qwen_proto::serve::constraint::Kind::Regex("a".into())) };
    let options = qwen_proto::serve::GenerationOptions { constraint: Some(own), ..Default::default() };
    match crate::grpc::job("m", prompt(), Some(options), forced()).prompt.err() {
        Some(RouterError::Invalid { field, .. }) => assert_eq!(field, "options.constraint.regex"),
        other => panic!("{other:?}"),
    }
}
