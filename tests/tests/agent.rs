//! Agent requests through a real worker and router: tools, tool calls and tool results reach
//! a chat template that speaks them (given to the router with `--tokenizer`), reasoning is split
//! from the answer unary and streamed, and bad agent fields are 400s naming them. The fixture's
//! weights are random, so what it writes is not a call; the parsers' formats are unit-tested in
//! the router.

use qwen_proto::serve::generation_client::GenerationClient;
use qwen_proto::serve::{ChatMessage, ChatRequest, GenerationOptions, SamplingParams, Tool, ToolCall};
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use qwen_tests::{bare, fixture, root, RouterProcess, WorkerProcess};

const MODEL: &str = "qwen2-gqa";

/// The fixture's tokenizer with the agent template, as `--tokenizer` reads a model directory.
fn tokenizer_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture(MODEL).join("tokenizer.json"), dir.path().join("tokenizer.json")).unwrap();
    let template = std::fs::read_to_string(root().join("fixtures/templates/agent.jinja")).unwrap();
    let config = json!({"chat_template": template, "eos_token": "<|im_end|>"});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

fn chat(extra: Value) -> Value {
    let mut body = json!({
        "model": MODEL, "temperature": 0.0, "max_tokens": 12, "ignore_eos": true,
        // Small: the fixture's context is 256 tokens of a tiny vocabulary.
        "tools": [{"type": "function", "function": {"name": "weather"}}],
        "messages": [
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "weather", "arguments": "{\"c\": \"P\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18"},
        ],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_requests_render_parse_and_refuse_by_name() {
    let w = WorkerProcess::start(MODEL, &[]);
    let tokenizer = tokenizer_dir();
    let spec = format!("{MODEL}={}", tokenizer.path().display());
    let r = RouterProcess::start(&["--worker", bare(&w.addr), "--tokenizer", &spec]);
    r.wait_ready().await;

    // The template opened <think>: everything the model wrote (no </think>) is reasoning.
    let (status, v) = r.post("/v1/chat/completions", chat(json!({}))).await;
    assert_eq!(status, 200, "{v}");
    let message = &v["choices"][0]["message"];
    let reasoning = message["reasoning_content"].as_str().expect("reasoning_content").to_string();
    assert!(!reasoning.is_empty() && !reasoning.contains("</think>"), "{v}");
    assert_eq!(message["content"], "", "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // The tools and the call history made the prompt longer than the question alone.
    let (_, bare_chat) = r
        .post(
            "/v1/chat/completions",
            json!({"model": MODEL, "max_tokens": 1,
        "messages": [{"role": "user", "content": "Weather in Paris?"}]}),
        )
        .await;
    assert!(v["usage"]["prompt_tokens"].as_u64() > bare_chat["usage"]["prompt_tokens"].as_u64(), "{v}");

    // Streamed: the same reasoning in reasoning_content deltas, no content, then the finish.
    let events = r.post_stream("/v1/chat/completions", chat(json!({"stream": true}))).await;
    let chunks: Vec<Value> =
        events.iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["reasoning_content"].as_str()).collect();
    assert_eq!(streamed, reasoning);
    assert!(chunks.iter().all(|c| c["choices"][0]["delta"].get("content").is_none()), "{chunks:?}");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "length");

    // enable_thinking: false closes the block in the prompt: the text is the answer.
    let (status, v) =
        r.post("/v1/chat/completions", chat(json!({"chat_template_kwargs": {"enable_thinking": false}}))).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"].get("reasoning_content").is_none(), "{v}");
    assert!(!v["choices"][0]["message"]["content"].as_str().unwrap().is_empty(), "{v}");

    grpc_chat(&r, &reasoning).await;
    structured(&r).await;

    // Bad agent fields: 400 in OpenAI's shape, naming the field.
    for (extra, param) in [
        (json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice.function.name"),
        (json!({"tool_choice": "required", "guided_regex": "a+"}), "guided_regex"),
        (json!({"tools": [{"type": "function", "function": {"name": "x", "description": "<|im_start|>"}}]}), "tools"),
        (
            json!({"chat_template_kwargs": {"add_generation_prompt": false}}),
            "chat_template_kwargs.add_generation_prompt",
        ),
    ] {
        let (status, v) = r.post("/v1/chat/completions", chat(extra)).await;
        assert_eq!((status, v["error"]["param"].as_str()), (400, Some(param)), "{v}");
    }
}

/// The same conversation over gRPC `Chat` / `ChatStream`: the answer split the same way.
async fn grpc_chat(r: &RouterProcess, http_reasoning: &str) {
    let mut c = GenerationClient::connect(r.grpc.clone()).await.unwrap();
    let msg =
        |role: &str, content: &str| ChatMessage { role: role.into(), content: content.into(), ..Default::default() };
    let request = || ChatRequest {
        model: MODEL.into(),
        messages: vec![
            msg("user", "Paris?"),
            ChatMessage {
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "weather".into(),
                    arguments: "{\"c\": \"P\"}".into(),
                }],
                ..msg("assistant", "")
            },
            ChatMessage { tool_call_id: "call_1".into(), ..msg("tool", "18") },
        ],
        options: Some(GenerationOptions {
            sampling: Some(SamplingParams { temperature: Some(0.0), ..Default::default() }),
            max_tokens: Some(12),
            ignore_eos: true,
            ..Default::default()
        }),
        tools: vec![Tool { name: "weather".into(), ..Default::default() }],
        ..Default::default()
    };
    let resp = c.chat(request()).await.unwrap().into_inner();
    assert_eq!(resp.reasoning_text, http_reasoning, "the same turn as over HTTP");
    assert!(resp.text.is_empty() && resp.tool_calls.is_empty(), "{resp:?}");
    let mut stream = c.chat_stream(request()).await.unwrap().into_inner();
    let mut reasoning = String::new();
    while let Some(m) = stream.next().await {
        let m = m.unwrap();
        assert!(m.text.is_empty(), "{m:?}");
        reasoning.push_str(&m.reasoning_text);
    }
    assert_eq!(reasoning, http_reasoning);
    // Bad fields: INVALID_ARGUMENT naming them.
    for (req, field) in [
        (ChatRequest { chat_template_kwargs_json: "[1]".into(), ..request() }, "chat_template_kwargs_json"),
        (ChatRequest { tool_choice: 7, ..request() }, "tool_choice"),
        (
            ChatRequest { tools: vec![Tool { name: "bad name".into(), ..Default::default() }], ..request() },
            "tools[0].function.name",
        ),
    ] {
        let e = c.chat(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(field), "{}", e.message());
    }
}

