//! Connection limits of the router's public ports, with real sockets: idle connections cannot
//! lock new clients out (a cap refuses at once, and idle ones are closed), and a declared body
//! that never arrives is dropped.

use std::time::Duration;

use qwen_proto::serve::generation_client::GenerationClient;
use qwen_proto::serve::ListModelsRequest;
use qwen_tests::{bare, RouterProcess, WorkerProcess};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MODEL: &str = "qwen2-gqa";

/// What the server sends on `s` within `wait` (until it closes or the wait ends).
async fn read_some(s: &mut TcpStream, wait: Duration) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(wait, async {
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_cannot_lock_out_new_clients() {
    let w = WorkerProcess::start(MODEL, &[]);
    let r = RouterProcess::start(&[
        "--worker",
        bare(&w.addr),
        "--max-connections",
        "40",
        "--header-read-timeout-secs",
        "1",
        "--body-read-timeout-secs",
        "1",
    ]);
    r.wait_ready().await;
    // 50 idle sockets on each port: 40 take every slot, the rest are refused at once (HTTP with
    // a 503 in OpenAI's shape, gRPC by closing).
    let mut idle = Vec::new();
    for port in [bare(&r.http), bare(&r.grpc)] {
        for _ in 0..50 {
            idle.push(TcpStream::connect(port).await.unwrap());
        }
    }
    // Every HTTP socket either got the 503 at once or was closed without a word once the
    // header-read timeout passed. The readiness probe's own connection may still hold a slot
    // for a moment on a loaded machine, so 10 or 11 are refused.
    let (http, grpc) = idle.split_at_mut(50);
    let answers = futures::future::join_all(http.iter_mut().map(|s| read_some(s, Duration::from_secs(3)))).await;
    let refused = answers.iter().filter(|a| !a.is_empty()).count();
    assert!((10..=11).contains(&refused), "{refused} of 50 refused over a cap of 40");
    for a in answers.iter().filter(|a| !a.is_empty()) {
        assert!(a.starts_with("HTTP/1.1 503") && a.contains("too_many_connections"), "{a:?}");
    }
    assert_eq!(read_some(&mut grpc[49], Duration::from_secs(2)).await, "", "gRPC: closed without a word");
    // The idle ones are closed: new clients are served on both ports.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/completions", r.http))
        .json(&json!({"model": MODEL, "prompt": [1, 2], "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut c = GenerationClient::connect(r.grpc.clone()).await.unwrap();
    assert!(!c.list_models(ListModelsRequest {}).await.unwrap().into_inner().models.is_empty());
    drop(idle);
    // A body declared but never sent is dropped with a 408 after the body-read timeout.
    let mut s = TcpStream::connect(bare(&r.http)).await.unwrap();
    let head =
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_some(&mut s, Duration::from_secs(4)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
}
