//! Safe to expose: API keys on both public APIs (reloaded without a restart), per-key rate
//! limits, a TLS + mutual-TLS cluster meeting through an etcd with TLS and users, and a worker
//! that takes Cancel only from the connection that submitted the request. Real processes, a real
//! etcd, certificates made here.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qwen_cluster::keys::{self, GroupName};
use qwen_cluster::testing::{EtcdOptions, EtcdServer, ServerTls};
use qwen_cluster::Etcd;
use qwen_proto::serve::generation_client::GenerationClient;
use qwen_proto::serve::{generate_request, GenerateRequest, GenerationOptions, ListModelsRequest, TokenIds};
use qwen_tests::{bare, signal, RouterProcess, WorkerProcess};
use qwen_tls::dev::{DevCa, Usage};
use qwen_tls::{CertFiles, ClientTls};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const MODEL: &str = "qwen2-gqa";
const ALICE: &str = "sk-alice-5c0d2c8e9a4b4f61";
const BOB: &str = "sk-bob-91e7a3f04c2d8b55aa";

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

fn completion(max_tokens: u32) -> serde_json::Value {
    serde_json::json!({"model": MODEL, "prompt": [3, 4, 5], "max_tokens": max_tokens, "temperature": 0})
}

async fn post(http: &reqwest::Client, base: &str, key: Option<&str>, body: &serde_json::Value) -> reqwest::Response {
    let mut req = http.post(format!("{base}/v1/completions")).json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.expect("the router answers")
}

fn grpc_request() -> tonic::Request<GenerateRequest> {
    tonic::Request::new(GenerateRequest {
        model: MODEL.into(),
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids: vec![3, 4, 5] })),
        options: Some(GenerationOptions { max_tokens: Some(2), ..Default::default() }),
    })
}

fn with_key<T>(mut req: tonic::Request<T>, key: &str) -> tonic::Request<T> {
    req.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    req
}

