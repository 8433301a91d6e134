//! One request's walk: admission, a group by policy, the worker's token stream, incremental
//! detokenization, stop strings. A request that fails before its first token is retried on
//! another group; after that a failure ends the stream with UNAVAILABLE. Dropping the
//! [`Generation`] (client gone) drops the worker stream, which cancels the worker's request.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use qwen_proto::worker::{FinishReason as WorkerFinish, GenerateResponse as WorkerResponse};
use tokio::sync::mpsc;
use tonic::Streaming;

use crate::admission::{Admission, AdmissionConfig};
use crate::error::{Result, RouterError};
use crate::policy::RouteRequest;
use crate::pool::{Group, Pool};
use crate::stop::StopMatcher;
use crate::validate::Prepared;

#[derive(Debug, Clone, Copy)]
pub struct GenerateConfig {
    /// Groups tried before giving up on a request that has produced no token.
    pub max_attempts: usize,
    pub admission: AdmissionConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    Length,
    Stop,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached_prompt_tokens: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token_id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// New text (possibly empty while a character or a possible stop string is incomplete) and
    /// the tokens that produced it.
    Delta {
        text: String,
        token_ids: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
    },
    Done {
        finish: Finish,
        usage: Usage,
    },
}

/// A whole response, for the unary APIs.
#[derive(Debug, Clone, Default)]
pub struct Collected {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<Finish>,
    pub usage: Usage,
}

pub struct Router {
    pub pool: Arc<Pool>,
    pub admission: Admission,
    cfg: GenerateConfig,
    next_id: AtomicU64,
}

/// A running request: its chunks in order, then `Done` (or an error).
pub struct Generation {
    pub id: String,
    pub prompt: Vec<u32>,
    /// The group serving it (reported to clients for debugging and tests).
    pub group: Arc<str>,
    first: Option<Result<Chunk>>,
    rx: mpsc::Receiver<Result<Chunk>>,
}

impl Generation {
    pub async fn next(&mut self) -> Option<Result<Chunk>> {
        match self.first.take() {
            Some(c) => Some(c),
            None => self.rx.recv().await,
        }
    }

    pub async fn collect(mut self) -> Result<Collected> {
        let mut out = Collected::default();
        while let Some(chunk) = self.next().await {
            match chunk? {
                Chunk::Delta { text, token_ids, logprobs } => {
                    out.text.push_str(&text);
                    out.token_ids.extend(token_ids);
                    out.logprobs.extend(logprobs);
                }
                Chunk::Done { finish, usage } => {
                    out.finish = Some(finish);
                    out.usage = usage;
                    return Ok(out);
                }
            }
        }
        Err(RouterError::Internal("generation ended without a finish".into()))
    }
}

impl Router {
    pub fn new(pool: Arc<Pool>, cfg: GenerateConfig) -> Self {
        Router { pool, admission: Admission::new(cfg.admission), cfg, next_id: AtomicU64::new(0) }
    }

    /// Starts `req` and waits for its first chunk, so that a request that cannot start at all
    /// (overloaded, no group, refused by the worker) fails as a status, not inside a stream.
    pub async fn generate(self: &Arc<Self>, req: Prepared, deadline: Option<Instant>) -> Result<Generation> {
        let id = format!("cmpl-{:x}-{}", std::process::id(), self.next_id.fetch_add(1, Ordering::Relaxed));
        let prompt = req.prompt.clone();
        // Small: a slow client applies backpressure to its own worker stream only.
        let (tx, mut rx) = mpsc::channel(32);
        let (group_tx, mut group_rx) = tokio::sync::oneshot::channel();
        let router = self.clone();
        let request_id = id.clone();
        tokio::spawn(async move {
            let run = router.run(req, request_id, deadline, &tx, group_tx);
            let result = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), run).await.unwrap_or(Err(RouterError::Deadline)),
                None => run.await,
            };
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        match rx.recv().await {
            Some(Err(e)) => Err(e),
            Some(first) => {
                // Sent before the first chunk, so it is there now.
                let group = group_rx.try_recv().unwrap_or_else(|_| Arc::from(""));
                Ok(Generation { id, prompt, group, first: Some(first), rx })
            }
            None => Err(RouterError::Internal("generation task ended without a word".into())),
        }
    }

    async fn run(
        &self,
        req: Prepared,
        request_id: String,
        deadline: Option<Instant>,
        tx: &mpsc::Sender<Result<Chunk>>,
        group_tx: tokio::sync::oneshot::Sender<Arc<str>>,
    ) -> Result<()> {
        let _slot = self.admission.admit().await?;
        let route = RouteRequest { tokens: &req.prompt, session_key: req.session_key.as_deref() };
        let mut tried: Vec<Arc<str>> = Vec::new();
        let mut last_error: Option<RouterError> = None;
        for attempt in 0..self.cfg.max_attempts.max(1) {
            let group = match self.pool.pick(&req.model.name, &route, &tried) {
                Ok(g) => g,
                Err(e) => return Err(last_error.unwrap_or(e)),
            };
            tried.push(group.name.clone());
            let _in_flight = group.begin();
            match start(&group, &req, format!("{request_id}-{attempt}"), deadline).await {
                Ok((first, stream)) => {
                    group.breaker.success();
                    let _ = group_tx.send(group.name.clone());
                    return forward(&req, &group.name, first, stream, tx).await;
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e)) => {
                    group.breaker.failure(Instant::now());
                    tracing::warn!(group = %group.name, attempt, error = %e, "attempt failed before the first token");
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| RouterError::NoGroup(req.model.name.clone())))
    }
}

