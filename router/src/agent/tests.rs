//! Recorded-style model outputs through the whole-turn and streaming paths, streamed split at
//! every character boundary: the same reasoning, content and calls, and no markup leaked.

use super::*;

fn opts(reasoning_open: bool) -> TurnOptions {
    TurnOptions {
        formats: Formats { reasoning: Some(ReasoningFormat::Qwen3), tools: Some(ToolFormat::Hermes) },
        reasoning_open,
        tools: true,
        single_call: false,
        schemas: Default::default(),
    }
}

/// (name, arguments) of each call, ids aside (they are random).
fn calls(turn: &Turn) -> Vec<(&str, &str)> {
    turn.calls.iter().map(|c| (c.name.as_str(), c.arguments.as_str())).collect()
}

/// `text` streamed in `chunks`, gathered back into a turn.
fn streamed(o: TurnOptions, chunks: &[&str]) -> Turn {
    let mut p = TurnParser::new(o);
    let mut pieces = Vec::new();
    for c in chunks {
        pieces.extend(p.push(c));
    }
    pieces.extend(p.finish());
    let mut ids = std::collections::HashSet::new();
    for piece in &pieces {
        match piece {
            Piece::CallStart { index, id, .. } => {
                assert_eq!(*index, ids.len(), "calls announced once, in order");
                assert!(ids.insert(id.clone()) && id.starts_with("call_") && id.len() == 29, "{id}");
            }
            Piece::CallArgs { index, .. } => assert!(*index < ids.len(), "arguments of an announced call"),
            _ => {}
        }
    }
    // A leaked tag fragment would make the joined content differ from the whole turn's.
    Turn::from_pieces(pieces)
}

