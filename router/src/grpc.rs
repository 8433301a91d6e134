//! The public gRPC API (`qwen.serve.v1.Generation`) over [`Router`]; request checks live in
//! `validate`, this file maps messages.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qwen_proto::serve::generation_server::Generation as GenerationApi;
use qwen_proto::serve::{
    generate_request, ChatRequest, Constraint as PbConstraint, FinishReason as PbFinish, GenerateRequest,
    GenerateResponse, GenerateStreamResponse, GenerationOptions, ListModelsRequest, ListModelsResponse, Model,
    TokenLogprob as PbLogprob, TokenizeRequest, TokenizeResponse, ToolCall as PbToolCall,
    ToolCallDelta as PbToolCallDelta, ToolChoice as PbToolChoice, TopLogprob, Usage as PbUsage,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::agent::request::{chat_request, AgentRequest, CallIn, ChatIn, MessageIn, ToolChoiceIn};
use crate::agent::{Piece, ToolSchemas, Turn, TurnOptions, TurnParser};
use crate::auth::{Caller, Gate};
use crate::error::RouterError;
use crate::generate::{Chunk, Finish, Generation, Job, RequestMeta, Router, TokenLogprob, Usage};
use crate::metrics::Api;
use crate::models::ModelInfo;
use crate::structured::ConstraintSpec;
use crate::validate::{role, Options, Prompt};
use qwen_telemetry::TraceContext;

pub struct PublicService {
    router: Arc<Router>,
}

impl PublicService {
    pub fn new(router: Arc<Router>) -> Self {
        PublicService { router }
    }

    async fn start(&self, meta: RequestMeta, job: Job) -> Result<(Arc<ModelInfo>, Generation), Status> {
        let mut started = self.router.start(job, meta).await.map_err(|e| e.to_status())?;
        let generation = started.generations.pop().ok_or_else(|| Status::internal("no generation started"))?;
        Ok((started.model, generation))
    }

    /// A chat request started, with how its answer is parsed (no reasoning where constrained).
    async fn start_chat(&self, meta: RequestMeta, mut r: ChatRequest) -> Result<(Generation, TurnOptions), Status> {
        let ChatJob { prompt, mut agent, schemas, forced } = chat_job(&mut r);
        let job = job(&r.model, prompt, r.options, forced);
        agent.constrained = job.options.constraint.is_some();
        let (model, generation) = self.start(meta, job).await?;
        let turn = agent.turn_options(&model, &generation.prompt, schemas);
        Ok((generation, turn))
    }
}

/// A job for the router; `forced` is the call a chat's `tool_choice` forces. Option errors travel
/// in the prompt's place, so they are reported like every other refusal.
pub(crate) fn job(
    model: &str,
    prompt: Result<Prompt, RouterError>,
    options: Option<GenerationOptions>,
    forced: Option<ConstraintSpec>,
) -> Job {
    let options = options.map(self::options).transpose().and_then(|o| {
        let mut o = o.unwrap_or_default();
        crate::structured::force_call(&mut o.constraint, forced)?;
        Ok(o)
    });
    let (prompt, options) = match options {
        Ok(o) => (prompt, o),
        Err(e) => (Err(e), Options::default()),
    };
    Job { model: model.to_string(), prompt, options, n: 1 }
}

/// The public `Constraint` as the worker's, checked.
fn constraint(c: PbConstraint) -> Result<Option<ConstraintSpec>, RouterError> {
    use qwen_proto::serve::constraint::Kind as Pb;
    use qwen_proto::worker::constraint::Kind;
    let (field, kind) = match c.kind {
        None => return Ok(None),
        Some(Pb::JsonSchema(s)) => ("options.constraint.json_schema", Kind::JsonSchema(s)),
        Some(Pb::JsonObject(b)) => ("options.constraint.json_object", Kind::JsonObject(b)),
        Some(Pb::Regex(s)) => ("options.constraint.regex", Kind::Regex(s)),
        Some(Pb::Choice(c)) => {
            ("options.constraint.choice", Kind::Choice(qwen_proto::worker::Choices { choices: c.choices }))
        }
        Some(Pb::Grammar(s)) => ("options.constraint.grammar", Kind::Lark(s)),
    };
    let spec = ConstraintSpec::Grammar {
        field: field.into(),
        constraint: qwen_proto::worker::Constraint { kind: Some(kind) },
    };
    crate::structured::check(&spec)?;
    Ok(Some(spec))
}

fn options(o: GenerationOptions) -> Result<Options, RouterError> {
    let s = o.sampling.unwrap_or_default();
    Ok(Options {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        max_tokens: o.max_tokens,
        stop: o.stop,
        stop_token_ids: o.stop_token_ids,
        ignore_eos: o.ignore_eos,
        logprobs: o.logprobs,
        top_logprobs: o.top_logprobs,
        session_key: Some(o.session_key),
        constraint: o.constraint.map(constraint).transpose()?.flatten(),
    })
}

pub(crate) fn generate_prompt(p: Option<generate_request::Prompt>) -> Result<Prompt, RouterError> {
    match p {
        Some(generate_request::Prompt::Text(t)) => Ok(Prompt::Text(t)),
        Some(generate_request::Prompt::TokenIds(ids)) => Ok(Prompt::Ids(ids.ids)),
        None => Err(RouterError::invalid("prompt", "give text or token_ids")),
    }
}

/// A chat request's prompt, what to parse from its answer, and its tools' parameter types.
pub(crate) struct ChatJob {
    pub prompt: Result<Prompt, RouterError>,
    pub agent: AgentRequest,
    pub schemas: Arc<ToolSchemas>,
    /// The call `tool_choice` forces.
    pub forced: Option<ConstraintSpec>,
}

/// The chat of `r` (its messages, tools and template variables taken).
pub(crate) fn chat_job(r: &mut ChatRequest) -> ChatJob {
    let parsed = chat_in(r).and_then(|c| {
        let schemas = Arc::new(ToolSchemas::from_tools(c.tools.as_deref().unwrap_or_default()));
        chat_request(c).map(|(chat, agent, forced)| (chat, agent, schemas, forced))
    });
    match parsed {
        Ok((chat, agent, schemas, forced)) => ChatJob { prompt: Ok(Prompt::Chat(chat)), agent, schemas, forced },
        Err(e) => ChatJob { prompt: Err(e), agent: AgentRequest::default(), schemas: Default::default(), forced: None },
    }
}

fn chat_in(r: &mut ChatRequest) -> Result<ChatIn, RouterError> {
    let messages = std::mem::take(&mut r.messages)
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            Ok(MessageIn {
                role: role(i, &m.role)?,
                content: m.content,
                tool_calls: (!m.tool_calls.is_empty()).then(|| {
                    m.tool_calls
                        .into_iter()
                        .map(|c| CallIn { id: Some(c.id), kind: None, name: c.name, arguments: c.arguments })
                        .collect()
                }),
                tool_call_id: (!m.tool_call_id.is_empty()).then_some(m.tool_call_id),
                reasoning_content: (!m.reasoning_content.is_empty()).then_some(m.reasoning_content),
            })
        })
        .collect::<Result<_, RouterError>>()?;
    let tools = std::mem::take(&mut r.tools)
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            let mut function = serde_json::json!({"name": t.name, "description": t.description});
            if !t.parameters_json.is_empty() {
                function["parameters"] = serde_json::from_str(&t.parameters_json).map_err(|e| {
                    RouterError::invalid(format!("tools[{i}].parameters_json"), format!("is not JSON: {e}"))
                })?;
            }
            Ok(serde_json::json!({"type": "function", "function": function}))
        })
        .collect::<Result<Vec<_>, RouterError>>()?;
    let kwargs = match r.chat_template_kwargs_json.as_str() {
        "" => serde_json::Map::new(),
        text => serde_json::from_str(text)
            .map_err(|e| RouterError::invalid("chat_template_kwargs_json", format!("is not a JSON object: {e}")))?,
    };
    let tool_choice = match PbToolChoice::try_from(r.tool_choice) {
        Ok(PbToolChoice::Auto) => None,
        Ok(PbToolChoice::None) => Some(ToolChoiceIn::None),
        Ok(PbToolChoice::Required) => Some(ToolChoiceIn::Required),
        Err(_) => Some(ToolChoiceIn::Invalid),
    };
    let tool_choice = match std::mem::take(&mut r.tool_choice_function) {
        name if name.is_empty() => tool_choice,
        name => Some(ToolChoiceIn::Named(name)),
    };
    Ok(ChatIn { messages, tools: Some(tools), tool_choice, single_call: r.single_tool_call, kwargs })
}