enum Attempt {
    /// The group failed: another may succeed.
    Retry(RouterError),
    /// The request itself was refused: no point elsewhere.
    Fatal(RouterError),
}

fn classify(group: &Group, status: tonic::Status) -> Attempt {
    let e =
        RouterError::Worker { group: group.name.to_string(), code: status.code(), message: status.message().into() };
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::DeadlineExceeded => Attempt::Fatal(e),
        _ => Attempt::Retry(e),
    }
}

/// Opens the worker stream and waits for its first message.
async fn start(
    group: &Group,
    req: &Prepared,
    request_id: String,
    deadline: Option<Instant>,
) -> std::result::Result<(WorkerResponse, Streaming<WorkerResponse>), Attempt> {
    let mut wire = req.worker.clone();
    wire.request_id = request_id;
    let mut request = tonic::Request::new(wire);
    if let Some(d) = deadline {
        // The worker gets what is left, so it drops work nobody will read.
        request.set_timeout(d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
    }
    let mut stream = group.client().generate(request).await.map_err(|s| classify(group, s))?.into_inner();
    match stream.message().await {
        Ok(Some(first)) if failed_finish(&first) => Err(Attempt::Retry(RouterError::Worker {
            group: group.name.to_string(),
            code: tonic::Code::Unavailable,
            message: format!("the request ended before its first token: {}", first.error),
        })),
        Ok(Some(first)) => Ok((first, stream)),
        Ok(None) => Err(Attempt::Retry(RouterError::Worker {
            group: group.name.to_string(),
            code: tonic::Code::Unavailable,
            message: "the stream ended before its first token".into(),
        })),
        Err(s) => Err(classify(group, s)),
    }
}

fn failed_finish(m: &WorkerResponse) -> bool {
    m.token_id.is_none()
        && matches!(WorkerFinish::try_from(m.finish_reason), Ok(WorkerFinish::Error | WorkerFinish::Cancelled))
}

/// Relays the worker's stream as text chunks until it finishes, a stop string matches, or the
/// client goes away.
async fn forward(
    req: &Prepared,
    group: &str,
    first: WorkerResponse,
    mut stream: Streaming<WorkerResponse>,
    tx: &mpsc::Sender<Result<Chunk>>,
) -> Result<()> {
    let model = &req.model;
    let mut decoder = model.tokenizer.as_ref().map(|t| t.stream_decoder());
    let mut stops = StopMatcher::new(req.stop.clone());
    // The token that ends generation (eos, stop token) is reported but not rendered as text, as
    // vLLM and OpenAI do.
    let mut silent: HashSet<u32> = req.worker.stop_token_ids.iter().copied().collect();
    if !req.worker.ignore_eos {
        silent.extend(&model.eos_token_ids);
    }
    let mut usage = Usage { prompt_tokens: req.prompt.len() as u32, ..Default::default() };
    let group_error =
        |message: String| RouterError::Worker { group: group.to_string(), code: tonic::Code::Unavailable, message };
    let mut msg = first;
    loop {
        usage.cached_prompt_tokens = usage.cached_prompt_tokens.max(msg.cached_prompt_tokens);
        if let Some(token) = msg.token_id {
            usage.completion_tokens += 1;
            let piece = match decoder.as_mut() {
                Some(d) if !silent.contains(&token) => {
                    d.step(token).map_err(|e| RouterError::Internal(format!("detokenizing: {e}")))?
                }
                _ => None,
            };
            let step = stops.push(piece.as_deref().unwrap_or(""));
            let logprobs = match msg.logprob {
                Some(logprob) => vec![TokenLogprob {
                    token_id: token,
                    logprob,
                    top: msg.top_logprobs.iter().map(|t| (t.token_id, t.logprob)).collect(),
                }],
                None => Vec::new(),
            };
            let delta = Chunk::Delta { text: step.release, token_ids: vec![token], logprobs };
            if tx.send(Ok(delta)).await.is_err() {
                return Ok(()); // client gone: dropping `stream` cancels the worker's request
            }
            if step.stopped {
                let _ = tx.send(Ok(Chunk::Done { finish: Finish::Stop, usage })).await;
                return Ok(());
            }
        }
        let finish = match WorkerFinish::try_from(msg.finish_reason).unwrap_or(WorkerFinish::Unspecified) {
            WorkerFinish::Unspecified => None,
            WorkerFinish::Length => Some(Finish::Length),
            WorkerFinish::Stop => Some(Finish::Stop),
            WorkerFinish::Cancelled | WorkerFinish::Error => {
                return Err(group_error(format!("the worker ended the request: {}", msg.error)))
            }
        };
        if let Some(finish) = finish {
            let mut tail = match decoder.as_mut() {
                Some(d) => d.finish().map_err(|e| RouterError::Internal(format!("detokenizing: {e}")))?,
                None => None,
            }
            .map(|t| stops.push(&t))
            .map(|s| (s.release, s.stopped))
            .unwrap_or_default();
            if !tail.1 {
                tail.0.push_str(&stops.finish());
            }
            let finish = if tail.1 { Finish::Stop } else { finish };
            if !tail.0.is_empty() {
                let _ = tx.send(Ok(Chunk::Delta { text: tail.0, token_ids: vec![], logprobs: vec![] })).await;
            }
            let _ = tx.send(Ok(Chunk::Done { finish, usage })).await;
            return Ok(());
        }
        msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(group_error("the worker's stream ended without a finish".into())),
            Err(s) => return Err(group_error(format!("the worker failed mid-stream: {}", s.message()))),
        };
    }
}
