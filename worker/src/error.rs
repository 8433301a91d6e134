//! The worker's error type. Every message names the file, field, tensor or value at fault and
//! what was expected, because these errors end up in front of someone pointing the server at a
//! checkpoint directory.

use std::path::PathBuf;

/// Coarse class of an [`Error`], used for metric labels and for mapping to gRPC/HTTP statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A file could not be read.
    Io,
    /// `config.json` / `generation_config.json` is missing a field or holds a bad value.
    Config,
    /// A safetensors file is corrupt, or a tensor is missing or has the wrong shape or dtype.
    Weights,
    /// The tokenizer file is missing or malformed.
    Tokenizer,
    /// A request's input is invalid (e.g. a token id outside the vocabulary).
    InvalidInput,
    /// The engine thread is gone; the worker cannot serve.
    Unavailable,
    /// A tensor operation failed: a bug or a device fault, not the caller's input.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: field `{field}`: {message}")]
    ConfigField { path: PathBuf, field: String, message: String },
    #[error("{path}: unknown architecture {found:?}; supported: {supported}")]
    UnknownArchitecture { path: PathBuf, found: String, supported: String },
    #[error("{path}: not a valid safetensors file: {message}")]
    Safetensors { path: PathBuf, message: String },
    #[error("{dir}: no weights found: expected model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("tensor `{name}` not found (looked in {searched})")]
    MissingTensor { name: String, searched: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape { path: PathBuf, name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("{path}: tensor `{name}` has dtype {found}, expected one of f32, f16, bf16")]
    TensorDtype { path: PathBuf, name: String, found: String },
    #[error(transparent)]
    Tokenizer(#[from] qwen_tokenizer::Error),
    #[error("token id {token} in {field} is out of range: the vocabulary has {vocab} ids (0..{vocab})")]
    TokenOutOfRange { field: &'static str, token: u32, vocab: usize },
    #[error("invalid input: {field}: {message}")]
    InvalidInput { field: &'static str, message: String },
    /// The vocabulary could not be turned into the grammar engine's token trie.
    #[error("structured outputs: {0}")]
    GrammarSetup(String),
    /// A request's grammar failed while generating (e.g. it admits no further token).
    #[error("structured output: {0}")]
    Grammar(String),
    #[error("tensor-parallel group: {0}")]
    Comm(#[from] crate::comm::CommError),
    #[error("the engine has stopped")]
    EngineStopped,
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// An invariant of the worker's own code broke (never the caller's input).
    #[error("internal error: {what}: {message}")]
    Internal { what: &'static str, message: String },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } => ErrorKind::Io,
            Error::Json { .. } | Error::ConfigField { .. } | Error::UnknownArchitecture { .. } => ErrorKind::Config,
            Error::Safetensors { .. }
            | Error::NoWeights { .. }
            | Error::MissingTensor { .. }
            | Error::TensorShape { .. }
            | Error::TensorDtype { .. } => ErrorKind::Weights,
            Error::Tokenizer(e) => match e.kind() {
                qwen_tokenizer::ErrorKind::Load => ErrorKind::Tokenizer,
                qwen_tokenizer::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
            },
            Error::GrammarSetup(_) => ErrorKind::Tokenizer,
            Error::TokenOutOfRange { .. } | Error::InvalidInput { .. } | Error::Grammar(_) => ErrorKind::InvalidInput,
            Error::EngineStopped | Error::Comm(_) => ErrorKind::Unavailable,
            Error::Candle(_) | Error::Internal { .. } => ErrorKind::Internal,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn field(path: impl Into<PathBuf>, field: &str, message: impl Into<String>) -> Self {
        Error::ConfigField { path: path.into(), field: field.to_string(), message: message.into() }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
