//! A qwen-serve worker: loads a Qwen checkpoint, tokenizes, and generates.

pub mod comm;
pub mod config;
pub mod constraint;
pub mod device;
pub mod engine;
pub mod error;
pub mod generate;
pub mod info;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod quant;
pub mod request;
pub mod sampling;
pub mod server;
pub use qwen_tokenizer as tokenizer;
#[cfg(test)]
mod test_util;
pub mod weights;

pub use error::{Error, ErrorKind, Result};
