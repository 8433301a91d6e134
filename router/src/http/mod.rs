//! The OpenAI-compatible HTTP API (axum): /v1/completions, /v1/chat/completions (both with
//! `stream: true` as server-sent events ending in `data: [DONE]`), /v1/models, /health. Errors use
//! OpenAI's JSON shape and status codes. Requests become [`Prompt`] + [`Options`] here; checks
//! happen in `validate`, as for gRPC.

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
use axum::Router as Routes;
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::{ErrorKind, RouterError};
use crate::generate::{Chunk, Collected, Finish, Generation, RequestMeta, Router, TokenLogprob};
use crate::metrics::{Api as Endpoint, RouterScrape};
use crate::models::ModelInfo;
use crate::template::Message;
use crate::validate::{prepare, Options, Prompt};
use qwen_telemetry::TraceContext;
use types::{ChatRequest, CompletionRequest, ErrorBody, ErrorDetail, PromptInput, Sampling, Usage};

pub const MAX_N: u32 = 16;

pub struct HttpConfig {
    pub router: Arc<Router>,
    pub max_body_bytes: usize,
}

pub async fn serve(listener: TcpListener, cfg: HttpConfig, cancel: CancellationToken) {
    let app = routes(cfg);
    if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await {
        tracing::error!(error = %e, "HTTP server failed");
    }
}

pub fn routes(cfg: HttpConfig) -> Routes {
    Routes::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .merge(qwen_telemetry::exposition::route(Arc::new(RouterScrape(cfg.router.clone()))))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found_error", "no such route", None) })
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .with_state(cfg.router)
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

impl From<RouterError> for ApiError {
    fn from(e: RouterError) -> Self {
        let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = match e.kind() {
            ErrorKind::InvalidArgument | ErrorKind::NotFound => "invalid_request_error",
            ErrorKind::Overloaded => "rate_limit_error",
            ErrorKind::Unavailable | ErrorKind::DeadlineExceeded | ErrorKind::Internal => "server_error",
        };
        let mut err = ApiError::new(status, kind, e.to_string(), e.param().map(str::to_string));
        err.body.error.code = Some(e.kind().as_str().to_string());
        if let RouterError::Overloaded { retry_after } = &e {
            err.retry_after = Some(retry_after.as_secs().max(1));
        }
        err
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body)).into_response();
        if let Some(s) = self.retry_after {
            resp.headers_mut().insert("retry-after", s.into());
        }
        resp
    }
}

/// The body as JSON, with OpenAI-shaped errors for oversized and malformed bodies.
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| ApiError::new(r.status(), "invalid_request_error", r.body_text(), None))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", format!("invalid JSON body: {e}"), None)
    })
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    RouterError::invalid(field, message).into()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn options(s: &Sampling, headers: &HeaderMap) -> Options {
    let session_key =
        headers.get("x-session-key").and_then(|v| v.to_str().ok()).map(str::to_string).or_else(|| s.user.clone());
    Options {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        repetition_penalty: s.repetition_penalty,
        presence_penalty: s.presence_penalty,
        frequency_penalty: s.frequency_penalty,
        seed: s.seed,
        max_tokens: s.max_tokens,
        stop: Vec::new(),
        stop_token_ids: s.stop_token_ids.clone(),
        ignore_eos: s.ignore_eos,
        logprobs: false,
        top_logprobs: 0,
        session_key,
    }
}

/// What both endpoints run: `n` generations of one prompt.
struct Plan {
    model: Arc<ModelInfo>,
    prompt: Prompt,
    opts: Options,
    n: u32,
    meta: RequestMeta,
}

