//! Metrics and traces of real processes: both `/metrics` pass `promtool check metrics`; a real
//! Prometheus server scrapes a router and a worker and PromQL returns the request count and a
//! TTFT quantile; a client's `traceparent` reaches the worker's JSON logs through the router, and
//! with `--otlp-endpoint` both export spans of that trace (worker under router under client) to a
//! real OTLP/gRPC endpoint.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use qwen_tests::{bare, RouterProcess, WorkerProcess};
use serde_json::{json, Value};

const MODEL: &str = "qwen2-gqa";

async fn complete(r: &RouterProcess, traceparent: Option<&str>) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/v1/completions", r.http))
        .json(&json!({"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 6, "temperature": 0}));
    if let Some(t) = traceparent {
        req = req.header("traceparent", t);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

/// `/metrics` at `url` once it contains `needle`, or as it is after 10 s.
async fn scrape_when(url: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        if text.contains(needle) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    qwen_cluster::testing::free_ports(1).expect("a free loopback port")[0]
}

/// A real Prometheus server scraping `targets` every 200 ms; killed (by PID) on drop.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(jobs: &[(&str, &str)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let mut config =
            String::from("global:\n  scrape_interval: 200ms\n  evaluation_interval: 200ms\nscrape_configs:\n");
        for (job, target) in jobs {
            config.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"));
        }
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (apt-get install prometheus)");
        Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    /// The first sample's value of an instant query, once it has one.
    async fn query(&self, promql: &str, deadline: Instant) -> f64 {
        loop {
            let resp = reqwest::Client::new()
                .get(format!("{}/api/v1/query", self.url))
                .query(&[("query", promql)])
                .send()
                .await;
            if let Ok(resp) = resp {
                if let Ok(v) = resp.json::<Value>().await {
                    let value = v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok());
                    if let Some(x) = value.filter(|x| x.is_finite()) {
                        return x;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no result for {promql}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_router_and_worker() {
    let w = WorkerProcess::start(MODEL, &["--metrics-listen", "127.0.0.1:0"]);
    let worker_metrics = w.metrics.clone().unwrap();
    let r = RouterProcess::start(&["--worker", bare(&w.addr)]);
    r.wait_ready().await;
    for _ in 0..5 {
        complete(&r, None).await;
    }
    // The router counts a request once its task ends, just after the client has the response.
    let ok5 = r#"qwen_serve_router_requests_total{model="qwen2-gqa",api="http_completions",outcome="ok"} 5"#;
    let router_text = scrape_when(&format!("{}/metrics", r.http), ok5).await;
    let worker_text = reqwest::get(format!("http://{worker_metrics}/metrics")).await.unwrap().text().await.unwrap();
    assert!(router_text.contains(ok5), "{router_text}");
    assert!(
        worker_text.contains(r#"qwen_serve_worker_requests_total{model="qwen2-gqa",outcome="length"} 5"#),
        "{worker_text}"
    );
    assert!(
        worker_text.contains(r#"qwen_serve_worker_generation_tokens_total{model="qwen2-gqa"} 30"#),
        "{worker_text}"
    );
    promtool_check(&router_text);
    promtool_check(&worker_text);

    let router_target = bare(&r.http).to_string();
    let prom = Prometheus::start(&[("router", &router_target), ("worker", &worker_metrics)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let count = prom.query(r#"sum(qwen_serve_router_requests_total{outcome="ok"})"#, deadline).await;
    assert_eq!(count, 5.0);
    let p50 = prom
        .query("histogram_quantile(0.5, sum by (le) (qwen_serve_router_time_to_first_token_seconds_bucket))", deadline)
        .await;
    assert!(p50 > 0.0 && p50 < 10.0, "TTFT p50 {p50}");
    let worker_tokens = prom.query("sum(qwen_serve_worker_generation_tokens_total)", deadline).await;
    assert_eq!(worker_tokens, 30.0);
    let used = prom.query("qwen_serve_worker_kv_blocks_capacity", deadline).await;
    assert!(used > 0.0);
}

/// Client-chosen model names never become label values: 2,000 unknown names (one with a newline
/// and quotes, which would break the text format) leave `/metrics` with the same series, all
/// counted under `model="unknown"`, and promtool still accepts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model_names_never_become_labels() {
    let w = WorkerProcess::start(MODEL, &[]);
    let r = RouterProcess::start(&["--worker", bare(&w.addr)]);
    r.wait_ready().await;
    let http = reqwest::Client::new();
    let ask = |model: String| {
        let req = http.post(format!("{}/v1/completions", r.http)).json(&json!({"model": model, "prompt": [1]}));
        async move { assert_eq!(req.send().await.unwrap().status().as_u16(), 404) }
    };
    ask("first-unknown".into()).await;
    let one = r#"model="unknown",api="http_completions",outcome="not_found"} 1"#;
    let before = scrape_when(&format!("{}/metrics", r.http), one).await;
    assert!(before.contains(one), "{before}");
    ask("evil\"}\nqwen_serve_router_forged_total 1\n#".into()).await;
    for batch in 0..40 {
        futures::future::join_all((0..50).map(|i| ask(format!("client-name-{batch}-{i}")))).await;
    }
    let all = r#"model="unknown",api="http_completions",outcome="not_found"} 2002"#;
    let after = scrape_when(&format!("{}/metrics", r.http), all).await;
    assert!(after.contains(all), "{after}");
    assert_eq!(after.lines().count(), before.lines().count());
    assert!(!after.contains("client-name") && !after.contains("forged") && !after.contains("evil"), "{after}");
    promtool_check(&after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_traceparent_reaches_the_workers_logs() {
    // The worker logs JSON lines to a file we read afterwards.
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut worker = Command::new(qwen_tests::bin("qwen-worker"))
        .args(["--log-format", "json", "serve", "--model"])
        .arg(qwen_tests::fixture(MODEL))
        .args(["--listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut first = [0u8; 64];
    let n = worker.stdout.as_mut().unwrap().read(&mut first).unwrap();
    let line = String::from_utf8_lossy(&first[..n]).to_string();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening line")
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let r = RouterProcess::start(&["--worker", &addr, "--log-format", "json"]);
    r.wait_ready().await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    complete(&r, Some(&format!("00-{trace_id}-00f067aa0ba902b7-01"))).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let text = std::fs::read_to_string(log.path()).unwrap();
        let hit = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["fields"]["message"] == "request finished" && v["span"]["trace_id"] == trace_id);
        if let Some(v) = hit {
            break v;
        }
        assert!(Instant::now() < deadline, "no worker log line with trace id {trace_id}:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(found["fields"]["generated"], json!(6));
    qwen_tests::signal(worker.id(), "TERM");
    let _ = worker.wait();
}

mod otlp {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
    use tokio::sync::mpsc::UnboundedSender;
    use tonic::{Request, Response, Status};

    /// A real OTLP/gRPC endpoint that hands every export to the test.
    pub struct Collector(pub UnboundedSender<ExportTraceServiceRequest>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: Request<ExportTraceServiceRequest>,
        ) -> Result<Response<ExportTraceServiceResponse>, Status> {
            let _ = self.0.send(request.into_inner());
            Ok(Response::new(ExportTraceServiceResponse::default()))
        }
    }

    pub fn server(c: Collector) -> TraceServiceServer<Collector> {
        TraceServiceServer::new(c)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_with_the_clients_trace() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(otlp::server(otlp::Collector(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let w = WorkerProcess::start(MODEL, &["--otlp-endpoint", &endpoint]);
    let r = RouterProcess::start(&["--worker", bare(&w.addr), "--otlp-endpoint", &endpoint]);
    r.wait_ready().await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    complete(&r, Some(&format!("00-{trace_id}-b7ad6b7169203331-01"))).await;
    // (service, span id, parent span id) of every span in the client's trace.
    let mut spans: Vec<(String, Vec<u8>, Vec<u8>)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = u128::from_str_radix(trace_id, 16).unwrap().to_be_bytes().to_vec();
    while !(spans.iter().any(|s| s.0 == "qwen-router") && spans.iter().any(|s| s.0 == "qwen-worker")) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(export)) = tokio::time::timeout(left, rx.recv()).await else {
            panic!("spans of trace {trace_id} from both processes not exported in time: {spans:?}");
        };
        for rs in export.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .map(|v| format!("{:?}", v.value))
                .unwrap_or_default();
            let service = if service.contains("qwen-router") { "qwen-router" } else { "qwen-worker" };
            for span in rs.scope_spans.iter().flat_map(|s| &s.spans).filter(|s| s.trace_id == want) {
                spans.push((service.to_string(), span.span_id.clone(), span.parent_span_id.clone()));
            }
        }
    }
    // The router's span continues the client's; the worker's hangs under the router's.
    let client_span = u64::from_str_radix("b7ad6b7169203331", 16).unwrap().to_be_bytes().to_vec();
    assert!(spans.iter().any(|s| s.0 == "qwen-router" && s.2 == client_span), "{spans:?}");
    let router_ids: Vec<&Vec<u8>> = spans.iter().filter(|s| s.0 == "qwen-router").map(|s| &s.1).collect();
    assert!(spans.iter().any(|s| s.0 == "qwen-worker" && router_ids.contains(&&s.2)), "{spans:?}");
}
