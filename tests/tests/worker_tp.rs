//! `qwen-worker serve --tp 2`: rank processes meeting through a real etcd, serving the goldens
//! over gRPC; a SIGKILLed or SIGSTOPped rank takes the whole group down within the collective
//! timeout (no hang), and the group's etcd record disappears.

use std::time::{Duration, Instant};

use qwen_cluster::keys::GroupName;
use qwen_cluster::testing::EtcdServer;
use qwen_proto::worker::worker_client::WorkerClient;
use qwen_proto::worker::{GenerateRequest, SamplingParams};
use qwen_tests::{golden, ids, rank_pid, signal, WorkerProcess};
use tokio_stream::StreamExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn start_group(etcd: &str, group: &str) -> WorkerProcess {
    start_group_with(etcd, group, &[])
}

fn start_group_with(etcd: &str, group: &str, extra: &[&str]) -> WorkerProcess {
    WorkerProcess::start(
        "qwen2-gqa",
        &[
            &[
                "--tp",
                "2",
                "--etcd",
                etcd,
                "--group",
                group,
                "--block-size",
                "4",
                "--kv-cache-bytes",
                "1000000",
                "--collective-timeout-ms",
                "2000",
                "--stuck-after-ms",
                "300",
            ][..],
            extra,
        ]
        .concat(),
    )
}

async fn generate(addr: &str, prompt: &[u32], n: usize) -> Result<Vec<u32>, tonic::Status> {
    let mut c = WorkerClient::connect(addr.to_string()).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let req = GenerateRequest {
        prompt_token_ids: prompt.to_vec(),
        max_new_tokens: n as u32,
        ignore_eos: true,
        sampling: Some(SamplingParams { temperature: Some(0.0), repetition_penalty: Some(1.0), ..Default::default() }),
        ..Default::default()
    };
    let mut stream = c.generate(req).await?.into_inner();
    let mut out = Vec::new();
    while let Some(m) = stream.next().await {
        let m = m?;
        if m.finish_reason == qwen_proto::worker::FinishReason::Error as i32 {
            return Err(tonic::Status::internal(m.error));
        }
        out.extend(m.token_id);
    }
    Ok(out)
}

async fn record_exists(etcd: &EtcdServer, group: &str) -> bool {
    let client = qwen_cluster::connect(&etcd.access()).await.unwrap();
    qwen_cluster::rendezvous::read(&client, &GroupName::new(group).unwrap()).await.unwrap().is_some()
}

/// Waits until `w` has exited; panics after `limit`.
fn exits_within(w: &mut WorkerProcess, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(s) = w.try_wait() {
            return s;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the group did not stop within {limit:?}");
}

async fn record_gone_within(etcd: &EtcdServer, group: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while record_exists(etcd, group).await {
        assert!(Instant::now() < deadline, "rendezvous record of {group} outlived the group");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rank_processes_serve_goldens_and_die_together_on_sigkill() {
    let etcd = EtcdServer::start().expect("etcd");
    // A stale group-formed file from an earlier run of the pod: rank 1 must replace it only once
    // this group has formed (its readiness in Kubernetes).
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    std::fs::write(&ready, "stale").unwrap();
    let mut w = start_group_with(&etcd.endpoint, "tp-kill", &["--ready-file", ready.to_str().unwrap()]);
    assert!(record_exists(&etcd, "tp-kill").await);
    let formed = Instant::now();
    while std::fs::read_to_string(&ready).ok().as_deref() != Some("ready\n") {
        assert!(formed.elapsed() < Duration::from_secs(10), "rank 1 never wrote its ready file");
        std::thread::sleep(Duration::from_millis(50));
    }
    let g = golden("qwen2-gqa");
    for c in g["cases"].as_array().unwrap() {
        let want = ids(&c["greedy"]);
        assert_eq!(generate(&w.addr, &ids(&c["prompt_ids"]), want.len()).await.unwrap(), want);
    }
    let rank1 = rank_pid("tp-kill", 1).expect("rank 1 process");
    signal(rank1, "KILL");
    let status = exits_within(&mut w, Duration::from_secs(15));
    assert!(!status.success());
    assert!(rank_pid("tp-kill", 0).is_none(), "rank 0 outlived its group");
    record_gone_within(&etcd, "tp-kill", Duration::from_secs(6)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_rank_is_caught_by_the_collective_timeout() {
    let etcd = EtcdServer::start().expect("etcd");
    let mut w = start_group(&etcd.endpoint, "tp-stop");
    assert_eq!(generate(&w.addr, &[1, 2, 3], 4).await.unwrap().len(), 4);
    let rank1 = rank_pid("tp-stop", 1).expect("rank 1 process");
    signal(rank1, "STOP");
    let started = Instant::now();
    let stuck = generate(&w.addr, &[1, 2, 3], 4);
    // Health follows engine progress: NOT_SERVING while the step waits on the stopped rank,
    // well before the collective timeout (2 s) ends the group.
    let health = async {
        let channel = tonic::transport::Channel::from_shared(w.addr.clone()).unwrap().connect().await.unwrap();
        let mut h = HealthClient::new(channel);
        loop {
            let req = HealthCheckRequest { service: "qwen.worker.v1.Worker".into() };
            let status = h.check(req).await.map(|r| r.into_inner().status).unwrap_or(-1);
            if status == ServingStatus::NotServing as i32 {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (err, not_serving) = tokio::join!(stuck, tokio::time::timeout(Duration::from_secs(2), health));
    let not_serving = not_serving.expect("health turned NOT_SERVING before the collective timeout");
    assert!(not_serving < Duration::from_millis(1900), "{not_serving:?}");
    let err = err.expect_err("a forward needs the stopped rank");
    assert!(started.elapsed() < Duration::from_secs(10), "{err:?} after {:?}", started.elapsed());
    let status = exits_within(&mut w, Duration::from_secs(15));
    assert!(!status.success());
    signal(rank1, "KILL");
    record_gone_within(&etcd, "tp-stop", Duration::from_secs(6)).await;
}

/// A group started while etcd is down waits for it (retrying with backoff) instead of exiting,
/// and serves once etcd is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_started_before_etcd_waits_for_it() {
    let mut etcd = EtcdServer::start().expect("etcd");
    etcd.stop();
    let endpoint = etcd.endpoint.clone();
    let restart = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        etcd.restart().expect("etcd restarts");
        etcd
    });
    let w = start_group(&endpoint, "tp-late");
    let _etcd = restart.join().unwrap();
    assert_eq!(generate(&w.addr, &[1, 2, 3], 4).await.unwrap().len(), 4);
}