async fn start(router: &Arc<Router>, plan: Plan) -> Result<Vec<Generation>, ApiError> {
    if plan.n == 0 || plan.n > MAX_N {
        return Err(invalid("n", format!("{}: must be in 1..={MAX_N}", plan.n)));
    }
    let meta = plan.meta;
    let starts = (0..plan.n).map(|i| {
        let mut opts = plan.opts.clone();
        // Each choice its own sample, still reproducible for a given seed.
        opts.seed = opts.seed.map(|s| s.wrapping_add(i as u64));
        let prepared = prepare(plan.model.clone(), plan.prompt.clone(), opts)
            .inspect_err(|e| router.metrics.request(&plan.model.name, meta.api, Err(e)));
        async move { router.generate(prepared?, meta).await }
    });
    let results = futures::future::join_all(starts).await;
    results.into_iter().collect::<Result<Vec<_>, _>>().map_err(ApiError::from)
}

fn finish_str(f: Option<Finish>) -> Value {
    match f {
        Some(Finish::Length) => json!("length"),
        Some(Finish::Stop) => json!("stop"),
        None => Value::Null,
    }
}

fn token_text(model: &ModelInfo, id: u32) -> String {
    model.tokenizer.as_ref().and_then(|t| t.decode(&[id]).ok()).unwrap_or_default()
}

