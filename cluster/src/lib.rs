//! Everything qwen-serve keeps in etcd. Only this crate knows key paths (`keys`); leases are
//! bound to a cancellation token (`lease`); tensor-parallel ranks meet through a leased
//! rendezvous record (`rendezvous`); serving groups register for the router, which follows
//! them (`discovery`).

pub mod access;
pub mod discovery;
pub mod keys;
pub mod lease;
pub mod rendezvous;
#[cfg(feature = "testing")]
pub mod testing;

pub use access::{Etcd, EtcdArgs};
pub use etcd_client::Client;

/// Coarse class of a [`ClusterError`], for metrics and statuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// etcd could not be reached or answered with an error.
    Etcd,
    /// Waited past a deadline.
    Timeout,
    /// A record or name is malformed.
    Invalid,
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, String),
    #[error("{0}")]
    Invalid(String),
}

impl ClusterError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            ClusterError::Etcd(_) => ErrorKind::Etcd,
            ClusterError::Timeout(..) => ErrorKind::Timeout,
            ClusterError::Invalid(_) => ErrorKind::Invalid,
        }
    }
}

pub type Result<T, E = ClusterError> = std::result::Result<T, E>;

/// Connects to etcd (endpoints such as `http://127.0.0.1:2379`, with its TLS and user).
pub async fn connect(etcd: &Etcd) -> Result<Client> {
    Ok(Client::connect(&etcd.endpoints, Some(etcd.options(None)?)).await?)
}

/// Connects to etcd, retrying with backoff (100 ms doubling to 2 s, each try logged) until
/// `within` has passed: a process started a moment before etcd is reachable (a rollout, a
/// restart of etcd) waits for it instead of exiting.
pub async fn connect_with_retry(etcd: &Etcd, within: std::time::Duration) -> Result<Client> {
    let started = tokio::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(100);
    let mut attempt = 1u32;
    loop {
        let left = within.saturating_sub(started.elapsed());
        // The client connects lazily: a status call proves etcd answers.
        let probe = async {
            let mut client = connect(etcd).await?;
            client.status().await?;
            Ok::<_, ClusterError>(client)
        };
        let error = match tokio::time::timeout(left.max(pause), probe).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "connect timed out".to_string(),
        };
        if started.elapsed() + pause >= within {
            return Err(ClusterError::Timeout(within, format!("etcd at {:?} (last error: {error})", etcd.endpoints)));
        }
        tracing::warn!(attempt, error = %error, retry_in_ms = pause.as_millis() as u64, "etcd not reachable yet");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(2));
        attempt += 1;
    }
}
