//! One request's walk: admission, a group by policy, the worker's token stream, incremental
//! detokenization, stop strings. A request that fails before its first token is retried on
//! another group; after that a failure ends the stream with UNAVAILABLE. Dropping the
//! [`Generation`] (client gone) drops the worker stream, which cancels the worker's request.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use qwen_proto::worker::{FinishReason as WorkerFinish, GenerateResponse as WorkerResponse};
use tokio::sync::mpsc;
use tonic::Streaming;

use qwen_telemetry::TraceContext;
use tracing::Instrument;

use crate::admission::{Admission, AdmissionConfig};
use crate::auth::Caller;
use crate::error::{Result, RouterError};
use crate::metrics::{Api, RequestTimers, RouterMetrics};
use crate::models::ModelInfo;
use crate::policy::RouteRequest;
use crate::pool::{Group, Pool};
use crate::stop::StopMatcher;
use crate::validate::{prepare_choices, Options, Prepared, Prompt};

#[derive(Debug, Clone, Copy)]
pub struct GenerateConfig {
    /// Groups tried before giving up on a request that has produced no token.
    pub max_attempts: usize,
    /// Longest wait for the first token on one group: past it (or once the group turns
    /// unhealthy) the request moves to another group.
    pub first_token_timeout: Duration,
    /// Longest gap between tokens before the stream ends UNAVAILABLE.
    pub inter_token_timeout: Duration,
    /// Whether responses name the serving group (`x-qwen-serve-group`).
    pub expose_group: bool,
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

impl Usage {
    /// Adds one choice of a request with several (`n`): they share the prompt.
    pub fn add_choice(&mut self, choice: Usage) {
        self.prompt_tokens = choice.prompt_tokens;
        self.completion_tokens += choice.completion_tokens;
        self.cached_prompt_tokens = self.cached_prompt_tokens.max(choice.cached_prompt_tokens);
    }
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
    pub metrics: Arc<RouterMetrics>,
    pub cfg: GenerateConfig,
    /// Tokenizations running at once (one per core).
    tokenizing: Arc<tokio::sync::Semaphore>,
}

/// Where a request came from and what travels with it.
#[derive(Debug, Clone)]
pub struct RequestMeta {
    pub api: Api,
    /// The API key's holder, when keys are required: its token rate is charged.
    pub caller: Option<Arc<Caller>>,
    pub deadline: Option<Instant>,
    /// The client's trace context, or a new root.
    pub trace: TraceContext,
    pub arrived: Instant,
}

impl RequestMeta {
    pub fn new(api: Api, trace: Option<TraceContext>, deadline: Option<Instant>) -> Self {
        RequestMeta {
            api,
            caller: None,
            deadline,
            trace: trace.unwrap_or_else(TraceContext::new_root),
            arrived: Instant::now(),
        }
    }