/// Trace context, deadline and the API key's holder (put there by [`KeyCheck`]) from the request.
fn request_meta<T>(request: &Request<T>, api: Api) -> RequestMeta {
    let caller = request.extensions().get::<Arc<Caller>>().cloned();
    RequestMeta::new(api, TraceContext::from_metadata(request.metadata()), deadline(request)).with_caller(caller)
}

/// The API-key check in front of a gRPC service (`authorization: Bearer <key>` metadata);
/// with no gate, requests pass unchanged.
#[derive(Clone)]
pub struct KeyCheck(pub Option<Arc<Gate>>);

impl tonic::service::Interceptor for KeyCheck {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let Some(gate) = &self.0 else { return Ok(request) };
        let presented = request.metadata().get("authorization").map(|v| v.as_bytes());
        let caller = gate.admit(presented, crate::metrics::Port::Grpc).map_err(|e| e.to_status())?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// The client's `grpc-timeout` header as a deadline (units per the gRPC HTTP/2 spec).
pub fn deadline<T>(request: &Request<T>) -> Option<Instant> {
    let raw = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = raw.split_at(raw.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    Instant::now().checked_add(d)
}

fn finish(f: Finish) -> i32 {
    match f {
        Finish::Length => PbFinish::Length as i32,
        Finish::Stop => PbFinish::Stop as i32,
    }
}

/// A chat answer's finish: tool calls when the turn made them and stopped on its own.
fn finish_after(f: Finish, called: bool) -> i32 {
    if called && f == Finish::Stop {
        PbFinish::ToolCalls as i32
    } else {
        finish(f)
    }
}

fn usage(u: Usage) -> PbUsage {
    PbUsage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        cached_prompt_tokens: u.cached_prompt_tokens,
    }
}

fn logprobs(l: Vec<TokenLogprob>) -> Vec<PbLogprob> {
    l.into_iter()
        .map(|t| PbLogprob {
            token_id: t.token_id,
            logprob: t.logprob,
            top_logprobs: t.top.into_iter().map(|(token_id, logprob)| TopLogprob { token_id, logprob }).collect(),
        })
        .collect()
}

/// Response metadata naming the group that served the request.
pub const GROUP_HEADER: &str = "x-qwen-serve-group";

impl PublicService {
    /// `response`, naming the group that served it when `--expose-group` says so.
    fn with_group<T>(&self, mut response: Response<T>, group: &str) -> Response<T> {
        if let Some(v) = self.router.cfg.expose_group.then(|| group.parse().ok()).flatten() {
            response.metadata_mut().insert(GROUP_HEADER, v);
        }
        response
    }

