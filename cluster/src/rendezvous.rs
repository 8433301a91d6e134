//! Tensor-parallel rendezvous: rank 0 publishes how to reach it under its group's key, leased
//! so the record dies with rank 0; the other ranks read it, or watch until it appears.

use std::time::Duration;

use etcd_client::{Client, EventType, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};

use crate::keys::{self, GroupName};
use crate::lease::Lease;
use crate::{ClusterError, Result};

/// What a rank needs to join rank 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Rank 0's collective listener, `host:port`.
    pub addr: String,
    pub world_size: u32,
}

/// Publishes `record` for `group` under `lease`.
pub async fn publish(client: &Client, group: &GroupName, record: &Record, lease: &Lease) -> Result<()> {
    let value = serde_json::to_vec(record).map_err(|e| ClusterError::Invalid(e.to_string()))?;
    client.clone().put(keys::rendezvous(group), value, Some(PutOptions::new().with_lease(lease.id()))).await?;
    Ok(())
}

/// The group's record as it is now, if any.
pub async fn read(client: &Client, group: &GroupName) -> Result<Option<Record>> {
    let resp = client.clone().get(keys::rendezvous(group), None).await?;
    match resp.kvs().first() {
        Some(kv) => Ok(Some(parse(kv.value())?)),
        None => Ok(None),
    }
}

/// Waits up to `timeout` for the group's record: reads it, else watches from the revision of
/// that read, so a record put in between is not missed.
pub async fn wait_for(client: &Client, group: &GroupName, timeout: Duration) -> Result<Record> {
    let key = keys::rendezvous(group);
    let fut = async {
        let mut c = client.clone();
        let resp = c.get(key.clone(), None).await?;
        if let Some(kv) = resp.kvs().first() {
            return parse(kv.value());
        }
        let from = resp.header().map_or(0, |h| h.revision()) + 1;
        let mut stream = c.watch(key.clone(), Some(WatchOptions::new().with_start_revision(from))).await?;
        while let Some(msg) = stream.message().await? {
            for ev in msg.events() {
                if ev.event_type() == EventType::Put {
                    if let Some(kv) = ev.kv() {
                        return parse(kv.value());
                    }
                }
            }
        }
        Err(ClusterError::Invalid(format!("watch on {key} ended")))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClusterError::Timeout(timeout, format!("rank 0 of group {}", group.as_str())))?
}

fn parse(bytes: &[u8]) -> Result<Record> {
    serde_json::from_slice(bytes).map_err(|e| ClusterError::Invalid(format!("rendezvous record: {e}")))
}
