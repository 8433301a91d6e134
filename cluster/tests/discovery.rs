//! Discovery against a real etcd: registrations show up in the membership and leave it on a
//! clean stop (at once) or a death (after the TTL); both sides ride out etcd restarts and a
//! lease revoked behind the registration's back; junk under the prefix is skipped.

use std::sync::Arc;
use std::time::{Duration, Instant};

use qwen_cluster::discovery::{
    Membership, MembershipConfig, Registration, RegistrationConfig, SessionState, WorkerRecord, Workers,
};
use qwen_cluster::keys::{self, GroupName};
use qwen_cluster::testing::EtcdServer;
use tokio_util::sync::CancellationToken;

/// How long anything that should happen "soon" may take on a slow, busy machine.
const DEADLINE: Duration = Duration::from_secs(15);

fn record(group: &str) -> WorkerRecord {
    WorkerRecord {
        group: group.into(),
        grpc_addr: format!("10.0.0.1:{}", 50000 + group.len()),
        model: "qwen".into(),
        tp: 2,
    }
}

fn registration(etcd: &EtcdServer, group: &str, ttl: Duration) -> Registration {
    let cfg = RegistrationConfig { etcd: etcd.access(), record: record(group), ttl };
    Registration::spawn(cfg, CancellationToken::new())
}

fn membership(etcd: &EtcdServer, relist_every: Duration) -> Membership {
    Membership::start(MembershipConfig { etcd: etcd.access(), relist_every }, CancellationToken::new())
}

/// Polls `cond` until it holds; panics naming `what` after [`DEADLINE`].
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `m` holds exactly `groups`, each with its right record.
fn only(m: &Workers, groups: &[&str]) -> bool {
    m.len() == groups.len() && groups.iter().all(|g| m.get(*g) == Some(&record(g)))
}

async fn client(etcd: &EtcdServer) -> qwen_cluster::Client {
    qwen_cluster::connect(&etcd.access()).await.unwrap()
}