    async fn unary(
        &self,
        model: String,
        generation: Generation,
        turn: Option<TurnOptions>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let group = generation.group.clone();
        Ok(self.with_group(unary(model, generation, turn).await?, &group))
    }

    fn streaming(&self, generation: Generation, turn: Option<TurnOptions>) -> Response<ChunkStream> {
        let group = generation.group.clone();
        self.with_group(Response::new(streaming(generation, turn)), &group)
    }
}

async fn unary(
    model: String,
    generation: Generation,
    turn: Option<TurnOptions>,
) -> Result<Response<GenerateResponse>, Status> {
    let id = generation.id.clone();
    let prompt_token_ids = generation.prompt.clone();
    let c = generation.collect().await.map_err(|e| e.to_status())?;
    let mut response = GenerateResponse {
        id,
        model,
        token_ids: c.token_ids,
        finish_reason: c.finish.map_or(0, finish),
        usage: Some(usage(c.usage)),
        logprobs: logprobs(c.logprobs),
        prompt_token_ids,
        ..Default::default()
    };
    match turn {
        Some(opts) => {
            let t = Turn::parse(&opts, &c.text);
            response.finish_reason = c.finish.map_or(0, |f| finish_after(f, !t.calls.is_empty()));
            response.text = t.content.unwrap_or_default();
            response.reasoning_text = t.reasoning.unwrap_or_default();
            response.tool_calls =
                t.calls.into_iter().map(|c| PbToolCall { id: c.id, name: c.name, arguments: c.arguments }).collect();
        }
        None => response.text = c.text,
    }
    Ok(Response::new(response))
}

/// A chat stream message's text, reasoning and call pieces.
fn fill(msg: &mut GenerateStreamResponse, pieces: Vec<Piece>) {
    for p in pieces {
        match p {
            Piece::Content(s) => msg.text.push_str(&s),
            Piece::Reasoning(s) => msg.reasoning_text.push_str(&s),
            Piece::CallStart { index, id, name } => {
                msg.tool_calls.push(PbToolCallDelta { index: index as u32, id, name, arguments: String::new() })
            }
            Piece::CallArgs { index, text } => {
                msg.tool_calls.push(PbToolCallDelta { index: index as u32, arguments: text, ..Default::default() })
            }
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

fn streaming(mut generation: Generation, turn: Option<TurnOptions>) -> ChunkStream {
    let id = generation.id.clone();
    let mut parser = turn.map(TurnParser::new);
    Box::pin(async_stream(move |tx| async move {
        while let Some(chunk) = generation.next().await {
            let msg = match chunk {
                Ok(Chunk::Delta { text, token_ids, logprobs: l }) => {
                    let mut msg = GenerateStreamResponse {
                        id: id.clone(),
                        token_ids,
                        logprobs: logprobs(l),
                        ..Default::default()
                    };
                    match &mut parser {
                        Some(p) => fill(&mut msg, p.push(&text)),
                        None => msg.text = text,
                    }
                    Ok(msg)
                }
                Ok(Chunk::Done { finish: f, usage: u }) => {
                    let mut msg = GenerateStreamResponse {
                        id: id.clone(),
                        finish_reason: finish(f),
                        usage: Some(usage(u)),
                        ..Default::default()
                    };
                    if let Some(p) = &mut parser {
                        fill(&mut msg, p.finish());
                        msg.finish_reason = finish_after(f, p.called());
                    }
                    Ok(msg)
                }
                Err(e) => Err(e.to_status()),
            };
            if tx.send(msg).await.is_err() {
                return; // client gone: dropping `generation` cancels the worker's request
            }
        }
    }))
}

/// A stream fed by a task; the task stops when the receiver (the client's stream) is dropped.
fn async_stream<T, F, Fut>(body: F) -> tokio_stream::wrappers::ReceiverStream<T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[tonic::async_trait]
impl GenerationApi for PublicService {
    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        let meta = request_meta(&request, Api::GrpcGenerate);
        let r = request.into_inner();
        let job = job(&r.model, generate_prompt(r.prompt), r.options, None);
        let (_, generation) = self.start(meta, job).await?;
        self.unary(r.model, generation, None).await
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(&self, request: Request<GenerateRequest>) -> Result<Response<ChunkStream>, Status> {
        let meta = request_meta(&request, Api::GrpcGenerate);
        let r = request.into_inner();
        let job = job(&r.model, generate_prompt(r.prompt), r.options, None);
        let (_, generation) = self.start(meta, job).await?;
        Ok(self.streaming(generation, None))
    }

    async fn chat(&self, request: Request<ChatRequest>) -> Result<Response<GenerateResponse>, Status> {
        let meta = request_meta(&request, Api::GrpcChat);
        let r = request.into_inner();
        let name = r.model.clone();
        let (generation, turn) = self.start_chat(meta, r).await?;
        self.unary(name, generation, Some(turn)).await
    }

    type ChatStreamStream = ChunkStream;

    async fn chat_stream(&self, request: Request<ChatRequest>) -> Result<Response<ChunkStream>, Status> {
        let meta = request_meta(&request, Api::GrpcChat);
        let (generation, turn) = self.start_chat(meta, request.into_inner()).await?;
        Ok(self.streaming(generation, Some(turn)))
    }

    async fn tokenize(&self, request: Request<TokenizeRequest>) -> Result<Response<TokenizeResponse>, Status> {
        let r = request.into_inner();
        let model = self.router.pool.model(&r.model).map_err(|e| e.to_status())?;
        let token_ids = model
            .tokenizer("model")
            .and_then(|t| t.encode(&r.text, r.allow_special).map_err(|e| RouterError::invalid("text", e.to_string())))
            .map_err(|e| e.to_status())?;
        Ok(Response::new(TokenizeResponse { token_ids }))
    }

    async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let models = self
            .router
            .pool
            .models()
            .into_iter()
            .map(|(m, groups)| Model { id: m.name.clone(), max_context: m.max_context as u32, groups: groups as u32 })
            .collect();
        Ok(Response::new(ListModelsResponse { models }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_header() {
        let mut r = Request::new(());
        assert!(deadline(&r).is_none());
        r.metadata_mut().insert("grpc-timeout", "1500m".parse().unwrap());
        let d = deadline(&r).unwrap().saturating_duration_since(Instant::now());
        assert!(d > Duration::from_millis(1000) && d <= Duration::from_millis(1500), "{d:?}");
        r.metadata_mut().insert("grpc-timeout", "5x".parse().unwrap());
        assert!(deadline(&r).is_none());
        r.metadata_mut().insert("grpc-timeout", "".parse().unwrap());
        assert!(deadline(&r).is_none());
    }
}
