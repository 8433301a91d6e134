//! API keys on the public APIs: a key file (several named keys, each with optional request and
//! token rate limits), re-read on reload without dropping the rate-limit state of unchanged keys.
//!
//! Keys are compared by their SHA-256 digests: the lookup's timing can only depend on a digest,
//! which tells an attacker nothing about any key, and the final comparison is constant-time.
//! A key's *name* (operator-chosen, charset-checked) is what metrics and logs see, never the key.
//!
//! The file, one key per line (`#` starts a comment):
//! ```text
//! # name   key                               limits (optional, per minute)
//! alice    sk-3f9c0b6e4c1a4d8e9b7f2a5c6d1e0f3a  requests_per_minute=600 tokens_per_minute=200000
//! batch    sk-8a1d...
//! ```

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use crate::error::RouterError;
use crate::metrics::{Port, RouterMetrics};

/// At most this many keys (each name is a metric label value: the label set stays bounded).
pub const MAX_KEYS: usize = 10_000;
const MAX_FILE_BYTES: u64 = 4 << 20;
const MAX_NAME_LEN: usize = 64;
const KEY_LEN: std::ops::RangeInclusive<usize> = 16..=512;

/// Per-minute limits of one key; `None`: unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests_per_minute: Option<NonZeroU32>,
    pub tokens_per_minute: Option<NonZeroU32>,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub key_file: PathBuf,
    /// Limits for keys whose line sets none.
    pub defaults: KeyLimits,
    /// Serve `/metrics` without a key.
    pub open_metrics: bool,
    /// Serve health (HTTP `/health`, `grpc.health.v1`) without a key.
    pub open_health: bool,
}

/// An authenticated client: its key's name and rate limiters.
pub struct Caller {
    pub name: Arc<str>,
    limits: KeyLimits,
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller").field("name", &self.name).field("limits", &self.limits).finish()
    }
}

/// Why a request was turned away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No credential, or one that is not a key.
    Missing,
    Invalid,
    /// Over the key's request or token rate: retry after this.
    RateLimited {
        retry_after: Duration,
        what: &'static str,
    },
    /// One request needs more tokens than the key may use in a minute: it can never pass.
    TooLarge {
        tokens: u64,
        per_minute: u32,
    },
}

impl Denied {
    pub fn as_str(&self) -> &'static str {
        match self {
            Denied::Missing => "missing",
            Denied::Invalid => "invalid",
            Denied::RateLimited { .. } => "rate_limited",
            Denied::TooLarge { .. } => "too_large",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Denied::Missing => "an API key is required: send `Authorization: Bearer <key>`".into(),
            Denied::Invalid => "the API key is not valid".into(),
            Denied::RateLimited { retry_after, what } => {
                format!("the API key's {what} rate limit is reached; retry after {}s", retry_secs(*retry_after))
            }
            Denied::TooLarge { tokens, per_minute } => format!(
                "the request needs up to {tokens} tokens (prompt plus max_tokens per choice), more than the API key's \
                 {per_minute} tokens per minute"
            ),
        }
    }
}

/// Whole seconds to wait, rounded up, at least 1.
pub fn retry_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl Caller {
    fn new(name: Arc<str>, limits: KeyLimits) -> Self {
        let limiter = |per_minute: Option<NonZeroU32>| per_minute.map(|n| RateLimiter::direct(Quota::per_minute(n)));
        Caller {
            name,
            limits,
            requests: limiter(limits.requests_per_minute),
            tokens: limiter(limits.tokens_per_minute),
        }
    }

    /// Counts one request against the key's request rate.
    fn admit_request(&self) -> Result<(), Denied> {
        match &self.requests {
            Some(l) => l.check().map_err(|not_until| Denied::RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                what: "request",
            }),
            None => Ok(()),
        }
    }

    /// Takes `tokens` from the key's token rate (all or nothing).
    pub fn charge_tokens(&self, tokens: u64) -> Result<(), Denied> {
        let (Some(limiter), Some(per_minute)) = (&self.tokens, self.limits.tokens_per_minute) else {
            return Ok(());
        };
        let too_large = Denied::TooLarge { tokens, per_minute: per_minute.get() };
        let n = u32::try_from(tokens).ok().and_then(NonZeroU32::new).ok_or(too_large.clone());
        match limiter.check_n(n?) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Denied::RateLimited {
                retry_after: not_until.wait_time_from(DefaultClock::default().now()),
                what: "token",
            }),
            Err(_) => Err(too_large),
        }
    }
}

/// The loaded keys, by digest.
struct Keys {
    by_digest: HashMap<[u8; 32], Arc<Caller>>,
}

/// The key file and what it holds now.
pub struct Auth {
    cfg: AuthConfig,
    keys: RwLock<Arc<Keys>>,
}

impl Auth {
    /// Reads the key file; an unreadable or malformed file stops the router, naming the file and
    /// the line.
    pub fn load(cfg: AuthConfig) -> Result<Arc<Self>, String> {
        let entries = parse_file(&cfg.key_file, cfg.defaults)?;
        let keys = build(entries, &HashMap::new());
        Ok(Arc::new(Auth { cfg, keys: RwLock::new(Arc::new(keys)) }))
    }

    pub fn config(&self) -> &AuthConfig {
        &self.cfg
    }

