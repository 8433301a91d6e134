//! The router's error type. `kind()` picks the gRPC status and the HTTP status (and, later, the
//! metric label) in one place.

use std::time::Duration;

use crate::auth::{retry_secs, Denied};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The request is malformed or asks for something impossible.
    InvalidArgument,
    /// The model is not served by any known group.
    NotFound,
    /// The router's queue is full, or the API key's rate limit is reached: retry later.
    Overloaded,
    /// No API key, or one that is not valid.
    Unauthenticated,
    /// No group could take the request, or the group failed while serving it.
    Unavailable,
    DeadlineExceeded,
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Unauthenticated => "unauthenticated",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Internal => "internal",
        }
    }
}

/// Longest piece of a client's value an error message repeats.
const MAX_ECHO: usize = 64;

/// A client's value as error messages may repeat it: quoted, escaped (no newline or control
/// character gets through), and cut after [`MAX_ECHO`] characters.
pub fn echo(value: &str) -> String {
    let cut: String = value.chars().take(MAX_ECHO).collect();
    let more = if value.chars().nth(MAX_ECHO).is_some() { "..." } else { "" };
    format!("{:?}{more}", cut)
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RouterError {
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    /// The name as [`echo`] gives it.
    #[error("model {0} is not served here (list the models with ListModels or GET /v1/models)")]
    UnknownModel(String),
    #[error("the router is at capacity; retry after {}s", retry_after.as_secs())]
    Overloaded { retry_after: Duration },
    #[error("no worker group can serve model `{0}` right now")]
    NoGroup(String),
    /// `group` is for logs: clients are not told internal group names.
    #[error("worker: {message}")]
    Worker { group: String, code: tonic::Code, message: String },
    #[error("the request's deadline passed")]
    Deadline,
    #[error("{}", .0.message())]
    Denied(crate::auth::Denied),
    #[error("{0}")]
    Internal(String),
}

impl RouterError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        RouterError::Invalid { field: field.into(), message: message.into() }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            RouterError::Invalid { .. } => ErrorKind::InvalidArgument,
            RouterError::UnknownModel(_) => ErrorKind::NotFound,
            RouterError::Overloaded { .. } => ErrorKind::Overloaded,
            RouterError::NoGroup(_) => ErrorKind::Unavailable,
            // The worker's verdict on the request itself passes through; anything else is the
            // group failing.
            RouterError::Worker { code, .. } => match code {
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange => ErrorKind::InvalidArgument,
                tonic::Code::ResourceExhausted => ErrorKind::Overloaded,
                tonic::Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
                _ => ErrorKind::Unavailable,
            },
            RouterError::Deadline => ErrorKind::DeadlineExceeded,
            RouterError::Internal(_) => ErrorKind::Internal,
            RouterError::Denied(d) => match d {
                Denied::Missing | Denied::Invalid => ErrorKind::Unauthenticated,
                Denied::RateLimited { .. } => ErrorKind::Overloaded,
                Denied::TooLarge { .. } => ErrorKind::InvalidArgument,
            },
        }
    }

    /// How long a client should wait before retrying, where waiting helps.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RouterError::Overloaded { retry_after } => Some(*retry_after),
            RouterError::Denied(Denied::RateLimited { retry_after, .. }) => Some(*retry_after),
            _ => None,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        let msg = self.to_string();
        match self.kind() {
            ErrorKind::InvalidArgument => tonic::Status::invalid_argument(msg),
            ErrorKind::NotFound => tonic::Status::not_found(msg),
            ErrorKind::Overloaded => {
                let mut status = tonic::Status::resource_exhausted(msg);
                if let Some(wait) = self.retry_after() {
                    if let Ok(v) = retry_secs(wait).to_string().parse() {
                        status.metadata_mut().insert("retry-after", v);
                    }
                }
                status
            }
            ErrorKind::Unauthenticated => tonic::Status::unauthenticated(msg),
            ErrorKind::Unavailable => tonic::Status::unavailable(msg),
            ErrorKind::DeadlineExceeded => tonic::Status::deadline_exceeded(msg),
            ErrorKind::Internal => tonic::Status::internal(msg),
        }
    }

    /// HTTP status for the OpenAI-compatible API.
    pub fn http_status(&self) -> u16 {
        match self.kind() {
            ErrorKind::InvalidArgument => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Overloaded => 429,
            ErrorKind::Unauthenticated => 401,
            ErrorKind::Unavailable => 503,
            ErrorKind::DeadlineExceeded => 504,
            ErrorKind::Internal => 500,
        }
    }

    /// The request field at fault, for OpenAI's `param`.
    pub fn param(&self) -> Option<&str> {
        match self {
            RouterError::Invalid { field, .. } => Some(field),
            RouterError::UnknownModel(_) => Some("model"),
            RouterError::Denied(Denied::TooLarge { .. }) => Some("max_tokens"),
            _ => None,
        }
    }
}

pub type Result<T, E = RouterError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echoed_values_are_escaped_and_cut() {
        assert_eq!(echo("qwen"), "\"qwen\"");
        assert_eq!(echo("a\nb"), "\"a\\nb\"");
        let long = echo(&"x".repeat(1 << 20));
        assert!(long.len() < 80 && long.ends_with("..."), "{long}");
    }
}
