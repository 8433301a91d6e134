//! Everything qwen-serve keeps in etcd. Only this crate knows key paths (`keys`); leases are
//! bound to a cancellation token (`lease`); tensor-parallel ranks meet through a leased
//! rendezvous record (`rendezvous`); serving groups register for the router, which follows
//! them (`discovery`).

pub mod discovery;
pub mod keys;
pub mod lease;
pub mod rendezvous;
#[cfg(feature = "testing")]
pub mod testing;

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

/// Connects to etcd at `endpoints` (e.g. `http://127.0.0.1:2379`).
pub async fn connect(endpoints: &[String]) -> Result<Client> {
    Ok(Client::connect(endpoints, None).await?)
}
