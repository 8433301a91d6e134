//! The front door of qwen-serve: public gRPC and OpenAI-compatible HTTP over a pool of worker
//! groups. A request's walk: `grpc`/`http` → `validate` (tokenize, chat template, checks) →
//! `generate` (admission, `policy` picks a group from the `pool`, retries before the first
//! token, detokenization, `stop` strings) → back to the client as it streams.

pub mod admission;
pub mod agent;
pub mod auth;
pub mod breaker;
pub mod config;
pub mod conn;
pub mod error;
#[cfg(test)]
mod fuzz_tests;
pub mod generate;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod models;
pub mod policy;
pub mod pool;
pub mod server;
pub mod stop;
pub mod structured;
pub mod template;
pub mod validate;

pub use error::{ErrorKind, Result, RouterError};
