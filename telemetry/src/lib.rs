//! Observability plumbing shared by the router and the worker. Metric names are not here: each
//! crate names its own in one `metrics` module.

pub mod exposition;
pub mod histogram;
pub mod logging;
pub mod trace;

pub use histogram::AtomicHistogram;
pub use logging::{LogConfig, LogFormat};
pub use trace::TraceContext;
