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
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
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
    let refusals = [
        (resolve(required.clone(), Some(ToolFormat::Qwen3Coder), Some(&tools)), "tool_choice"),
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
