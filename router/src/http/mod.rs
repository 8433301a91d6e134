//! The OpenAI-compatible HTTP API (axum): /v1/completions, /v1/chat/completions (both with
//! `stream: true` as server-sent events ending in `data: [DONE]`), /v1/models, /health. Errors use
//! OpenAI's JSON shape and status codes. Requests become [`Prompt`] + [`Options`] here; checks
//! happen in `validate`, as for gRPC.

pub mod chat;
pub mod types;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Router as Routes;
use futures::stream::{self, Stream, StreamExt};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::auth::{Caller, Denied, Gate};
use crate::conn::{BodyLimits, ConnConfig, Limited};

use crate::agent::TurnOptions;
use crate::error::{ErrorKind, RouterError};
use crate::generate::{Chunk, Collected, Generation, Job, RequestMeta, Router, RouterScrape, Started, TokenLogprob};
use crate::metrics::Api as Endpoint;
use crate::models::ModelInfo;
use crate::template::Role;
use crate::validate::{completion_extras, CompletionExtras, Options, Prompt};
use qwen_telemetry::TraceContext;
use types::{
    ChatChoice, ChatChunkChoice, ChatLogprobs, ChatRequest, ChatTokenLogprob, CompletionChoice, CompletionLogprobs,
    CompletionRequest, Delta, ErrorBody, ErrorDetail, FinishReason, ModelCard, ModelList, PromptInput, Sampling,
    StopInput, StreamError, TopLogprob, Usage,
};

pub struct HttpConfig {
    pub router: Arc<Router>,
    pub body: BodyLimits,
    /// API keys; `None`: the API is open.
    pub gate: Option<Arc<Gate>>,
}

pub async fn serve(listener: Limited, cfg: HttpConfig, conn: ConnConfig, cancel: CancellationToken) {
    crate::conn::serve_http(listener, routes(cfg), conn, cancel).await;
}

pub fn routes(cfg: HttpConfig) -> Routes {
    let body = cfg.body;
    let api = Routes::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models));
    let health = Routes::new().route("/health", get(health));
    let metrics = qwen_telemetry::exposition::route(Arc::new(RouterScrape(cfg.router.clone())));
    let (api, health, metrics) = match &cfg.gate {
        Some(gate) => {
            let open = gate.open();
            (
                with_key(api, gate.clone()),
                if open.health { health } else { with_key(health, gate.clone()) },
                if open.metrics { metrics } else { with_key(metrics, gate.clone()) },
            )
        }
        None => (api, health, metrics),
    };
    api.merge(health)
        .merge(metrics)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route", None) })
        .layer(axum::middleware::from_fn(move |request, next| crate::conn::read_body(body, request, next)))
        .layer(DefaultBodyLimit::max(body.max_bytes))
        .with_state(cfg.router)
}

/// `routes` answer only requests with a valid API key (401 otherwise, 429 over the key's
/// request rate); handlers find the [`Caller`] among the request's extensions.
fn with_key<S: Clone + Send + Sync + 'static>(routes: Routes<S>, gate: Arc<Gate>) -> Routes<S> {
    routes.route_layer(axum::middleware::from_fn(
        move |mut request: axum::extract::Request, next: axum::middleware::Next| {
            let gate = gate.clone();
            async move {
                let presented = request.headers().get(axum::http::header::AUTHORIZATION).map(|v| v.as_bytes());
                match gate.admit(presented, crate::metrics::Port::Http) {
                    Ok(caller) => {
                        request.extensions_mut().insert(caller);
                        next.run(request).await
                    }
                    Err(e) => ApiError::from(e).into_response(),
                }
            }
        },
    ))
}

/// An error in OpenAI's shape.
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>, param: Option<String>) -> Self {
        ApiError {
            status,
            body: ErrorBody { error: ErrorDetail { message: message.into(), kind, param, code: None } },
            retry_after: None,
        }
    }
}

impl ApiError {
    #[cfg(test)]
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// An `invalid_request_error` with `status` (for the transport's refusals: 408, 413, ...).
    pub fn plain(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError::new(status, "invalid_request_error", message, None)
    }
}

