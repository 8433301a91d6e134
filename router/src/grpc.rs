//! The public gRPC API (`qwen.serve.v1.Generation`) over [`Router`]; request checks live in
//! `validate`, this file maps messages.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qwen_proto::serve::generation_server::Generation as GenerationApi;
use qwen_proto::serve::{
    generate_request, ChatRequest, FinishReason as PbFinish, GenerateRequest, GenerateResponse, GenerateStreamResponse,
    GenerationOptions, ListModelsRequest, ListModelsResponse, Model, TokenLogprob as PbLogprob, TokenizeRequest,
    TokenizeResponse, TopLogprob, Usage as PbUsage,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::auth::{Caller, Gate};
use crate::error::RouterError;
use crate::generate::{Chunk, Finish, Generation, Job, RequestMeta, Router, TokenLogprob, Usage};
use crate::metrics::Api;
use crate::template::Message;
use crate::validate::{role, Options, Prompt};
use qwen_telemetry::TraceContext;

pub struct PublicService {
    router: Arc<Router>,
}

impl PublicService {
    pub fn new(router: Arc<Router>) -> Self {
        PublicService { router }
    }

    async fn start(&self, meta: RequestMeta, job: Job) -> Result<Generation, Status> {
        let mut started = self.router.start(job, meta).await.map_err(|e| e.to_status())?;
        started.generations.pop().ok_or_else(|| Status::internal("no generation started"))
    }
}

pub(crate) fn job(model: &str, prompt: Result<Prompt, RouterError>, options: Option<GenerationOptions>) -> Job {
    Job { model: model.to_string(), prompt, options: options.map(self::options).unwrap_or_default(), n: 1 }
}

fn options(o: GenerationOptions) -> Options {
    let s = o.sampling.unwrap_or_default();
    Options {
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
    }
}

pub(crate) fn generate_prompt(p: Option<generate_request::Prompt>) -> Result<Prompt, RouterError> {
    match p {
        Some(generate_request::Prompt::Text(t)) => Ok(Prompt::Text(t)),
        Some(generate_request::Prompt::TokenIds(ids)) => Ok(Prompt::Ids(ids.ids)),
        None => Err(RouterError::invalid("prompt", "give text or token_ids")),
    }
}

pub(crate) fn chat_prompt(messages: Vec<qwen_proto::serve::ChatMessage>) -> Result<Prompt, RouterError> {
    let messages = messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| Ok(Message::new(role(i, &m.role)?, m.content)))
        .collect::<Result<_, RouterError>>()?;
    Ok(Prompt::Chat(crate::template::Chat { messages, ..Default::default() }))
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

    async fn unary(&self, model: String, generation: Generation) -> Result<Response<GenerateResponse>, Status> {
        let group = generation.group.clone();
        Ok(self.with_group(unary(model, generation).await?, &group))
    }

    fn streaming(&self, generation: Generation) -> Response<ChunkStream> {
        let group = generation.group.clone();
        self.with_group(Response::new(streaming(generation)), &group)
    }
}

async fn unary(model: String, generation: Generation) -> Result<Response<GenerateResponse>, Status> {
    let id = generation.id.clone();
    let prompt_token_ids = generation.prompt.clone();
    let c = generation.collect().await.map_err(|e| e.to_status())?;
    let response = Response::new(GenerateResponse {
        id,
        model,
        text: c.text,
        token_ids: c.token_ids,
        finish_reason: c.finish.map_or(0, finish),
        usage: Some(usage(c.usage)),
        logprobs: logprobs(c.logprobs),
        prompt_token_ids,
    });
    Ok(response)
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateStreamResponse, Status>> + Send>>;

fn streaming(mut generation: Generation) -> ChunkStream {
    let id = generation.id.clone();
    Box::pin(async_stream(move |tx| async move {
        while let Some(chunk) = generation.next().await {
            let msg = match chunk {
                Ok(Chunk::Delta { text, token_ids, logprobs: l }) => Ok(GenerateStreamResponse {
                    id: id.clone(),
                    text,
                    token_ids,
                    logprobs: logprobs(l),
                    ..Default::default()
                }),
                Ok(Chunk::Done { finish: f, usage: u }) => Ok(GenerateStreamResponse {
                    id: id.clone(),
                    finish_reason: finish(f),
                    usage: Some(usage(u)),
                    ..Default::default()
                }),
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
        let job = job(&r.model, generate_prompt(r.prompt), r.options);
        let generation = self.start(meta, job).await?;
        self.unary(r.model, generation).await
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(&self, request: Request<GenerateRequest>) -> Result<Response<ChunkStream>, Status> {
        let meta = request_meta(&request, Api::GrpcGenerate);
        let r = request.into_inner();
        let job = job(&r.model, generate_prompt(r.prompt), r.options);
        let generation = self.start(meta, job).await?;
        Ok(self.streaming(generation))
    }

    async fn chat(&self, request: Request<ChatRequest>) -> Result<Response<GenerateResponse>, Status> {
        let meta = request_meta(&request, Api::GrpcChat);
        let r = request.into_inner();
        let job = job(&r.model, chat_prompt(r.messages), r.options);
        let generation = self.start(meta, job).await?;
        self.unary(r.model, generation).await
    }

    type ChatStreamStream = ChunkStream;

    async fn chat_stream(&self, request: Request<ChatRequest>) -> Result<Response<ChunkStream>, Status> {
        let meta = request_meta(&request, Api::GrpcChat);
        let r = request.into_inner();
        let job = job(&r.model, chat_prompt(r.messages), r.options);
        let generation = self.start(meta, job).await?;
        Ok(self.streaming(generation))
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
