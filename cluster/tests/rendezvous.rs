//! Rendezvous against a real etcd: a waiting rank sees the record put after it started
//! waiting; the record disappears when rank 0 revokes its lease and when it stops renewing it.

use std::time::Duration;

use qwen_cluster::keys::GroupName;
use qwen_cluster::lease::Lease;
use qwen_cluster::rendezvous::{self, Record};
use qwen_cluster::testing::EtcdServer;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_meet_and_the_record_dies_with_its_lease() {
    let etcd = EtcdServer::start().expect("etcd");
    let client = qwen_cluster::connect(&etcd.access()).await.unwrap();
    let group = GroupName::new("g1").unwrap();
    assert_eq!(rendezvous::read(&client, &group).await.unwrap(), None);

    // A follower waits before rank 0 publishes.
    let c = client.clone();
    let g = group.clone();
    let waiter = tokio::spawn(async move { rendezvous::wait_for(&c, &g, Duration::from_secs(10)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lease = Lease::grant(&client, Duration::from_secs(2), CancellationToken::new()).await.unwrap();
    let record = Record { addr: "127.0.0.1:4000".into(), world_size: 2 };
    rendezvous::publish(&client, &group, &record, &lease).await.unwrap();
    assert_eq!(waiter.await.unwrap().unwrap(), record);

    // Revoked on a clean stop: gone at once.
    lease.revoke().await;
    assert_eq!(rendezvous::read(&client, &group).await.unwrap(), None);

    // Waiting with nobody publishing is a timeout, not a hang.
    let err = rendezvous::wait_for(&client, &GroupName::new("nobody").unwrap(), Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), qwen_cluster::ErrorKind::Timeout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_owner_s_record_expires() {
    let etcd = EtcdServer::start().expect("etcd");
    let client = qwen_cluster::connect(&etcd.access()).await.unwrap();
    let group = GroupName::new("g2").unwrap();
    // Grant by hand with no keep-alive: like an owner that was SIGKILLed right after publishing.
    let mut c = client.clone();
    let id = c.lease_grant(1, None).await.unwrap().id();
    let value = serde_json::to_vec(&Record { addr: "x:1".into(), world_size: 2 }).unwrap();
    c.put(qwen_cluster::keys::rendezvous(&group), value, Some(etcd_client::PutOptions::new().with_lease(id)))
        .await
        .unwrap();
    assert!(rendezvous::read(&client, &group).await.unwrap().is_some());
    let mut gone = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if rendezvous::read(&client, &group).await.unwrap().is_none() {
            gone = true;
            break;
        }
    }
    assert!(gone, "the record outlived its lease");
}