impl From<RouterError> for ApiError {
    fn from(e: RouterError) -> Self {
        let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = match e.kind() {
            ErrorKind::InvalidArgument | ErrorKind::NotFound | ErrorKind::Unauthenticated => "invalid_request_error",
            ErrorKind::Overloaded => "rate_limit_error",
            ErrorKind::Unavailable | ErrorKind::DeadlineExceeded | ErrorKind::Internal => "server_error",
        };
        let mut err = ApiError::new(status, kind, e.to_string(), e.param().map(str::to_string));
        // OpenAI's codes where a client library looks for them.
        let code = match &e {
            RouterError::Denied(Denied::Missing | Denied::Invalid) => "invalid_api_key",
            RouterError::Denied(Denied::RateLimited { .. }) => "rate_limit_exceeded",
            _ => e.kind().as_str(),
        };
        err.body.error.code = Some(code.to_string());
        err.retry_after = e.retry_after().map(crate::auth::retry_secs);
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert("retry-after", s.into());
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert("www-authenticate", axum::http::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// The body as JSON, with OpenAI-shaped errors for oversized and malformed bodies; a value of
/// the wrong shape names its field (`messages[0].role`) as `param`. Only `application/json`
/// bodies without a content encoding are read (415 otherwise): a cross-site form post or a
/// gzip body is refused, not parsed.
fn parse<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let unsupported = |message: String, param: &str| {
        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error", message, Some(param.into()))
    };
    let content_type = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if !essence.eq_ignore_ascii_case("application/json") {
        return Err(unsupported("the body must be JSON with Content-Type: application/json".into(), "Content-Type"));
    }
    if let Some(encoding) = headers.get(axum::http::header::CONTENT_ENCODING) {
        if !encoding.to_str().is_ok_and(|e| e.trim().eq_ignore_ascii_case("identity")) {
            return Err(unsupported("compressed bodies are not accepted".into(), "Content-Encoding"));
        }
    }
    let bytes = body.map_err(|r| ApiError::new(r.status(), "invalid_request_error", r.body_text(), None))?;
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let param = (path != ".").then_some(path);
        let at = param.as_deref().map(|p| format!(" at {p}")).unwrap_or_default();
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("invalid JSON body{at}: {}", e.inner()),
            param,
        )
    })
}