fn completion_logprobs(model: &ModelInfo, l: &[TokenLogprob], offset: usize) -> Value {
    let tokens: Vec<String> = l.iter().map(|t| token_text(model, t.token_id)).collect();
    let mut text_offset = Vec::with_capacity(tokens.len());
    let mut at = offset;
    for t in &tokens {
        text_offset.push(at);
        at += t.len();
    }
    json!({
        "tokens": tokens,
        "token_logprobs": l.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": l.iter().map(|t| t.top.iter().map(|(id, lp)| (token_text(model, *id), json!(lp))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

fn chat_logprobs(model: &ModelInfo, l: &[TokenLogprob]) -> Value {
    let entry = |id: u32, lp: f32| {
        let token = token_text(model, id);
        json!({"token": token, "logprob": lp, "bytes": token.as_bytes()})
    };
    let content: Vec<Value> = l
        .iter()
        .map(|t| {
            let mut e = entry(t.token_id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|(id, lp)| entry(*id, *lp)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

#[derive(Clone, Copy, PartialEq)]
enum Api {
    /// `logprobs`: Some(top-N) when the client asked for logprobs.
    Completions {
        logprobs: Option<u32>,
    },
    Chat {
        logprobs: bool,
    },
}

async fn completions(
    State(router): State<Arc<Router>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body)?;
    if req.echo {
        return Err(invalid("echo", "not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(invalid("suffix", "not supported"));
    }
    if req.best_of.is_some_and(|b| b != req.sampling.n.unwrap_or(1)) {
        return Err(invalid("best_of", "only best_of = n is supported"));
    }
    let prompt = match req.prompt {
        PromptInput::Text(t) => Prompt::Text(t),
        PromptInput::Ids(ids) => Prompt::Ids(ids),
        PromptInput::TextBatch(mut v) if v.len() == 1 => Prompt::Text(v.remove(0)),
        PromptInput::IdsBatch(mut v) if v.len() == 1 => Prompt::Ids(v.remove(0)),
        _ => return Err(invalid("prompt", "batches of more than one prompt are not supported; send one per request")),
    };
    let meta = RequestMeta::new(Endpoint::HttpCompletions, TraceContext::from_headers(&headers), None);
    let model = router.pool.model(&req.model).inspect_err(|e| router.metrics.request(&req.model, meta.api, Err(e)))?;
    let mut opts = options(&req.sampling, &headers);
    // OpenAI's completions default is 16 tokens.
    opts.max_tokens = Some(req.sampling.max_tokens.unwrap_or(16));
    opts.stop = req.sampling.stop.map(|s| s.into_vec()).unwrap_or_default();
    if let Some(n) = req.logprobs {
        opts.logprobs = true;
        opts.top_logprobs = n;
    }
    let api = Api::Completions { logprobs: req.logprobs };
    let stream = req.sampling.stream;
    let include_usage = req.sampling.stream_options.is_some_and(|o| o.include_usage);
    let n = req.sampling.n.unwrap_or(1);
    let gens = start(&router, Plan { model: model.clone(), prompt, opts, n, meta }).await?;
    respond(api, model, req.model, gens, stream, include_usage).await
}

async fn chat_completions(
    State(router): State<Arc<Router>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(body)?;
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let content = match m.content {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s,
            Some(Value::Array(parts)) => {
                let mut text = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => text.push_str(t),
                        _ => {
                            return Err(invalid(
                                &format!("messages[{i}].content[{j}]"),
                                "only text parts ({\"type\": \"text\", \"text\": ...}) are supported",
                            ))
                        }
                    }
                }
                text
            }
            Some(_) => return Err(invalid(&format!("messages[{i}].content"), "must be a string or a list of parts")),
        };
        messages.push(Message { role: m.role, content });
    }
    let meta = RequestMeta::new(Endpoint::HttpChat, TraceContext::from_headers(&headers), None);
    let model = router.pool.model(&req.model).inspect_err(|e| router.metrics.request(&req.model, meta.api, Err(e)))?;
    let mut opts = options(&req.sampling, &headers);
    opts.max_tokens = req.max_completion_tokens.or(req.sampling.max_tokens);
    opts.stop = req.sampling.stop.map(|s| s.into_vec()).unwrap_or_default();
    opts.logprobs = req.logprobs;
    opts.top_logprobs = req.top_logprobs.unwrap_or(0);
    let api = Api::Chat { logprobs: req.logprobs };
    let stream = req.sampling.stream;
    let include_usage = req.sampling.stream_options.is_some_and(|o| o.include_usage);
    let n = req.sampling.n.unwrap_or(1);
    let plan = Plan { model: model.clone(), prompt: Prompt::Chat(messages), opts, n, meta };
    let gens = start(&router, plan).await?;
    respond(api, model, req.model, gens, stream, include_usage).await
}

async fn respond(
    api: Api,
    model: Arc<ModelInfo>,
    name: String,
    gens: Vec<Generation>,
    stream: bool,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let id = gens.first().map(|g| g.id.clone()).unwrap_or_default();
    let groups: Vec<&str> = gens.iter().map(|g| g.group.as_ref()).collect();
    let group_header = axum::http::HeaderValue::from_str(&groups.join(",")).ok();
    let created = now();
    let with_group = |mut r: Response| {
        if let Some(v) = group_header.clone() {
            r.headers_mut().insert(crate::grpc::GROUP_HEADER, v);
        }
        r
    };
    if stream {
        let events = sse(SseConfig { api, model, name, id, created, include_usage }, gens);
        return Ok(with_group(Sse::new(events).into_response()));
    }
    let collected: Vec<Collected> = futures::future::try_join_all(gens.into_iter().map(Generation::collect)).await?;
    let mut usage = crate::generate::Usage::default();
    let choices: Vec<Value> = collected
        .iter()
        .enumerate()
        .map(|(i, c)| {
            usage.add_choice(c.usage);
            match api {
                Api::Completions { logprobs } => json!({
                    "index": i,
                    "text": c.text,
                    "logprobs": logprobs.map(|_| completion_logprobs(&model, &c.logprobs, 0)),
                    "finish_reason": finish_str(c.finish),
                    "token_ids": c.token_ids,
                }),
                Api::Chat { logprobs } => json!({
                    "index": i,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": logprobs.then(|| chat_logprobs(&model, &c.logprobs)),
                    "finish_reason": finish_str(c.finish),
                    "token_ids": c.token_ids,
                }),
            }
        })
        .collect();
    let object = match api {
        Api::Completions { .. } => "text_completion",
        Api::Chat { .. } => "chat.completion",
    };
    let body = json!({
        "id": id,
        "object": object,
        "created": created,
        "model": name,
        "choices": choices,
        "usage": Usage::from(usage),
    });
    Ok(with_group(axum::Json(body).into_response()))
}

struct SseConfig {
    api: Api,
    model: Arc<ModelInfo>,
    name: String,
    id: String,
    created: u64,
    include_usage: bool,
}

/// Each choice's chunks as SSE events, interleaved as they come, then the usage chunk (when
/// asked) and `[DONE]`. Dropping the stream (client gone) drops the generations, which cancels
/// them on the workers.
fn sse(cfg: SseConfig, gens: Vec<Generation>) -> impl Stream<Item = Result<Event, Infallible>> {
    let cfg = Arc::new(cfg);
    let per_choice = gens.into_iter().enumerate().map(|(i, g)| {
        let first_chat_delta = matches!(cfg.api, Api::Chat { .. });
        stream::unfold((g, first_chat_delta, false), move |(mut g, mut role_pending, done)| async move {
            if done {
                return None;
            }
            let item = g.next().await?;
            let finished = !matches!(item, Ok(Chunk::Delta { .. }));
            let with_role = std::mem::take(&mut role_pending);
            Some(((i, item, with_role), (g, role_pending, finished)))
        })
        .boxed()
    });
    let usage = Arc::new(std::sync::Mutex::new(crate::generate::Usage::default()));
    let body_cfg = cfg.clone();
    let body_usage = usage.clone();
    let events = stream::select_all(per_choice).map(move |(i, item, with_role)| {
        let cfg = &body_cfg;
        let chunk = match item {
            Ok(chunk) => chunk,
            Err(e) => {
                let err: ApiError = e.into();
                return Ok(Event::default().data(json!({"error": err.body.error}).to_string()));
            }
        };
        let (text, token_ids, logprobs, finish) = match chunk {
            Chunk::Delta { text, token_ids, logprobs } => (text, token_ids, logprobs, None),
            Chunk::Done { finish, usage: u } => {
                body_usage.lock().unwrap_or_else(|p| p.into_inner()).add_choice(u);
                (String::new(), Vec::new(), Vec::new(), Some(finish))
            }
        };
        let choice = match cfg.api {
            Api::Completions { logprobs: want } => json!({
                "index": i,
                "text": text,
                "logprobs": want.filter(|_| !logprobs.is_empty()).map(|_| completion_logprobs(&cfg.model, &logprobs, 0)),
                "finish_reason": finish_str(finish),
                "token_ids": token_ids,
            }),
            Api::Chat { logprobs: want } => {
                let mut delta = serde_json::Map::new();
                if with_role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if finish.is_none() {
                    delta.insert("content".into(), json!(text));
                }
                json!({
                    "index": i,
                    "delta": delta,
                    "logprobs": (want && !logprobs.is_empty()).then(|| chat_logprobs(&cfg.model, &logprobs)),
                    "finish_reason": finish_str(finish),
                    "token_ids": token_ids,
                })
            }
        };
        Ok(Event::default().data(chunk_json(cfg, vec![choice], None).to_string()))
    });
    let tail_cfg = cfg.clone();
    let tail = stream::once(async move {
        let u = *usage.lock().unwrap_or_else(|p| p.into_inner());
        tail_cfg.include_usage.then(|| Ok(Event::default().data(chunk_json(&tail_cfg, vec![], Some(u)).to_string())))
    })
    .filter_map(|e| async move { e })
    .chain(stream::once(async { Ok(Event::default().data("[DONE]")) }));
    events.chain(tail)
}

fn chunk_json(cfg: &SseConfig, choices: Vec<Value>, usage: Option<crate::generate::Usage>) -> Value {
    let object = match cfg.api {
        Api::Completions { .. } => "text_completion",
        Api::Chat { .. } => "chat.completion.chunk",
    };
    let mut v = json!({
        "id": cfg.id,
        "object": object,
        "created": cfg.created,
        "model": cfg.name,
        "choices": choices,
    });
    if let Some(u) = usage {
        v["usage"] = json!(Usage::from(u));
    }
    v
}

async fn models(State(router): State<Arc<Router>>) -> Response {
    let data: Vec<Value> = router
        .pool
        .models()
        .into_iter()
        .map(|(m, _)| json!({"id": m.name, "object": "model", "created": 0, "owned_by": "qwen-serve", "max_model_len": m.max_context}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn health(State(router): State<Arc<Router>>) -> Response {
    if router.pool.models().is_empty() {
        (StatusCode::SERVICE_UNAVAILABLE, "no healthy worker group\n").into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}