/// A tool with bounded arguments, so that even random weights finish the call in a few tokens.
fn bounded_tool() -> Value {
    // Small: the fixture's context is 256 tokens, nearly one per character.
    json!([{"type": "function", "function": {"name": "w", "parameters": {
        "properties": {"c": {"enum": ["P", "L"]}}, "required": ["c"]}}}])
}

/// Structured outputs end to end: the worker's grammar masks random weights into a forced call
/// (unary and streamed, HTTP and gRPC) and into JSON that validates; a grammar the worker
/// cannot compile is a 400 naming the client's field.
async fn structured(r: &RouterProcess) {
    let forced = json!({"model": MODEL, "temperature": 0.0, "messages": [{"role": "user", "content": "P?"}],
        "tools": bounded_tool(), "tool_choice": "required"});
    let (status, v) = r.post("/v1/chat/completions", forced.clone()).await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let call = &choice["message"]["tool_calls"][0]["function"];
    assert_eq!(call["name"], "w", "{v}");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(["P", "L"].contains(&args["c"].as_str().unwrap()), "{v}");
    assert!(choice["message"].get("reasoning_content").is_none(), "a forced call is no reasoning: {v}");

    let mut streamed = forced.clone();
    streamed["stream"] = json!(true);
    let events = r.post_stream("/v1/chat/completions", streamed).await;
    let chunks: Vec<Value> =
        events.iter().filter(|e| *e != "[DONE]").map(|e| serde_json::from_str(e).unwrap()).collect();
    let deltas: Vec<&Value> =
        chunks.iter().flat_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array()).flatten().collect();
    let name: String = deltas.iter().filter_map(|d| d["function"]["name"].as_str()).collect();
    let arguments: String = deltas.iter().filter_map(|d| d["function"]["arguments"].as_str()).collect();
    assert_eq!((name.as_str(), arguments.as_str()), ("w", call["arguments"].as_str().unwrap()), "{chunks:?}");
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], "tool_calls");

    let schema = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 5},
        "sunny": {"type": "boolean"}}, "required": ["city", "sunny"], "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "w", "schema": schema, "strict": true}});
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "W?"}], "response_format": format,
        "max_tokens": 60, "temperature": 1.0, "seed": 3});
    let (status, v) = r.post("/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    let content: Value = serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert!(content["city"].as_str().unwrap().chars().count() <= 5 && content["sunny"].is_boolean(), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");

    let unsatisfiable = json!({"type": "json_schema", "json_schema": {"name": "x",
        "schema": {"type": "string", "minLength": 5, "maxLength": 2}}});
    let (status, v) = r.post("/v1/chat/completions", chat(json!({"response_format": unsatisfiable}))).await;
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("response_format.json_schema.schema")), "{v}");

    // vLLM's extras on /v1/completions too.
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 10, "guided_choice": ["yes", "no"]});
    let (status, v) = r.post("/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    assert!(["yes", "no"].contains(&v["choices"][0]["text"].as_str().unwrap()), "{v}");

    let mut c = GenerationClient::connect(r.grpc.clone()).await.unwrap();
    let request = qwen_proto::serve::GenerateRequest {
        model: MODEL.into(),
        prompt: Some(qwen_proto::serve::generate_request::Prompt::Text("Pick".into())),
        options: Some(GenerationOptions {
            max_tokens: Some(20),
            constraint: Some(qwen_proto::serve::Constraint {
                kind: Some(qwen_proto::serve::constraint::Kind::Choice(qwen_proto::serve::Choices {
                    choices: vec!["red".into(), "green".into()],
                })),
            }),
            ..Default::default()
        }),
    };
    let resp = c.generate(request.clone()).await.unwrap().into_inner();
    assert!(resp.text == "red" || resp.text == "green", "{resp:?}");
    let mut bad = request;
    bad.options.as_mut().unwrap().constraint =
        Some(qwen_proto::serve::Constraint { kind: Some(qwen_proto::serve::constraint::Kind::Regex("(".into())) });
    let e = c.generate(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("options.constraint.regex"), "{}", e.message());
}