/// Every way of cutting `text` in two, and one character at a time, agree with the whole.
fn agrees_streamed(o: TurnOptions, text: &str) -> Turn {
    let whole = Turn::parse(&o, text);
    let cuts: Vec<usize> = (0..=text.len()).filter(|&i| text.is_char_boundary(i)).collect();
    for &at in &cuts {
        let s = streamed(o.clone(), &[&text[..at], &text[at..]]);
        assert_eq!(
            (s.reasoning.as_deref(), s.content.as_deref()),
            (whole.reasoning.as_deref(), whole.content.as_deref()),
            "cut at {at}"
        );
        assert_eq!(calls(&s), calls(&whole), "cut at {at}");
    }
    let chars: Vec<String> = text.chars().map(String::from).collect();
    let s = streamed(o, &chars.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!((s.reasoning.as_deref(), s.content.as_deref()), (whole.reasoning.as_deref(), whole.content.as_deref()));
    assert_eq!(calls(&s), calls(&whole));
    whole
}

#[test]
fn two_calls_after_text_in_one_turn() {
    let text = "Let me check both cities.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"°C\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"Europe/Berlin\"}}\n</tool_call>";
    let turn = agrees_streamed(opts(false), text);
    assert_eq!(turn.content.as_deref(), Some("Let me check both cities.\n"));
    assert_eq!(
        calls(&turn),
        vec![("get_weather", "{\"city\": \"Paris\", \"unit\": \"°C\"}"), ("get_time", "{\"tz\": \"Europe/Berlin\"}")]
    );
    assert_eq!(turn.reasoning, None);
}

#[test]
fn reasoning_then_a_call() {
    let text = "<think>\nThe user wants weather; {braces} and <b>tags</b> are thought.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
    let turn = agrees_streamed(opts(false), text);
    assert_eq!(turn.reasoning.as_deref(), Some("\nThe user wants weather; {braces} and <b>tags</b> are thought.\n"));
    assert_eq!(turn.content, None);
    assert_eq!(calls(&turn), vec![("get_weather", "{\"city\": \"Oslo\"}")]);
}

#[test]
fn a_prompt_that_opened_think_starts_in_reasoning() {
    let turn = agrees_streamed(opts(true), "Two plus two.\n</think>\n\nIt is 4.");
    assert_eq!((turn.reasoning.as_deref(), turn.content.as_deref()), (Some("Two plus two.\n"), Some("It is 4.")));
    // Without the open tag and without reasoning_open: all of it is the answer.
    let turn = agrees_streamed(opts(false), "It is 4, <thinking> aside.");
    assert_eq!((turn.reasoning, turn.content.as_deref()), (None, Some("It is 4, <thinking> aside.")));
}

#[test]
fn malformed_calls_are_content_never_errors() {
    for text in [
        "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}\n</tool_call>", // unbalanced
        "<tool_call>\nnot json at all\n</tool_call> then text",
        "<tool_call>\n{\"arguments\": {}}\n</tool_call>", // no name
    ] {
        let turn = Turn::parse(&opts(false), text);
        assert!(turn.calls.is_empty(), "{text}");
        assert_eq!(turn.content.as_deref(), Some(text), "returned as written");
    }
    // Text that only looks like the start of a tag is text.
    let turn = agrees_streamed(opts(false), "<tool use is fun> and <tool_cal");
    assert_eq!(turn.content.as_deref(), Some("<tool use is fun> and <tool_cal"));
}

#[test]
fn other_key_orders_string_arguments_and_a_cut_off_call() {
    let turn =
        agrees_streamed(opts(false), "<tool_call>\n{\"arguments\": {\"q\": 1}, \"name\": \"search\"}\n</tool_call>");
    assert_eq!(calls(&turn), vec![("search", "{\"q\":1}")]);
    let turn = Turn::parse(&opts(false), "<tool_call>{\"name\": \"s\", \"arguments\": \"{\\\"q\\\": 2}\"}</tool_call>");
    assert_eq!(calls(&turn), vec![("s", "{\"q\": 2}")], "a JSON string of arguments is the arguments");
    // The length limit hit after the object closed but before the tag: still a call.
    let turn = agrees_streamed(opts(false), "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n");
    assert_eq!(calls(&turn), vec![("f", "{}")]);
    let turn = Turn::parse(&opts(false), "<tool_call>\n{\"name\": \"f\", \"argu");
    assert_eq!((turn.calls.len(), turn.content.as_deref()), (0, Some("<tool_call>\n{\"name\": \"f\", \"argu")));
}

#[test]
fn single_call_keeps_the_first_and_tool_parsing_can_be_off() {
    let text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
    let single = TurnOptions { single_call: true, ..opts(false) };
    assert_eq!(calls(&agrees_streamed(single, text)), vec![("a", "{}")]);
    let off = TurnOptions { tools: false, ..opts(false) };
    let turn = Turn::parse(&off, text);
    assert_eq!((turn.calls.len(), turn.content.as_deref()), (0, Some(text)));
}

#[test]
fn formats_are_detected_from_the_template() {
    let qwen3 = "{%- if tools %}<tools>{% endif %}<tool_call>\n{{ x }}</tool_call>{% if reasoning_content %}<think>{% endif %}</think>";
    assert_eq!(
        Formats::detect(qwen3),
        Formats { reasoning: Some(ReasoningFormat::Qwen3), tools: Some(ToolFormat::Hermes) }
    );
    assert_eq!(Formats::detect(crate::template::CHATML), Formats::default());
    let coder = "{{- '<tool_call>\n<function=' + tool_call.name + '>\n' }}";
    assert_eq!(Formats::detect(coder).tools, Some(ToolFormat::Qwen3Coder));
}

fn coder(schemas: ToolSchemas) -> TurnOptions {
    TurnOptions {
        formats: Formats { reasoning: None, tools: Some(ToolFormat::Qwen3Coder) },
        tools: true,
        schemas: std::sync::Arc::new(schemas),
        ..Default::default()
    }
}

fn weather_schemas() -> ToolSchemas {
    ToolSchemas::from_tools(&[serde_json::json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
            "detailed": {"type": "boolean"}, "filters": {"type": "object"}}}}})])
}

#[test]
fn coder_calls_are_typed_by_the_schema() {
    let text = "I'll check.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n<parameter=days>\n3\n</parameter>\n<parameter=detailed>\ntrue\n</parameter>\n<parameter=filters>\n{\"rain\": false}\n</parameter>\n</function>\n</tool_call>";
    let turn = agrees_streamed(coder(weather_schemas()), text);
    assert_eq!(turn.content.as_deref(), Some("I'll check.\n"));
    assert_eq!(
        calls(&turn),
        vec![(
            "get_weather",
            "{\"city\": \"San Francisco\", \"days\": 3, \"detailed\": true, \"filters\": {\"rain\":false}}"
        )]
    );
    let args: serde_json::Value = serde_json::from_str(calls(&turn)[0].1).unwrap();
    assert_eq!(args["days"], 3);
    // Without a schema every value is a string.
    let turn = Turn::parse(&coder(ToolSchemas::default()), text);
    assert_eq!(serde_json::from_str::<serde_json::Value>(calls(&turn)[0].1).unwrap()["days"], "3");
}