/// Polls `check` every 100 ms until it holds; panics with `what` after `limit`.
async fn eventually<F: std::future::Future<Output = bool>>(limit: Duration, what: &str, mut check: impl FnMut() -> F) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn metrics(http: &reqwest::Client, base: &str, key: &str) -> String {
    let r = http.get(format!("{base}/metrics")).bearer_auth(key).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// A worker behind a router that requires the keys of `lines` (health open for readiness).
struct Keyed {
    _dir: tempfile::TempDir,
    keys: PathBuf,
    // Dropped in this order: the router first, then its worker.
    router: RouterProcess,
    _worker: WorkerProcess,
}

impl Keyed {
    async fn start(lines: &str, extra: &[&str]) -> Keyed {
        let dir = tempfile::tempdir().unwrap();
        let keys = write(&dir.path().join("keys"), lines);
        let worker = WorkerProcess::start(MODEL, &[]);
        let mut args = vec!["--worker", bare(&worker.addr), "--api-key-file", s(&keys), "--health-without-key"];
        args.extend_from_slice(extra);
        let router = RouterProcess::start(&args);
        router.wait_ready().await; // health answers without a key
        Keyed { _dir: dir, keys, router, _worker: worker }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_both_apis_and_reload_without_a_restart() {
    let keyed = Keyed::start(&format!("alice {ALICE}\n"), &["--reload-check-secs", "1"]).await;
    let (keys, router) = (&keyed.keys, &keyed.router);
    let http = reqwest::Client::new();

    // HTTP: no key, a wrong key, the right key.
    for key in [None, Some("sk-mallory-000000000000")] {
        let r = post(&http, &router.http, key, &completion(2)).await;
        assert_eq!(r.status(), 401);
        assert_eq!(r.headers()["www-authenticate"], "Bearer");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error");
    }
    let r = post(&http, &router.http, Some(ALICE), &completion(2)).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    let id = body["id"].as_str().unwrap();
    let hex = id.strip_prefix("cmpl-").unwrap();
    assert!(hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()), "server ids are 128 random bits: {id}");
    assert_eq!(http.get(format!("{}/v1/models", router.http)).send().await.unwrap().status(), 401);
    assert_eq!(http.get(format!("{}/metrics", router.http)).send().await.unwrap().status(), 401, "metrics need a key");

    // gRPC: the same keys in `authorization` metadata.
    let mut grpc = GenerationClient::connect(router.grpc.clone()).await.unwrap();
    let e = grpc.generate(grpc_request()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = grpc.generate(with_key(grpc_request(), "sk-mallory-000000000000")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    grpc.generate(with_key(grpc_request(), ALICE)).await.expect("a good key generates");
    let e = grpc.list_models(ListModelsRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(router.grpc.clone()).unwrap().connect_lazy(),
    );
    health.check(tonic_health::pb::HealthCheckRequest::default()).await.expect("--health-without-key");

    let text = metrics(&http, &router.http, ALICE).await;
    assert!(text.contains(r#"qwen_serve_router_key_requests_total{key="alice",outcome="admitted"}"#), "{text}");
    assert!(text.contains(r#"qwen_serve_router_auth_denied_total{port="http",reason="missing"}"#), "{text}");
    assert!(!text.contains(ALICE), "the key itself never appears");

    // A key added to the file works after the change is noticed, without a restart ...
    write(keys, &format!("alice {ALICE}\nbob {BOB}\n"));
    let http2 = http.clone();
    let base = router.http.clone();
    eventually(Duration::from_secs(15), "bob's new key works", || {
        let (http, base) = (http2.clone(), base.clone());
        async move { post(&http, &base, Some(BOB), &completion(1)).await.status() == 200 }
    })
    .await;
    // ... and a removed one stops working on SIGHUP.
    write(keys, &format!("bob {BOB}\n"));
    signal(router.pid(), "HUP");
    eventually(Duration::from_secs(15), "alice's removed key is refused", || {
        let (http, base) = (http.clone(), base.clone());
        async move { post(&http, &base, Some(ALICE), &completion(1)).await.status() == 401 }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_limits_answer_429_with_retry_after() {
    let lines = format!("slow {ALICE} requests_per_minute=2\nthrifty {BOB} tokens_per_minute=100\n");
    let keyed = Keyed::start(&lines, &["--metrics-without-key"]).await;
    let router = &keyed.router;
    let http = reqwest::Client::new();

    for _ in 0..2 {
        assert_eq!(post(&http, &router.http, Some(ALICE), &completion(1)).await.status(), 200);
    }
    let r = post(&http, &router.http, Some(ALICE), &completion(1)).await;
    assert_eq!(r.status(), 429);
    let wait: u64 = r.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&wait), "two a minute: the next within 30 s, not {wait}");
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    let mut grpc = GenerationClient::connect(router.grpc.clone()).await.unwrap();
    let e = grpc.generate(with_key(grpc_request(), ALICE)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.metadata().get("retry-after").is_some());

    // Tokens: 3 prompt + 40 max_tokens = 43 per request from 100 a minute.
    for _ in 0..2 {
        assert_eq!(post(&http, &router.http, Some(BOB), &completion(40)).await.status(), 200);
    }
    let r = post(&http, &router.http, Some(BOB), &completion(40)).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    // One request larger than a minute's tokens can never pass: a 400 naming max_tokens.
    let r = post(&http, &router.http, Some(BOB), &completion(200)).await;
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["param"], "max_tokens", "{body}");

    let text = http.get(format!("{}/metrics", router.http)).send().await.unwrap().text().await.unwrap();
    assert!(text.contains(r#"qwen_serve_router_key_requests_total{key="slow",outcome="rate_limited"} 2"#), "{text}");
    assert!(text.contains(r#"qwen_serve_router_key_requests_total{key="thrifty",outcome="rate_limited"} 1"#), "{text}");
}

/// The certificates of a secured cluster, from one throwaway CA.
struct Certs {
    ca: PathBuf,
    /// etcd, the worker and the router's public ports (localhost, 127.0.0.1).
    server: CertFiles,
    /// The router's client certificate towards workers.
    router: CertFiles,
    /// The client certificate every process presents to etcd.
    etcd_client: CertFiles,
}

fn certs(dir: &Path) -> Certs {
    let ca = DevCa::create(dir, "qwen-serve test CA").unwrap();
    Certs {
        ca: ca.ca_file(),
        server: ca.issue("server", &["localhost", "127.0.0.1"], Usage::Server).unwrap(),
        router: ca.issue("router", &["qwen-router"], Usage::Client).unwrap(),
        etcd_client: ca.issue("etcd-client", &["qwen-etcd-client"], Usage::Client).unwrap(),
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn tonic_tls(c: &Certs, identity: Option<&CertFiles>) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&c.ca).unwrap()));
    if let Some(id) = identity {
        tls = tls.identity(Identity::from_pem(std::fs::read(&id.cert).unwrap(), std::fs::read(&id.key).unwrap()));
    }
    tls
}

async fn tls_channel(addr: &str, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_and_mtls_cluster_meets_through_an_etcd_with_tls_and_users() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path());
    let tls = ServerTls { cert: c.server.clone(), client_ca: c.ca.clone() };
    let etcd = EtcdServer::start_with(EtcdOptions { tls: Some(tls), auth_token_ttl_secs: None }).unwrap();
    let etcd_tls = ClientTls { ca: c.ca.clone(), identity: Some(c.etcd_client.clone()), server_name: None };
    let admin = Etcd { endpoints: vec![etcd.endpoint.clone()], tls: Some(etcd_tls.clone()), user: None };
    qwen_cluster::testing::enable_auth(&admin, "root-pw", "qwen-pw").await.unwrap();
    let password = write(&dir.path().join("etcd-password"), "qwen-pw\n");
    let keys = write(&dir.path().join("keys"), &format!("alice {ALICE}\n"));
    let etcd_flags = |user: &'static str| {
        let mut v: Vec<String> = vec!["--etcd".into(), etcd.endpoint.clone()];
        for (flag, path) in
            [("--etcd-ca", &c.ca), ("--etcd-cert", &c.etcd_client.cert), ("--etcd-key", &c.etcd_client.key)]
        {
            v.extend([flag.to_string(), s(path).to_string()]);
        }
        v.extend(["--etcd-user".into(), user.into(), "--etcd-password-file".into(), s(&password).into()]);
        v
    };

    let mut worker_args = etcd_flags("qwen-worker");
    for (flag, path) in [("--tls-cert", &c.server.cert), ("--tls-key", &c.server.key), ("--tls-client-ca", &c.ca)] {
        worker_args.extend([flag.to_string(), s(path).to_string()]);
    }
    worker_args.extend(["--group".into(), "secure-0".into(), "--registration-ttl-secs".into(), "2".into()]);
    let worker = WorkerProcess::start(MODEL, &worker_args.iter().map(String::as_str).collect::<Vec<_>>());

    let mut router_args = etcd_flags("qwen-router");
    for (flag, path) in [
        ("--worker-tls-ca", &c.ca),
        ("--worker-tls-cert", &c.router.cert),
        ("--worker-tls-key", &c.router.key),
        ("--tls-cert", &c.server.cert),
        ("--tls-key", &c.server.key),
        ("--api-key-file", &keys),
    ] {
        router_args.extend([flag.to_string(), s(path).to_string()]);
    }
    router_args.push("--health-without-key".into());
    let log = dir.path().join("router.log");
    let router = RouterProcess::start_logged(&router_args.iter().map(String::as_str).collect::<Vec<_>>(), &log);
    let https = |a: &str| a.replace("http://", "https://");

    // The public HTTP port speaks TLS with the CA's certificate, and the group serves through it.
    let ca_pem = std::fs::read(&c.ca).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca_pem).unwrap())
        .build()
        .unwrap();
    let base = https(&router.http);
    eventually(Duration::from_secs(30), "the router serves the group over TLS", || {
        let (http, base) = (http.clone(), base.clone());
        async move { http.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    let r = post(&http, &base, Some(ALICE), &completion(3)).await;
    assert_eq!(r.status(), 200);
    assert!(reqwest::get(format!("{}/health", router.http)).await.is_err(), "no plain HTTP on a TLS port");

    // gRPC over TLS, with a key.
    let channel = tls_channel(bare(&router.grpc), tonic_tls(&c, None)).await.unwrap();
    GenerationClient::new(channel).generate(with_key(grpc_request(), ALICE)).await.expect("generate over TLS");

    // The worker takes only clients with a certificate from the CA.
    let addr = bare(&worker.addr).to_string();
    let probe = |channel: Channel| async move {
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
    };
    let router_cert = tls_channel(&addr, tonic_tls(&c, Some(&c.router))).await.unwrap();
    probe(router_cert).await.expect("a client with the router's certificate");
    let refused = match tls_channel(&addr, tonic_tls(&c, None)).await {
        Ok(ch) => probe(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate is refused");
    let plain = Channel::from_shared(worker.addr.clone()).unwrap().connect_timeout(Duration::from_secs(5));
    let refused = match plain.connect().await {
        Ok(ch) => probe(ch).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a plain-text client is refused");

    // Registering in etcd needs a worker's credentials: a certificate alone (no user) or the
    // router's read-only user cannot write a record.
    let record = br#"{"group":"rogue","grpc_addr":"127.0.0.1:1","model":"qwen2-gqa","tp":1}"#.to_vec();
    let rogue_key = keys::worker(&GroupName::new("rogue").unwrap());
    let no_user = Etcd { user: None, ..admin.clone() };
    let router_user = Etcd {
        user: Some(qwen_cluster::access::Credentials { user: "qwen-router".into(), password: "qwen-pw".into() }),
        ..admin.clone()
    };
    for (who, access) in [("certificate only", &no_user), ("router user", &router_user)] {
        let put = async {
            let mut client = qwen_cluster::connect(access).await?;
            client.put(rogue_key.clone(), record.clone(), None).await.map_err(qwen_cluster::ClusterError::from)
        };
        assert!(put.await.is_err(), "{who} must not register a group");
    }

    // Records that fail validation, written with root's credentials, are skipped with a log line.
    let root = Etcd {
        user: Some(qwen_cluster::access::Credentials { user: "root".into(), password: "root-pw".into() }),
        ..admin
    };
    let mut client = qwen_cluster::connect(&root).await.unwrap();
    let bad = |g: &str| keys::worker(&GroupName::new(g).unwrap());
    client.put(bad("bad-json"), b"{not json".to_vec(), None).await.unwrap();
    let evil = br#"{"group":"bad-addr","grpc_addr":"http://evil.example:1/x","model":"qwen2-gqa","tp":1}"#;
    client.put(bad("bad-addr"), evil.to_vec(), None).await.unwrap();
    eventually(Duration::from_secs(15), "the router logs both skipped records", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        async move {
            text.contains("skipping an unparsable worker record") && text.contains("skipping an invalid worker record")
        }
    })
    .await;
    let channel = tls_channel(bare(&router.grpc), tonic_tls(&c, None)).await.unwrap();
    let models = GenerationClient::new(channel)
        .list_models(with_key(tonic::Request::new(ListModelsRequest {}), ALICE))
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(models.iter().map(|m| (m.id.as_str(), m.groups)).collect::<Vec<_>>(), vec![(MODEL, 1)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_takes_cancel_only_from_the_submitting_connection() {
    use qwen_proto::worker::worker_client::WorkerClient;
    use qwen_proto::worker::{CancelRequest, GenerateRequest as WorkerRequest};
    let worker = WorkerProcess::start(MODEL, &[]);
    // The owner's connection has a tiny receive window and reads nothing after the first
    // message: the worker cannot finish sending, so the request stays live for as long as the
    // test needs.
    let owner_channel = Endpoint::from_shared(worker.addr.clone())
        .unwrap()
        .initial_stream_window_size(Some(256))
        .initial_connection_window_size(Some(256))
        .connect()
        .await
        .unwrap();
    let mut owner = WorkerClient::new(owner_channel);
    let id = "victim-0001";
    let req = WorkerRequest {
        request_id: id.into(),
        prompt_token_ids: vec![3, 4, 5],
        max_new_tokens: 200,
        ignore_eos: true,
        logprobs: true,
        top_logprobs: 20,
        ..Default::default()
    };
    let mut stream = owner.generate(req).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("a first token");

    let mut stranger = WorkerClient::connect(worker.addr.clone()).await.unwrap();
    let e = stranger.cancel(CancelRequest { request_id: id.into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // A second request under a live id is refused too (it would take over the id).
    let e = stranger
        .generate(WorkerRequest {
            request_id: id.into(),
            prompt_token_ids: vec![3],
            max_new_tokens: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");

    owner.cancel(CancelRequest { request_id: id.into() }).await.expect("the owner may cancel");
    while let Some(m) = stream.message().await.unwrap() {
        if m.finish_reason != 0 {
            break;
        }
    }
    drop(stream);
    // Once the request is gone its id means nothing: Cancel is a no-op for anyone.
    eventually(Duration::from_secs(5), "the finished id is forgotten", || {
        let mut stranger = stranger.clone();
        async move { stranger.cancel(CancelRequest { request_id: id.into() }).await.is_ok() }
    })
    .await;
}
