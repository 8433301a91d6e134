use std::path::PathBuf;

/// Coarse class of an [`Error`], for metric labels and status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The tokenizer file is missing, unreadable or malformed.
    Load,
    /// The text or ids given to encode/decode are invalid.
    InvalidInput,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Malformed { path: PathBuf, message: String },
    #[error("{dir}: no tokenizer found: expected tokenizer.json or qwen.tiktoken")]
    NoTokenizer { dir: PathBuf },
    #[error("token id {token} in {field} is out of range: the vocabulary has {vocab} ids (0..{vocab})")]
    TokenOutOfRange { field: &'static str, token: u32, vocab: usize },
    #[error("invalid input: {field}: {message}")]
    InvalidInput { field: &'static str, message: String },
}

impl Error {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { .. } | Error::Malformed { .. } | Error::NoTokenizer { .. } => ErrorKind::Load,
            Error::TokenOutOfRange { .. } | Error::InvalidInput { .. } => ErrorKind::InvalidInput,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