#[test]
fn coder_values_keep_code_and_two_calls_parse() {
    let text = "<tool_call>\n<function=write_file>\n<parameter=path>\na.py\n</parameter>\n<parameter=content>\nif a < b:\n    print(\"<b>\")\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=run>\n</function>\n</tool_call>";
    let turn = agrees_streamed(coder(ToolSchemas::default()), text);
    assert_eq!(turn.content, None);
    assert_eq!(
        calls(&turn),
        vec![
            ("write_file", "{\"path\": \"a.py\", \"content\": \"if a < b:\\n    print(\\\"<b>\\\")\"}"),
            ("run", "{}")
        ]
    );
    // No function: the block is content.
    let bad = "<tool_call>\n<parameter=x>\n1\n</parameter>\n</tool_call>";
    let turn = Turn::parse(&coder(ToolSchemas::default()), bad);
    assert_eq!((turn.calls.len(), turn.content.as_deref()), (0, Some(bad)));
}

fn react_opts() -> TurnOptions {
    TurnOptions {
        formats: Formats { reasoning: None, tools: Some(ToolFormat::React) },
        tools: true,
        ..Default::default()
    }
}

#[test]
fn react_turns_become_calls_answers_or_text() {
    let turn = streamed(
        react_opts(),
        &["Thought: I need the weather.\nAction: get_weather\nAction Input: ", "{\"city\": \"Paris\"}\n"],
    );
    assert_eq!(calls(&turn), vec![("get_weather", "{\"city\": \"Paris\"}")]);
    assert_eq!(turn.reasoning.as_deref(), Some("Thought: I need the weather."));
    assert_eq!(turn.content, None);
    let turn = Turn::parse(&react_opts(), "Thought: I now know the final answer\nFinal Answer: 18 C and sunny.");
    assert_eq!(turn.content.as_deref(), Some("18 C and sunny."));
    assert_eq!(turn.reasoning.as_deref(), Some("Thought: I now know the final answer"));
    assert!(turn.calls.is_empty());
    let turn = Turn::parse(&react_opts(), "Just chatting, no format.");
    assert_eq!((turn.content.as_deref(), turn.calls.len()), (Some("Just chatting, no format."), 0));
    let mut p = TurnParser::new(react_opts());
    assert!(p.push("Action: f\nAction Input: {}").is_empty(), "held until the end");
    assert!(!p.finish().is_empty() && p.called());
}

#[test]
fn react_prompts_describe_tools_and_continue_after_an_observation() {
    use crate::template::{Chat, Message, Role};
    let tools = vec![serde_json::json!({"type": "function", "function": {"name": "get_weather",
        "description": "Weather by city.", "parameters": {"type": "object"}}})];
    let call =
        serde_json::json!({"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}});
    let chat = Chat {
        messages: vec![
            Message::new(Role::User, "Weather in Paris?"),
            Message { tool_calls: Some(vec![call]), ..Message::new(Role::Assistant, "") },
            Message::new(Role::Tool, "18 C"),
        ],
        tools: Some(tools),
        kwargs: Default::default(),
    };
    let (chat, cont) = react::prompt(chat);
    assert!(chat.tools.is_none() && chat.messages.len() == 1);
    let q = &chat.messages[0].content;
    assert!(q.starts_with("Answer the following questions as best you can."), "{q}");
    assert!(q.contains("get_weather: Call this tool to interact with the get_weather API. What is the get_weather API useful for? Weather by city. Parameters: {\"type\":\"object\"} Format the arguments as a JSON object."), "{q}");
    assert!(
        q.contains("should be one of [get_weather]") && q.ends_with("Begin!\n\nQuestion: Weather in Paris?"),
        "{q}"
    );
    assert_eq!(
        cont.as_deref(),
        Some("Action: get_weather\nAction Input: {\"city\":\"Paris\"}\nObservation: 18 C\nThought:")
    );
}