    /// Re-reads the key file. Keys whose line is unchanged keep their rate-limit state; on any
    /// error the old keys stay in force. Returns how many keys are loaded.
    pub fn reload(&self) -> Result<usize, String> {
        let entries = parse_file(&self.cfg.key_file, self.cfg.defaults)?;
        let old = self.current();
        let keys = build(entries, &old.by_digest);
        let n = keys.by_digest.len();
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    fn current(&self) -> Arc<Keys> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The caller an `Authorization` header value (`Bearer <key>`) belongs to.
    fn identify(&self, authorization: Option<&[u8]>) -> Result<Arc<Caller>, Denied> {
        let value = authorization.ok_or(Denied::Missing)?;
        let key = bearer(value).ok_or(Denied::Invalid)?;
        let digest: [u8; 32] = Sha256::digest(key).into();
        let keys = self.current();
        let (stored, caller) = keys.by_digest.get_key_value(&digest).ok_or(Denied::Invalid)?;
        if constant_time_eq(stored, &digest) {
            Ok(caller.clone())
        } else {
            Err(Denied::Invalid)
        }
    }
}

/// `Bearer <key>` (scheme case-insensitive, per RFC 7235) → the key's bytes.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty() && key.len() <= *KEY_LEN.end()).then_some(key)
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// One line of the key file.
#[derive(Debug)]
struct Entry {
    name: Arc<str>,
    digest: [u8; 32],
    limits: KeyLimits,
}

fn build(entries: Vec<Entry>, old: &HashMap<[u8; 32], Arc<Caller>>) -> Keys {
    let by_digest = entries
        .into_iter()
        .map(|e| {
            let caller = match old.get(&e.digest) {
                Some(c) if c.name == e.name && c.limits == e.limits => c.clone(),
                _ => Arc::new(Caller::new(e.name, e.limits)),
            };
            (e.digest, caller)
        })
        .collect();
    Keys { by_digest }
}

fn parse_file(path: &Path, defaults: KeyLimits) -> Result<Vec<Entry>, String> {
    let at = |what: String| format!("{}: {what}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| at(format!("cannot read: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(at(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| at(format!("cannot read: {e}")))?;
    parse(&text, defaults).map_err(at)
}

fn parse(text: &str, defaults: KeyLimits) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    let mut names = std::collections::HashSet::new();
    let mut digests = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let at = |what: &str| format!("line {}: {what}", i + 1);
        let mut fields = line.split_whitespace();
        let (Some(name), Some(key)) = (fields.next(), fields.next()) else {
            return Err(at("expected `NAME KEY [requests_per_minute=N] [tokens_per_minute=N]`"));
        };
        if name.len() > MAX_NAME_LEN || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(at(&format!("the name must be 1 to {MAX_NAME_LEN} of A-Z a-z 0-9 - _ .")));
        }
        // The key itself is never repeated in a message.
        if !KEY_LEN.contains(&key.len()) || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(at(&format!(
                "the key of {name} must be {} to {} printable ASCII characters",
                KEY_LEN.start(),
                KEY_LEN.end()
            )));
        }
        let mut limits = defaults;
        for field in fields {
            let (what, value) = field.split_once('=').ok_or_else(|| at(&format!("{field:?}: expected NAME=N")))?;
            let n: NonZeroU32 =
                value.parse().map_err(|_| at(&format!("{what}: {value:?} is not a whole number of at least 1")))?;
            match what {
                "requests_per_minute" => limits.requests_per_minute = Some(n),
                "tokens_per_minute" => limits.tokens_per_minute = Some(n),
                _ => return Err(at(&format!("{what:?}: the limits are requests_per_minute and tokens_per_minute"))),
            }
        }
        if !names.insert(name.to_string()) {
            return Err(at(&format!("the name {name} appears twice")));
        }
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if !digests.insert(digest) {
            return Err(at(&format!("the key of {name} is also another name's key")));
        }
        entries.push(Entry { name: name.into(), digest, limits });
        if entries.len() > MAX_KEYS {
            return Err(at(&format!("more than {MAX_KEYS} keys")));
        }
    }
    if entries.is_empty() {
        return Err("holds no key: add a line `NAME KEY`".into());
    }
    Ok(entries)
}

/// Which paths answer without a key.
#[derive(Debug, Clone, Copy)]
pub struct OpenPaths {
    pub metrics: bool,
    pub health: bool,
}

/// The check both public APIs run before a request: the key, the key's request rate, and the
/// metrics of both outcomes.
pub struct Gate {
    auth: Arc<Auth>,
    metrics: Arc<RouterMetrics>,
}

impl Gate {
    pub fn new(auth: Arc<Auth>, metrics: Arc<RouterMetrics>) -> Arc<Self> {
        Arc::new(Gate { auth, metrics })
    }

    pub fn open(&self) -> OpenPaths {
        OpenPaths { metrics: self.auth.cfg.open_metrics, health: self.auth.cfg.open_health }
    }

    pub fn auth(&self) -> &Arc<Auth> {
        &self.auth
    }

    /// The caller behind an `Authorization` value, or the error to answer with.
    pub fn admit(&self, authorization: Option<&[u8]>, port: Port) -> Result<Arc<Caller>, RouterError> {
        match self.auth.identify(authorization) {
            Ok(caller) => match caller.admit_request() {
                Ok(()) => {
                    self.metrics.key_request(&caller.name, "admitted");
                    Ok(caller)
                }
                Err(denied) => {
                    self.metrics.key_request(&caller.name, denied.as_str());
                    Err(RouterError::Denied(denied))
                }
            },
            Err(denied) => {
                self.metrics.auth_denied(port, denied.as_str());
                Err(RouterError::Denied(denied))
            }
        }
    }
}

#[cfg(test)]
mod tests;
