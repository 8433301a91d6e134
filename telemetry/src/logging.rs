//! Process-wide logging: text or JSON lines on stderr (`--log-format`), filtered by `RUST_LOG`
//! (default info), plus OpenTelemetry span export over OTLP/gRPC when `--otlp-endpoint` is given.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub format: LogFormat,
    /// OTLP/gRPC collector, e.g. `http://otel-collector:4317`.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans.
    pub service: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("--otlp-endpoint {endpoint}: {message}")]
    Otlp { endpoint: String, message: String },
    #[error("logging is already set up: {0}")]
    Init(String),
}

/// Flushes exported spans when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    /// The exporter's gRPC client lives on its own small runtime, independent of the caller's.
    _runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber; keep the guard for the life of the process.
pub fn init(cfg: &LogConfig) -> Result<TelemetryGuard, TelemetryError> {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = match cfg.format {
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(std::io::stderr).boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let (otel, provider, runtime) = match &cfg.otlp_endpoint {
        None => (None, None, None),
        Some(endpoint) => {
            let fail = |message: String| TelemetryError::Otlp { endpoint: endpoint.clone(), message };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-export")
                .enable_all()
                .build()
                .map_err(|e| fail(e.to_string()))?;
            let _enter = runtime.enter();
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| fail(e.to_string()))?;
            let resource = opentelemetry_sdk::Resource::builder().with_service_name(cfg.service).build();
            // The SDK's default batch processor exports from a plain thread, where the tonic
            // client has no reactor; this one exports from the runtime above.
            let processor = opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
                exporter,
                opentelemetry_sdk::runtime::Tokio,
            )
            .build();
            let provider = SdkTracerProvider::builder().with_span_processor(processor).with_resource(resource).build();
            let tracer = provider.tracer(cfg.service);
            // Exported spans do not depend on how verbose the logs are (RUST_LOG).
            let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(EnvFilter::new("info"));
            (Some(layer), Some(provider), Some(runtime))
        }
    };
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter()))
        .with(otel)
        .try_init()
        .map_err(|e| TelemetryError::Init(e.to_string()))?;
    Ok(TelemetryGuard { provider, _runtime: runtime })
}

/// Makes `span` a child of the remote `ctx` in exported traces (no-op without OTLP).
pub fn set_remote_parent(span: &tracing::Span, ctx: &crate::trace::TraceContext) {
    use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let flags = if ctx.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
    let remote = SpanContext::new(
        TraceId::from_bytes(ctx.trace_id),
        SpanId::from_bytes(ctx.parent_id),
        flags,
        true,
        TraceState::default(),
    );
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// The span id `span` has in exported traces, if OTLP is on; the next hop's parent.
pub fn exported_span_id(span: &tracing::Span) -> Option<[u8; 8]> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.span_id().to_bytes())
}