/// The lease the group's record is stored under, or `None` if there is no record.
async fn stored_lease(etcd: &EtcdServer, group: &str) -> Option<i64> {
    let key = keys::worker(&GroupName::new(group).unwrap());
    let resp = client(etcd).await.get(key, None).await.unwrap();
    resp.kvs().first().map(|kv| kv.lease())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_appears_and_a_stop_removes_it_at_once() {
    let etcd = EtcdServer::start().expect("etcd");
    // A short relist exercises relisting under a healthy watch: it must not disturb the map.
    let members = membership(&etcd, Duration::from_millis(300));
    eventually("membership connects", || members.connected()).await;
    assert!(members.snapshot().is_empty());

    let reg = registration(&etcd, "g-a", Duration::from_secs(30));
    let mut state = reg.state();
    eventually("the record appears", || only(&members.snapshot(), &["g-a"])).await;
    eventually("the registration says so", || *state.borrow_and_update() == SessionState::Registered).await;
    let mut updates = members.subscribe();
    updates.mark_unchanged();

    // Stop revokes before it returns: the record is gone from etcd, not waiting out 30 s.
    reg.stop().await;
    assert_eq!(stored_lease(&etcd, "g-a").await, None);
    eventually("the record leaves the membership", || members.snapshot().is_empty()).await;
    assert!(updates.has_changed().unwrap());
    members.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_s_record_expires_after_its_ttl() {
    let etcd = EtcdServer::start().expect("etcd");
    let members = membership(&etcd, Duration::from_secs(30));
    // The worker lives in its own runtime so that it can die mid-flight: shutting that runtime
    // down drops its tasks at their next await, with no revoke, like a SIGKILL.
    let worker_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let reg = {
        let _in_worker = worker_rt.enter();
        registration(&etcd, "g-dead", Duration::from_secs(2))
    };
    eventually("the record appears", || only(&members.snapshot(), &["g-dead"])).await;

    let died = Instant::now();
    worker_rt.shutdown_background();
    drop(reg);
    eventually("the record expires", || members.snapshot().is_empty()).await;
    // The last keep-alive was at most ttl/3 before the death, so the lease outlived it by at
    // least 2/3 of the TTL: it was the expiry, not a revoke, that removed the record.
    assert!(died.elapsed() >= Duration::from_secs(1), "gone after {:?}", died.elapsed());
    assert_eq!(stored_lease(&etcd, "g-dead").await, None);
    members.stop().await;
}

/// Stops etcd under a registered worker and a membership, checks both hold on, restarts etcd
/// (with or without its data) and checks both recover.
async fn ride_out_an_etcd_restart(group: &str, keep_data: bool) {
    let mut etcd = EtcdServer::start().expect("etcd");
    let members = membership(&etcd, Duration::from_secs(30));
    let ttl = Duration::from_secs(3);
    let reg = registration(&etcd, group, ttl);
    let mut state = reg.state();
    eventually("the record appears", || only(&members.snapshot(), &[group])).await;
    eventually("registered", || *state.borrow_and_update() == SessionState::Registered).await;

    tokio::task::block_in_place(|| etcd.stop());
    eventually("the membership notices", || !members.connected()).await;
    eventually("the registration notices", || *state.borrow_and_update() == SessionState::Lost).await;
    // Give a wrong implementation time to clear the map, past a few reconnect attempts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(only(&members.snapshot(), &[group]), "the last known map is kept while etcd is down");
    assert!(!members.connected());

    if keep_data {
        tokio::task::block_in_place(|| etcd.restart()).expect("etcd restart");
    } else {
        tokio::task::block_in_place(|| etcd.restart_empty()).expect("etcd restart");
    }
    eventually("the membership reconnects", || members.connected()).await;
    eventually("registered again", || *state.borrow_and_update() == SessionState::Registered).await;
    let deadline = Instant::now() + DEADLINE;
    while stored_lease(&etcd, group).await.is_none() {
        assert!(Instant::now() < deadline, "the record did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("the membership shows it", || only(&members.snapshot(), &[group])).await;
    // Kept alive, not just restored from disk: it outlives its TTL twice over.
    tokio::time::sleep(2 * ttl).await;
    assert!(stored_lease(&etcd, group).await.is_some(), "the record expired after the restart");
    assert!(only(&members.snapshot(), &[group]));

    reg.stop().await;
    eventually("the record leaves", || members.snapshot().is_empty()).await;
    members.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_ride_out_an_etcd_restart() {
    ride_out_an_etcd_restart("g-restart", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sides_ride_out_an_etcd_that_lost_its_data() {
    // No keys, no leases, revisions from 1 again: the old lease is unknown and must be replaced.
    ride_out_an_etcd_restart("g-wiped", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_revoked_behind_the_registration_s_back_is_granted_again() {
    let etcd = EtcdServer::start().expect("etcd");
    let members = membership(&etcd, Duration::from_secs(30));
    let reg = registration(&etcd, "g-revoked", Duration::from_secs(3));
    eventually("the record appears", || only(&members.snapshot(), &["g-revoked"])).await;
    let old = stored_lease(&etcd, "g-revoked").await.expect("a leased record");

    let mut removed = members.subscribe();
    removed.mark_unchanged();
    client(&etcd).await.lease_revoke(old).await.unwrap();
    assert_eq!(stored_lease(&etcd, "g-revoked").await, None);
    let deadline = Instant::now() + DEADLINE;
    loop {
        match stored_lease(&etcd, "g-revoked").await {
            Some(new) => {
                assert_ne!(new, old, "re-put under the revoked lease?");
                break;
            }
            None => assert!(Instant::now() < deadline, "the record did not come back"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eventually("the membership shows it again", || only(&members.snapshot(), &["g-revoked"])).await;
    assert!(removed.has_changed().unwrap(), "the membership never saw it go");
    assert_eq!(*reg.state().borrow(), SessionState::Registered);
    reg.stop().await;
    members.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_under_the_prefix_is_skipped() {
    let etcd = EtcdServer::start().expect("etcd");
    let mut c = client(&etcd).await;
    let prefix = keys::workers_prefix();
    let json = |r: &WorkerRecord| serde_json::to_vec(r).unwrap();
    // Present at the first listing: garbage, a key naming no group, a record posing as another
    // group, and one good record.
    c.put(format!("{prefix}bad"), "not json", None).await.unwrap();
    c.put(format!("{prefix}a/b"), json(&record("a")), None).await.unwrap();
    c.put(format!("{prefix}liar"), json(&record("other")), None).await.unwrap();
    c.put(format!("{prefix}good"), json(&record("good")), None).await.unwrap();

    let members = membership(&etcd, Duration::from_secs(30));
    eventually("the good record is listed", || only(&members.snapshot(), &["good"])).await;

    // Through the watch: a good record overwritten with garbage goes, new garbage is skipped,
    // and records after it are still applied.
    c.put(format!("{prefix}good"), "{", None).await.unwrap();
    c.put(format!("{prefix}bad2"), vec![0xff, 0xfe], None).await.unwrap();
    c.put(format!("{prefix}good2"), json(&record("good2")), None).await.unwrap();
    eventually("the watch applied all of it", || only(&members.snapshot(), &["good2"])).await;
    assert!(members.connected(), "junk must not break the watch");
    let snapshot: Arc<Workers> = members.snapshot();
    assert_eq!(snapshot.keys().collect::<Vec<_>>(), ["good2"]);
    members.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_nothing_hangs() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let etcd = qwen_cluster::Etcd::plain(vec![format!("http://127.0.0.1:{port}")]);
    let cfg = RegistrationConfig { etcd: etcd.clone(), record: record("g-none"), ttl: Duration::from_secs(2) };
    let reg = Registration::spawn(cfg, CancellationToken::new());
    let members =
        Membership::start(MembershipConfig { etcd, relist_every: Duration::from_secs(1) }, CancellationToken::new());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(*reg.state().borrow(), SessionState::Connecting);
    assert!(!members.connected());
    assert!(members.snapshot().is_empty());
    // Nothing to revoke, nothing to wait for.
    tokio::time::timeout(DEADLINE, async {
        reg.stop().await;
        members.stop().await;
    })
    .await
    .expect("stop hung without etcd");
}

/// With etcd's authentication on, a client's token expires (here after 1 s): calls after that
/// still work, as the client gets a new token instead of failing until it reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_auth_token_is_refreshed() {
    use qwen_cluster::access::Credentials;
    use qwen_cluster::testing::{enable_auth, EtcdOptions};
    let etcd = EtcdServer::start_with(EtcdOptions { tls: None, auth_token_ttl_secs: Some(1) }).unwrap();
    enable_auth(&etcd.access(), "root-pw", "qwen-pw").await.unwrap();
    let worker = qwen_cluster::Etcd {
        user: Some(Credentials { user: "qwen-worker".into(), password: "qwen-pw".into() }),
        ..etcd.access()
    };
    let mut client = qwen_cluster::connect(&worker).await.unwrap();
    let key = format!("{}/token-test", qwen_cluster::keys::PREFIX);
    client.put(key.clone(), "1", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client.put(key.clone(), "2", None).await.expect("a put after the token expired");
    let got = client.get(key, None).await.unwrap();
    assert_eq!(got.kvs()[0].value(), b"2");
}
