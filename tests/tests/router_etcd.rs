//! Worker groups registering in a real etcd and a router discovering them: a killed group leaves
//! routing within its lease TTL and rejoins when restarted; etcd going away leaves routing on the
//! last membership and registrations come back with it; a drained group finishes its streams.

use std::time::{Duration, Instant};

use futures::StreamExt;
use qwen_cluster::keys::{self, GroupName};
use qwen_cluster::testing::EtcdServer;
use qwen_proto::serve::generation_client::GenerationClient;
use qwen_proto::serve::{
    generate_request, GenerateRequest, GenerationOptions, ListModelsRequest, SamplingParams, TokenIds,
};
use qwen_tests::{signal, RouterProcess, WorkerProcess};
use tonic::transport::Channel;

const MODEL: &str = "qwen2-gqa";

fn start_worker(etcd: &EtcdServer, group: &str) -> WorkerProcess {
    WorkerProcess::start(
        MODEL,
        &["--etcd", &etcd.endpoint, "--group", group, "--registration-ttl-secs", "2", "--drain-timeout-secs", "20"],
    )
}

async fn client(r: &RouterProcess) -> GenerationClient<Channel> {
    GenerationClient::connect(r.grpc.clone()).await.expect("connect to router")
}

fn request(max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model: MODEL.into(),
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids: vec![3, 4, 5] })),
        options: Some(GenerationOptions {
            sampling: Some(SamplingParams { temperature: Some(0.0), ..Default::default() }),
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
    }
}

async fn groups_serving(r: &RouterProcess) -> u32 {
    let models = client(r).await.list_models(ListModelsRequest {}).await.unwrap().into_inner().models;
    models.iter().find(|m| m.id == MODEL).map_or(0, |m| m.groups)
}

async fn wait_groups(r: &RouterProcess, n: u32, limit: Duration) -> Duration {
    let start = Instant::now();
    while groups_serving(r).await != n {
        assert!(start.elapsed() < limit, "router did not reach {n} groups within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

async fn registered(etcd: &EtcdServer, group: &str) -> bool {
    let mut c = qwen_cluster::connect(&etcd.access()).await.unwrap();
    let key = keys::worker(&GroupName::new(group).unwrap());
    !c.get(key, None).await.unwrap().kvs().is_empty()
}

async fn wait_registered(etcd: &EtcdServer, group: &str, want: bool, limit: Duration) {
    let start = Instant::now();
    while registered(etcd, group).await != want {
        assert!(start.elapsed() < limit, "record of {group} present={} after {limit:?}", !want);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Group names that served `n` sequential requests.
async fn served_by(r: &RouterProcess, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let resp = client(r).await.generate(request(2)).await.expect("generate");
        out.push(resp.metadata().get("x-qwen-serve-group").unwrap().to_str().unwrap().to_string());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_come_and_go_through_etcd() {
    let mut etcd = EtcdServer::start().expect("etcd");
    let a = start_worker(&etcd, "ga");
    let _b = start_worker(&etcd, "gb");
    let r = RouterProcess::start(&[
        "--etcd",
        &etcd.endpoint,
        "--policy",
        "round-robin",
        "--relist-secs",
        "2",
        "--expose-group",
    ]);
    wait_groups(&r, 2, Duration::from_secs(20)).await;
    let groups = served_by(&r, 4).await;
    assert!(groups.contains(&"ga".to_string()) && groups.contains(&"gb".to_string()), "{groups:?}");

    // kill -9: the record expires with its 2 s lease, and routing to the group stops.
    signal(a.pid(), "KILL");
    let gone = wait_groups(&r, 1, Duration::from_secs(10)).await;
    wait_registered(&etcd, "ga", false, Duration::from_secs(6)).await;
    assert!(served_by(&r, 4).await.iter().all(|g| g == "gb"));
    eprintln!("routing stopped {gone:?} after kill -9");
    drop(a);
    // Its metric series leave with it (per-group series are never left behind).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(format!("{}/metrics", r.http)).await.unwrap().text().await.unwrap();
        if !text.contains(r#"group="ga""#) {
            assert!(text.contains(r#"qwen_serve_router_group_routed_requests_total{group="gb"}"#), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "series of the departed group remain:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Restarted under the same name (on a new port): it rejoins.
    let _a = start_worker(&etcd, "ga");
    wait_groups(&r, 2, Duration::from_secs(20)).await;
    assert!(served_by(&r, 4).await.contains(&"ga".to_string()));

    // etcd down: routing goes on with the last membership.
    etcd.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let groups = served_by(&r, 4).await;
    assert!(groups.contains(&"ga".to_string()) && groups.contains(&"gb".to_string()), "{groups:?}");
    // etcd back (its data kept): both registrations are there again and routing still spans both.
    etcd.restart().expect("etcd restart");
    wait_registered(&etcd, "ga", true, Duration::from_secs(15)).await;
    wait_registered(&etcd, "gb", true, Duration::from_secs(15)).await;
    assert_eq!(groups_serving(&r).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_group_leaves_routing_and_finishes_its_streams() {
    let etcd = EtcdServer::start().expect("etcd");
    let mut a = start_worker(&etcd, "drain-a");
    let _b = start_worker(&etcd, "drain-b");
    let r = RouterProcess::start(&["--etcd", &etcd.endpoint, "--policy", "round-robin", "--expose-group"]);
    wait_groups(&r, 2, Duration::from_secs(20)).await;
    // Streams on both; the client reads slowly, so the one on drain-a is running at SIGTERM.
    let mut on_a = None;
    while on_a.is_none() {
        let resp = client(&r).await.generate_stream(request(200)).await.unwrap();
        if resp.metadata().get("x-qwen-serve-group").unwrap() == "drain-a" {
            let mut s = resp.into_inner();
            s.next().await.unwrap().unwrap();
            on_a = Some(s);
        }
    }
    signal(a.pid(), "TERM");
    // The group leaves etcd and routing at once, but its stream runs to the end.
    wait_registered(&etcd, "drain-a", false, Duration::from_secs(5)).await;
    wait_groups(&r, 1, Duration::from_secs(5)).await;
    let mut tokens = 1;
    let mut stream = on_a.unwrap();
    let mut finish = 0;
    while let Some(msg) = stream.next().await {
        let msg = msg.expect("the draining group finishes its stream");
        tokens += msg.token_ids.len();
        finish = msg.finish_reason;
    }
    assert_eq!((tokens, finish), (200, 1), "all 200 tokens, finish LENGTH");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = a.try_wait() {
            break s;
        }
        assert!(Instant::now() < deadline, "drained worker did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(served_by(&r, 3).await.iter().all(|g| g == "drain-b"));
}
