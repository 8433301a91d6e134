//! An etcd lease kept alive for exactly as long as its cancellation token is not cancelled.
//! Keys put with it vanish when the owner stops (token cancelled: revoked at once) or dies
//! (keep-alives stop: expired after the TTL).

use std::time::Duration;

use etcd_client::Client;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::Result;

pub struct Lease {
    id: i64,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl Lease {
    /// Grants a lease of `ttl` and keeps it alive every `ttl / 3` until `cancel` fires; then
    /// revokes it.
    pub async fn grant(client: &Client, ttl: Duration, cancel: CancellationToken) -> Result<Lease> {
        let mut client = client.clone();
        let ttl_s = ttl.as_secs().max(1) as i64;
        let id = client.lease_grant(ttl_s, None).await?.id();
        let (mut keeper, mut responses) = client.lease_keep_alive(id).await?;
        let token = cancel.clone();
        let period = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        if keeper.keep_alive().await.is_err() {
                            tracing::warn!(lease = id, "lease keep-alive failed");
                            break;
                        }
                        let _ = responses.message().await;
                    }
                }
            }
            if let Err(e) = client.lease_revoke(id).await {
                tracing::debug!(lease = id, error = %e, "lease revoke failed (it will expire)");
            }
        });
        Ok(Lease { id, cancel, task })
    }

    pub fn id(&self) -> i64 {
        self.id
    }

    /// Stops the keep-alives and revokes the lease, waiting until it is gone.
    pub async fn revoke(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}
