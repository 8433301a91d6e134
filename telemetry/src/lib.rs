//! Observability and process plumbing shared by the router and the worker. Metric names are not
//! here: each crate names its own in one `metrics` module.

pub mod exposition;
pub mod histogram;
pub mod logging;
pub mod trace;

pub use histogram::AtomicHistogram;
pub use logging::{LogConfig, LogFormat};
pub use trace::TraceContext;

/// Resolves on SIGTERM or Ctrl-C: when a process should stop (router and worker alike).
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