fn refuse_unsupported(s: &Sampling) -> Result<(), ApiError> {
    match s.unsupported_field() {
        Some(field) => {
            // Named as `param`: printable ASCII, cut short (the key is the client's).
            let name: String = field.chars().filter(char::is_ascii_graphic).take(64).collect();
            Err(RouterError::invalid(name, "is not supported by this server").into())
        }
        None => Ok(()),
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The fields both endpoints share, as [`Options`]: unsupported fields refused first, then
/// everything moved over (`stop` included); each endpoint sets its own spelling of the rest.
fn options(s: Sampling, headers: &HeaderMap) -> Result<Options, ApiError> {
    refuse_unsupported(&s)?;
    let session_key = headers.get("x-session-key").and_then(|v| v.to_str().ok()).map(str::to_string).or(s.user);
    Ok(Options {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        max_tokens: s.max_tokens,
        stop: s.stop.map(StopInput::into_vec).unwrap_or_default(),
        stop_token_ids: s.stop_token_ids,
        ignore_eos: s.ignore_eos,
        logprobs: false,
        top_logprobs: 0,
        session_key,
        constraint: s.structured.constraint()?,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    /// `logprobs`: Some(top-N) when the client asked for logprobs.
    Completions {
        logprobs: Option<u32>,
    },
    Chat {
        logprobs: bool,
        agent: crate::agent::request::AgentRequest,
    },
}

impl Api {
    fn object(self, chunk: bool) -> &'static str {
        match (self, chunk) {
            (Api::Completions { .. }, _) => "text_completion",
            (Api::Chat { .. }, false) => "chat.completion",
            (Api::Chat { .. }, true) => "chat.completion.chunk",
        }
    }
}

/// How a request wants its answer.
pub(crate) struct Reply {
    api: Api,
    stream: bool,
    include_usage: bool,
    /// The offered tools' parameter types, for the tool-call parser.
    schemas: Arc<crate::agent::ToolSchemas>,
}

impl Reply {
    fn new(api: Api, s: &Sampling) -> Self {
        let include_usage = s.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Reply { api, stream: s.stream, include_usage, schemas: Default::default() }
    }
}

async fn completions(
    State(router): State<Arc<Router>>,
    caller: Option<Extension<Arc<Caller>>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let (job, reply) = completion_job(&headers, body)?;
    let caller = caller.map(|Extension(c)| c);
    run(&router, caller, Endpoint::HttpCompletions, &headers, job, reply).await
}

/// A /v1/completions body as a job for the router (or a 4xx).
pub(crate) fn completion_job(
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(Job, Reply), ApiError> {
    let req: CompletionRequest = parse(headers, body)?;
    let n = req.sampling.n.unwrap_or(1);
    let reply = Reply::new(Api::Completions { logprobs: req.logprobs }, &req.sampling);
    let mut opts = options(req.sampling, headers)?;
    let (prompt, batch) = match req.prompt {
        PromptInput::Text(t) => (Some(Prompt::Text(t)), None),
        PromptInput::Ids(ids) => (Some(Prompt::Ids(ids)), None),
        PromptInput::TextBatch(mut v) => (v.pop().map(Prompt::Text), Some(v.len() + 1)),
        PromptInput::IdsBatch(mut v) => (v.pop().map(Prompt::Ids), Some(v.len() + 1)),
    };
    let extras = CompletionExtras { echo: req.echo, suffix: req.suffix.as_deref(), best_of: req.best_of, n, batch };
    let prompt = completion_extras(extras)
        .and_then(|()| prompt.ok_or_else(|| RouterError::invalid("prompt", "must not be an empty list")));
    // OpenAI's completions default is 16 tokens.
    opts.max_tokens = Some(opts.max_tokens.unwrap_or(16));
    if let Some(n) = req.logprobs {
        opts.logprobs = true;
        opts.top_logprobs = n;
    }
    Ok((Job { model: req.model, prompt, options: opts, n }, reply))
}

async fn chat_completions(
    State(router): State<Arc<Router>>,
    caller: Option<Extension<Arc<Caller>>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let (job, reply) = chat_job(&headers, body)?;
    let caller = caller.map(|Extension(c)| c);
    run(&router, caller, Endpoint::HttpChat, &headers, job, reply).await
}

/// A /v1/chat/completions body as a job for the router (or a 4xx).
pub(crate) fn chat_job(
    headers: &HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(Job, Reply), ApiError> {
    let mut req: ChatRequest = parse(headers, body)?;
    let n = req.sampling.n.unwrap_or(1);
    let (chat, mut agent, forced) = chat::chat_prompt(&mut req)?;
    let schemas = Arc::new(crate::agent::ToolSchemas::from_tools(chat.tools.as_deref().unwrap_or_default()));
    let mut reply = Reply::new(Api::Chat { logprobs: req.logprobs, agent }, &req.sampling);
    let mut opts = options(req.sampling, headers)?;
    crate::structured::force_call(&mut opts.constraint, forced)?;
    agent.constrained = opts.constraint.is_some();
    reply.api = Api::Chat { logprobs: req.logprobs, agent };
    reply.schemas = schemas;
    opts.max_tokens = req.max_completion_tokens.or(opts.max_tokens);
    opts.logprobs = req.logprobs;
    opts.top_logprobs = req.top_logprobs.unwrap_or(0);
    Ok((Job { model: req.model, prompt: Ok(Prompt::Chat(chat)), options: opts, n }, reply))
}

/// Both endpoints' common tail: start the job through the router's one entry point, then
/// answer in one body or as a stream.
async fn run(
    router: &Arc<Router>,
    caller: Option<Arc<Caller>>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    job: Job,
    reply: Reply,
) -> Result<Response, ApiError> {
    let name = job.model.clone();
    let meta = RequestMeta::new(endpoint, TraceContext::from_headers(headers), deadline(headers)?).with_caller(caller);
    let Started { model, generations } = router.start(job, meta).await?;
    let id = generations.first().map(|g| g.id.clone()).unwrap_or_default();
    let groups: Vec<&str> = generations.iter().map(|g| g.group.as_ref()).collect();
    let group_header =
        router.cfg.expose_group.then(|| axum::http::HeaderValue::from_str(&groups.join(",")).ok()).flatten();
    let head = Head { api: reply.api, id, created: now(), name };
    // Each chat choice's parsing: the model's formats, and whether its prompt opened `<think>`.
    let turns: Vec<Option<TurnOptions>> = generations
        .iter()
        .map(|g| match reply.api {
            Api::Chat { agent, .. } => Some(agent.turn_options(&model, &g.prompt, reply.schemas.clone())),
            Api::Completions { .. } => None,
        })
        .collect();
    let mut response = if reply.stream {
        let cfg = SseConfig { head, model, include_usage: reply.include_usage };
        Sse::new(sse(cfg, generations, turns)).into_response()
    } else {
        let collected = futures::future::try_join_all(generations.into_iter().map(Generation::collect)).await?;
        whole(&head, &model, collected, &turns)
    };
    if let Some(v) = group_header {
        response.headers_mut().insert(crate::grpc::GROUP_HEADER, v);
    }
    Ok(response)
}

/// The header a client bounds its request's total time with, in seconds (like gRPC's
/// `grpc-timeout`): past it the request ends 504 / with a stream error, and the worker drops it.
pub const TIMEOUT_HEADER: &str = "x-request-timeout";

fn deadline(headers: &HeaderMap) -> Result<Option<std::time::Instant>, ApiError> {
    let Some(v) = headers.get(TIMEOUT_HEADER) else { return Ok(None) };
    let secs = v.to_str().ok().and_then(|s| s.trim().parse::<f64>().ok()).filter(|s| s.is_finite() && *s > 0.0);
    let Some(secs) = secs else {
        return Err(RouterError::invalid(TIMEOUT_HEADER, "must be a positive number of seconds").into());
    };
    Ok(std::time::Instant::now().checked_add(std::time::Duration::from_secs_f64(secs.min(1e9))))
}

/// What every response and chunk of one request repeats.
struct Head {
    api: Api,
    id: String,
    created: u64,
    name: String,
}

impl Head {
    fn body<C>(&self, chunk: bool, choices: Vec<C>, usage: Option<crate::generate::Usage>) -> types::Response<C> {
        types::Response {
            id: self.id.clone(),
            object: self.api.object(chunk),
            created: self.created,
            model: self.name.clone(),
            choices,
            usage: usage.map(Usage::from),
        }
    }
}

fn whole(head: &Head, model: &ModelInfo, collected: Vec<Collected>, turns: &[Option<TurnOptions>]) -> Response {
    let mut usage = crate::generate::Usage::default();
    for c in &collected {
        usage.add_choice(c.usage);
    }
    let choices = collected.into_iter().enumerate();
    match head.api {
        Api::Completions { logprobs } => {
            let choices: Vec<CompletionChoice> = choices
                .map(|(index, c)| CompletionChoice {
                    index,
                    logprobs: logprobs.map(|_| completion_logprobs(model, &c.logprobs, &mut 0)),
                    text: c.text,
                    finish_reason: c.finish.map(FinishReason::from),
                    token_ids: c.token_ids,
                })
                .collect();
            axum::Json(head.body(false, choices, Some(usage))).into_response()
        }
        Api::Chat { logprobs, .. } => {
            let choices: Vec<ChatChoice> = choices
                .map(|(index, c)| {
                    let opts = turns.get(index).cloned().flatten().unwrap_or_default();
                    let (message, finish_reason) = chat::message_out(&opts, &c.text, c.finish.map(FinishReason::from));
                    ChatChoice {
                        index,
                        logprobs: logprobs.then(|| chat_logprobs(model, &c.logprobs)),
                        message,
                        finish_reason,
                        token_ids: c.token_ids,
                    }
                })
                .collect();
            axum::Json(head.body(false, choices, Some(usage))).into_response()
        }
    }
}

fn token_text(model: &ModelInfo, id: u32) -> String {
    model.tokenizer.as_ref().and_then(|t| t.decode(&[id]).ok()).unwrap_or_default()
}

/// The completions API's logprobs of `l`, whose first token starts at byte `*offset` of the
/// completion; `*offset` moves past them (a stream carries it from chunk to chunk).
fn completion_logprobs(model: &ModelInfo, l: &[TokenLogprob], offset: &mut usize) -> CompletionLogprobs {
    let tokens: Vec<String> = l.iter().map(|t| token_text(model, t.token_id)).collect();
    let text_offset = tokens
        .iter()
        .map(|t| {
            let at = *offset;
            *offset += t.len();
            at
        })
        .collect();
    CompletionLogprobs {
        token_logprobs: l.iter().map(|t| t.logprob).collect(),
        top_logprobs: l
            .iter()
            .map(|t| t.top.iter().map(|(id, lp)| (token_text(model, *id), (*lp).into())).collect())
            .collect(),
        tokens,
        text_offset,
    }
}

fn chat_logprobs(model: &ModelInfo, l: &[TokenLogprob]) -> ChatLogprobs {
    let top = |id: u32, logprob: f32| {
        let token = token_text(model, id);
        TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob }
    };
    let content = l
        .iter()
        .map(|t| {
            let TopLogprob { token, logprob, bytes } = top(t.token_id, t.logprob);
            let top_logprobs = t.top.iter().map(|(id, lp)| top(*id, *lp)).collect();
            ChatTokenLogprob { token, logprob, bytes, top_logprobs }
        })
        .collect();
    ChatLogprobs { content }
}

struct SseConfig {
    head: Head,
    model: Arc<ModelInfo>,
    include_usage: bool,
}

fn data(value: &impl Serialize) -> Event {
    Event::default().data(serde_json::to_string(value).unwrap_or_default())
}

/// One choice's stream state: the role still to announce (chat), the byte offset of its next
/// token in the completion (completions' `text_offset`), and whether it has finished.
struct ChoiceState {
    generation: Generation,
    role_pending: bool,
    offset: usize,
    done: bool,
    /// A chat choice's parser.
    turn: Option<chat::StreamTurn>,
}

/// Each choice's chunks as SSE events, interleaved as they come, then the usage chunk (when
/// asked) and `[DONE]`. Dropping the stream (client gone) drops the generations, which cancels
/// them on the workers.
fn sse(
    cfg: SseConfig,
    gens: Vec<Generation>,
    turns: Vec<Option<TurnOptions>>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let cfg = Arc::new(cfg);
    let usage = Arc::new(std::sync::Mutex::new(crate::generate::Usage::default()));
    let (choice_cfg, choice_usage) = (cfg.clone(), usage.clone());
    let per_choice = gens.into_iter().zip(turns).enumerate().map(move |(i, (generation, turn))| {
        let (cfg, usage) = (choice_cfg.clone(), choice_usage.clone());
        let role_pending = matches!(cfg.head.api, Api::Chat { .. });
        let turn = turn.map(chat::StreamTurn::new);
        let state = ChoiceState { generation, role_pending, offset: 0, done: false, turn };
        stream::unfold(state, move |mut st| {
            let (cfg, usage) = (cfg.clone(), usage.clone());
            async move {
                if st.done {
                    return None;
                }
                let item = st.generation.next().await?;
                st.done = !matches!(item, Ok(Chunk::Delta { .. }));
                let event = match item {
                    Ok(chunk) => chunk_event(&cfg, i, chunk, &mut st, &usage),
                    Err(e) => data(&StreamError { error: ApiError::from(e).body.error }),
                };
                Some((Ok(event), st))
            }
        })
        .boxed()
    });
    let tail = stream::once(async move {
        let u = *usage.lock().unwrap_or_else(|p| p.into_inner());
        cfg.include_usage.then(|| Ok(data(&cfg.head.body::<CompletionChoice>(true, vec![], Some(u)))))
    })
    .filter_map(|e| async move { e })
    .chain(stream::once(async { Ok(Event::default().data("[DONE]")) }));
    stream::select_all(per_choice).chain(tail)
}

/// One chunk of choice `index` as its API's stream event.
fn chunk_event(
    cfg: &SseConfig,
    index: usize,
    chunk: Chunk,
    st: &mut ChoiceState,
    usage: &std::sync::Mutex<crate::generate::Usage>,
) -> Event {
    let (text, token_ids, logprobs, finish) = match chunk {
        Chunk::Delta { text, token_ids, logprobs } => (text, token_ids, logprobs, None),
        Chunk::Done { finish, usage: u } => {
            usage.lock().unwrap_or_else(|p| p.into_inner()).add_choice(u);
            (String::new(), Vec::new(), Vec::new(), Some(FinishReason::from(finish)))
        }
    };
    match cfg.head.api {
        Api::Completions { logprobs: want } => {
            let logprobs = want
                .filter(|_| !logprobs.is_empty())
                .map(|_| completion_logprobs(&cfg.model, &logprobs, &mut st.offset));
            let choice = CompletionChoice { index, text, logprobs, finish_reason: finish, token_ids };
            data(&cfg.head.body(true, vec![choice], None))
        }
        Api::Chat { logprobs: want, .. } => {
            let role = std::mem::take(&mut st.role_pending).then_some(Role::Assistant);
            let (delta, finish) = match &mut st.turn {
                Some(turn) => {
                    let pieces = if finish.is_some() { turn.parser.finish() } else { turn.parser.push(&text) };
                    (chat::delta(pieces, role), finish.map(|f| turn.finish_reason(f)))
                }
                None => (Delta { role, content: finish.is_none().then_some(text), ..Delta::default() }, finish),
            };
            let logprobs = (want && !logprobs.is_empty()).then(|| chat_logprobs(&cfg.model, &logprobs));
            let choice = ChatChunkChoice { index, delta, logprobs, finish_reason: finish, token_ids };
            data(&cfg.head.body(true, vec![choice], None))
        }
    }
}

async fn models(State(router): State<Arc<Router>>) -> Response {
    let data = router
        .pool
        .models()
        .into_iter()
        .map(|(m, _)| ModelCard {
            id: m.name.clone(),
            object: "model",
            created: m.learned_at,
            owned_by: "qwen-serve",
            max_model_len: m.max_context,
        })
        .collect();
    axum::Json(ModelList { object: "list", data }).into_response()
}

async fn health(State(router): State<Arc<Router>>) -> Response {
    if router.pool.models().is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, "no healthy worker group\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}