    pub fn with_caller(self, caller: Option<Arc<Caller>>) -> Self {
        RequestMeta { caller, ..self }
    }
}

/// What `/metrics` renders: the metrics after a refresh from the router's live state.
pub struct RouterScrape(pub Arc<Router>);

impl qwen_telemetry::exposition::Scrape for RouterScrape {
    fn render(&self) -> String {
        self.0.metrics.refresh(&self.0.admission, &self.0.pool);
        self.0.metrics.render()
    }
}

/// A request as an API front end hands it over, in neutral terms.
pub struct Job {
    /// The model the client named (not yet looked up).
    pub model: String,
    /// An error when the front end could not map the request's prompt (a missing prompt, an
    /// unknown role): refused in [`Router::start`], so it counts as the request's outcome too.
    pub prompt: Result<Prompt>,
    pub options: Options,
    /// Choices to generate from the one prompt.
    pub n: u32,
}

/// A started request: the model it runs on and its choices' generations.
pub struct Started {
    pub model: Arc<ModelInfo>,
    pub generations: Vec<Generation>,
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
        Router {
            pool,
            admission: Admission::new(cfg.admission),
            metrics: RouterMetrics::new(),
            cfg,
            tokenizing: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            )),
        }
    }

    /// Every API's one way in: the model looked up by name, the request checked and tokenized
    /// once for all its choices, a refusal counted as the request's outcome, then each choice
    /// started (its own outcome counted when it ends).
    pub async fn start(self: &Arc<Self>, job: Job, meta: RequestMeta) -> Result<Started> {
        let model = self.pool.model(&job.model).inspect_err(|e| self.metrics.request(None, meta.api, Err(e)))?;
        let choices = self
            .prepare(model.clone(), job)
            .await
            .inspect_err(|e| self.metrics.request(Some(&model.name), meta.api, Err(e)))?;
        self.charge(&meta, &choices).inspect_err(|e| self.metrics.request(Some(&model.name), meta.api, Err(e)))?;
        let started = futures::future::join_all(choices.into_iter().map(|c| self.generate(c, meta.clone()))).await;
        Ok(Started { model, generations: started.into_iter().collect::<Result<Vec<_>>>()? })
    }

    /// Takes what the choices may use (prompt plus max_tokens each) from the caller's token
    /// rate: reserved up front, as a stream cannot be taken back once it has started.
    fn charge(&self, meta: &RequestMeta, choices: &[Prepared]) -> Result<()> {
        let Some(caller) = &meta.caller else { return Ok(()) };
        let tokens = choices.iter().map(|c| c.prompt.len() as u64 + u64::from(c.worker.max_new_tokens)).sum();
        caller.charge_tokens(tokens).map_err(|d| {
            self.metrics.key_request(&caller.name, d.as_str());
            RouterError::Denied(d)
        })
    }

    /// Checks and tokenizes `job` off the async threads (a long prompt costs CPU seconds), at
    /// most one job per core at a time, so big prompts cannot stall other requests' streams.
    async fn prepare(&self, model: Arc<ModelInfo>, job: Job) -> Result<Vec<Prepared>> {
        let prompt = job.prompt?;
        let permit = self
            .tokenizing
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RouterError::Internal("the tokenizer pool is closed".into()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            prepare_choices(model, prompt, job.options, job.n)
        })
        .await
        .map_err(|e| RouterError::Internal(format!("tokenizing: {e}")))?
    }

    /// Starts `req` and waits for its first chunk, so that a request that cannot start at all
    /// (overloaded, no group, refused by the worker) fails as a status, not inside a stream.
    pub async fn generate(self: &Arc<Self>, req: Prepared, meta: RequestMeta) -> Result<Generation> {
        // 128 random bits from a CSPRNG: an id that leaks (logs, a client's screen) cannot be
        // used to guess another request's.
        let id = format!("cmpl-{:032x}", rand::random::<u128>());
        let prompt = req.prompt.clone();
        // Small: a slow client applies backpressure to its own worker stream only.
        let (tx, mut rx) = mpsc::channel(32);
        let (group_tx, mut group_rx) = tokio::sync::oneshot::channel();
        let router = self.clone();
        let request_id = id.clone();
        let span = tracing::info_span!("request", request_id = %id, trace_id = %meta.trace.trace_id_hex(), api = meta.api.as_str());
        qwen_telemetry::logging::set_remote_parent(&span, &meta.trace);
        let task = async move {
            let model = req.model.name.clone();
            let (deadline, api) = (meta.deadline, meta.api);
            let run = router.run(req, request_id, meta, &tx, group_tx);
            let result = match deadline {
                Some(d) => tokio::time::timeout_at(d.into(), run).await.unwrap_or(Err(RouterError::Deadline)),
                None => run.await,
            };
            router.metrics.request(Some(&model), api, result.as_ref().copied());
            if let Err(e) = result {
                tracing::info!(error = %e, "request failed");
                let _ = tx.send(Err(e)).await;
            }
        };
        tokio::spawn(task.instrument(span));
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
        meta: RequestMeta,
        tx: &mpsc::Sender<Result<Chunk>>,
        group_tx: tokio::sync::oneshot::Sender<Arc<str>>,
    ) -> Result<bool> {
        let _slot = self.admission.admit().await?;
        self.metrics.queued_for(meta.arrived.elapsed().as_secs_f64());
        // The worker's spans hang under this process's span when traces are exported.
        let span_id = qwen_telemetry::logging::exported_span_id(&tracing::Span::current())
            .unwrap_or_else(qwen_telemetry::trace::new_span_id);
        let outgoing = meta.trace.with_parent(span_id);
        let route = RouteRequest { tokens: &req.prompt, session_key: req.session_key.as_deref() };
        let mut tried: Vec<Arc<str>> = Vec::new();
        let mut last_error: Option<RouterError> = None;
        for attempt in 0..self.cfg.max_attempts.max(1) {
            let group = match self.pool.pick(&req.model.name, &route, &tried) {
                Ok(g) => g,
                Err(e) => return Err(last_error.unwrap_or(e)),
            };
            tried.push(group.name.clone());
            self.metrics.routed(&group.name);
            let _in_flight = group.begin();
            let call = Call {
                request_id: format!("{request_id}-{attempt}"),
                deadline: meta.deadline,
                trace: outgoing,
                first_token_timeout: self.cfg.first_token_timeout,
            };
            match start(&group, &req, call).await {
                Ok((first, stream)) => {
                    group.breaker.success();
                    let _ = group_tx.send(group.name.clone());
                    let timers = self.metrics.timers(&req.model.name);
                    let relay = Relay {
                        group: &group.name,
                        timers: &timers,
                        arrived: meta.arrived,
                        inter_token_timeout: self.cfg.inter_token_timeout,
                    };
                    let (completed, usage) = forward(&req, relay, first, stream, tx).await?;
                    self.metrics.tokens(
                        &req.model.name,
                        u64::from(usage.prompt_tokens),
                        u64::from(usage.completion_tokens),
                    );
                    if completed {
                        timers.e2e.observe(meta.arrived.elapsed().as_secs_f64());
                    }
                    return Ok(completed);
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(e)) => {
                    self.metrics.retried();
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

fn classify(group: &Group, req: &Prepared, status: tonic::Status) -> Attempt {
    // A grammar the worker could not compile is the client's field at fault.
    let refused_grammar = status.message().strip_prefix("invalid input: constraint: ");
    if let (tonic::Code::InvalidArgument, Some(why), Some(field)) =
        (status.code(), refused_grammar, &req.constraint_field)
    {
        return Attempt::Fatal(RouterError::invalid(field.clone(), why.to_string()));
    }
    let e =
        RouterError::Worker { group: group.name.to_string(), code: status.code(), message: status.message().into() };
    match status.code() {
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange | tonic::Code::DeadlineExceeded => Attempt::Fatal(e),
        _ => Attempt::Retry(e),
    }
}

/// One attempt's wire details.
struct Call {
    request_id: String,
    deadline: Option<Instant>,
    trace: TraceContext,
    first_token_timeout: Duration,
}

/// How often a request waiting for its first token looks at its group's health.
const HEALTH_WATCH: Duration = Duration::from_millis(250);

/// Opens the worker stream and waits for its first message.
async fn start(
    group: &Group,
    req: &Prepared,
    call: Call,
) -> std::result::Result<(WorkerResponse, Streaming<WorkerResponse>), Attempt> {
    let mut wire = req.worker.clone();
    wire.request_id = call.request_id;
    let mut request = tonic::Request::new(wire);
    if let Some(d) = call.deadline {
        // The worker gets what is left, so it drops work nobody will read.
        request.set_timeout(d.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)));
    }
    call.trace.to_metadata(request.metadata_mut());
    let give_up = Instant::now() + call.first_token_timeout;
    let retry = |message: String| {
        Attempt::Retry(RouterError::Worker { group: group.name.to_string(), code: tonic::Code::Unavailable, message })
    };
    // A frozen worker may accept the call and never answer: the first message is awaited only
    // while the group stays healthy, and no longer than the first-token timeout; then the
    // request moves on (dropping the stream cancels it on the worker).
    let first = async {
        let mut stream = group.client().generate(request).await.map_err(|s| classify(group, req, s))?.into_inner();
        let message = stream.message().await;
        Ok((stream, message))
    };
    tokio::pin!(first);
    let (stream, message) = loop {
        tokio::select! {
            result = &mut first => break result?,
            _ = tokio::time::sleep(HEALTH_WATCH) => {
                if !group.is_healthy() {
                    return Err(retry("the group turned unhealthy before the first token".into()));
                }
                if Instant::now() >= give_up {
                    let secs = call.first_token_timeout.as_secs();
                    return Err(retry(format!("no first token within {secs} s (--first-token-timeout-secs)")));
                }
            }
        }
    };
    match message {
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
        Err(s) => Err(classify(group, req, s)),
    }
}

fn failed_finish(m: &WorkerResponse) -> bool {
    m.token_id.is_none()
        && matches!(WorkerFinish::try_from(m.finish_reason), Ok(WorkerFinish::Error | WorkerFinish::Cancelled))
}

struct Relay<'a> {
    group: &'a str,
    timers: &'a RequestTimers,
    arrived: Instant,
    inter_token_timeout: Duration,
}

/// Relays the worker's stream as text chunks until it finishes, a stop string matches, or the
/// client goes away; returns whether the client got the whole response, and the usage.
async fn forward(
    req: &Prepared,
    relay: Relay<'_>,
    first: WorkerResponse,
    mut stream: Streaming<WorkerResponse>,
    tx: &mpsc::Sender<Result<Chunk>>,
) -> Result<(bool, Usage)> {
    let group = relay.group;
    let mut last_token = relay.arrived;
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
            let now = Instant::now();
            if usage.completion_tokens == 0 {
                relay.timers.ttft.observe((now - relay.arrived).as_secs_f64());
            } else {
                relay.timers.itl.observe((now - last_token).as_secs_f64());
            }
            last_token = now;
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
                return Ok((false, usage)); // client gone: dropping `stream` cancels the worker's request
            }
            if step.stopped {
                let sent = tx.send(Ok(Chunk::Done { finish: Finish::Stop, usage })).await.is_ok();
                return Ok((sent, usage));
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
            let sent = tx.send(Ok(Chunk::Done { finish, usage })).await.is_ok();
            return Ok((sent, usage));
        }
        msg = match tokio::time::timeout(relay.inter_token_timeout, stream.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => return Err(group_error("the worker's stream ended without a finish".into())),
            Ok(Err(s)) => return Err(group_error(format!("the worker failed mid-stream: {}", s.message()))),
            Err(_) => {
                let secs = relay.inter_token_timeout.as_secs();
                return Err(group_error(format!("no token for {secs} s (--inter-token-timeout-secs)")));
            }
        };
    }
}
