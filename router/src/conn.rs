//! Connection limits of the public ports: a cap on open connections (one over it is refused at
//! once: a 503 on HTTP, a closed socket on gRPC), HTTP's header-read timeout (which also closes
//! idle keep-alive connections and slow-header clients), HTTP/2 keep-alive pings that drop dead
//! peers, and a body-read timeout (a declared body that never arrives is dropped with a 408).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Port, RouterMetrics};

#[derive(Debug, Clone, Copy)]
pub struct ConnConfig {
    /// Open connections per port.
    pub max_connections: usize,
    /// HTTP/1: the request head must arrive within this, counted from when the connection is
    /// ready for it (so an idle keep-alive connection closes after it too).
    pub header_read_timeout: Duration,
    /// The whole request body must arrive within this.
    pub body_read_timeout: Duration,
    /// HTTP/2 (both ports): ping an idle peer this often; close it if the pong is late.
    pub keepalive_interval: Duration,
}

impl ConnConfig {
    /// `requested`, or with 0, what the process's open-file limit allows for two ports.
    pub fn auto_max_connections(requested: usize) -> usize {
        if requested > 0 {
            return requested;
        }
        let soft = open_file_limit().unwrap_or(1024);
        // Leave room for worker channels, etcd and files; split the rest between both ports.
        (soft.saturating_sub(256) / 2).clamp(16, 100_000) as usize
    }
}

/// The soft limit on open files, from /proc/self/limits.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A listener that hands out connections while fewer than the cap are open, with TLS when it
/// has an acceptor.
pub struct Limited {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    port: Port,
    metrics: Arc<RouterMetrics>,
    tls: Option<qwen_tls::TlsAcceptor>,
}

impl Limited {
    pub fn new(listener: TcpListener, max_connections: usize, port: Port, metrics: Arc<RouterMetrics>) -> Self {
        Limited { listener, slots: Arc::new(Semaphore::new(max_connections)), port, metrics, tls: None }
    }

    pub fn with_tls(self, tls: Option<qwen_tls::TlsAcceptor>) -> Self {
        Limited { tls, ..self }
    }

    /// The next connection within the cap; those over it go to `refuse` and are not returned.
    /// Accept errors (out of file descriptors, say) are logged and retried after a pause rather
    /// than spinning.
    async fn accept(&self, refuse: fn(TcpStream)) -> Held {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, port = self.port.as_str(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            match self.slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    self.metrics.connection_opened(self.port);
                    return Held { stream, _permit: permit, port: self.port, metrics: self.metrics.clone() };
                }
                Err(_) => {
                    self.metrics.connection_refused(self.port);
                    refuse(stream);
                }
            }
        }
    }

    /// Connections for tonic's `serve_with_incoming`: over the cap, the socket is closed; one
    /// that sends nothing within `first_byte` (HTTP/2 would wait for its preface forever) is
    /// dropped before it reaches the server.
    pub fn into_incoming(
        self,
        first_byte: Duration,
        cancel: CancellationToken,
    ) -> impl futures::Stream<Item = std::io::Result<Conn>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Conn>(64);
        tokio::spawn(async move {
            loop {
                let held = tokio::select! {
                    held = self.accept(drop) => held,
                    _ = cancel.cancelled() => return,
                };
                let (tx, tls) = (tx.clone(), self.tls.clone());
                tokio::spawn(async move {
                    if let Some(conn) = open(held, tls.as_ref(), first_byte).await {
                        let _ = tx.send(conn).await;
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok)
    }
}

/// `held` once it has spoken within `wait` and, with TLS, finished its handshake within `wait`
/// too (a client that stalls mid-handshake holds its slot no longer than a silent one).
async fn open(held: Held, tls: Option<&qwen_tls::TlsAcceptor>, wait: Duration) -> Option<Conn> {
    if !held.spoke_within(wait).await {
        return None;
    }
    match tls {
        None => Some(Conn::Plain(held)),
        Some(acceptor) => match tokio::time::timeout(wait, acceptor.accept(held)).await {
            Ok(Ok(stream)) => Some(Conn::Tls(Box::new(stream))),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => None,
        },
    }
}

/// A served connection: plain, or TLS over the accepted socket.
pub enum Conn {
    Plain(Held),
    Tls(Box<qwen_tls::TlsStream<Held>>),
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(h) => Pin::new(h).poll_read(cx, buf),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(h) => Pin::new(h).poll_write(cx, buf),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(h) => Pin::new(h).poll_flush(cx),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(h) => Pin::new(h).poll_shutdown(cx),
            Conn::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        match self {
            Conn::Plain(h) => h.stream.connect_info(),
            Conn::Tls(t) => t.get_ref().0.stream.connect_info(),
        }
    }
}

/// An accepted connection holding one of the port's slots until it closes.
pub struct Held {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    port: Port,
    metrics: Arc<RouterMetrics>,
}

impl Held {
    /// Whether the client sent a byte within `wait` (peeked, so the server still reads it).
    /// `readable()` alone may wake spuriously; a peek waits for real data or the end.
    async fn spoke_within(&self, wait: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(tokio::time::timeout(wait, self.stream.peek(&mut byte)).await, Ok(Ok(n)) if n > 0)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.metrics.connection_closed(self.port);
    }
}

impl AsyncRead for Held {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Held {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Over the cap on the HTTP port: one 503 in OpenAI's error shape, then close.
fn refuse_http(mut stream: TcpStream) {
    tokio::spawn(async move {
        let body = r#"{"error":{"message":"the server has too many open connections; retry later","type":"server_error","param":null,"code":"too_many_connections"}}"#;
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
            body.len()
        );
        let answer = async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
            stream.shutdown().await?;
            // Read what the client sent, so closing does not reset the connection before it has
            // read the answer.
            let mut sink = [0u8; 4096];
            while tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? > 0 {}
            std::io::Result::Ok(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
    });
}

/// Serves `app` on `listener` within `cfg`'s limits until `cancel`, then lets open requests
/// finish.
pub async fn serve_http(listener: Limited, app: axum::Router, cfg: ConnConfig, cancel: CancellationToken) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(cfg.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(cfg.keepalive_interval)
        .keep_alive_timeout(cfg.keepalive_interval / 2);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let service = hyper_util::service::TowerToHyperService::new(app);
    loop {
        let held = tokio::select! {
            held = listener.accept(refuse_http) => held,
            _ = cancel.cancelled() => break,
        };
        let (builder, service, watcher) = (builder.clone(), service.clone(), graceful.watcher());
        let tls = listener.tls.clone();
        tokio::spawn(async move {
            // Nothing is served until the client speaks: protocol detection would wait forever.
            let Some(conn) = open(held, tls.as_ref(), cfg.header_read_timeout).await else {
                return;
            };
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(conn), service);
            let _ = watcher.watch(conn.into_owned()).await;
        });
    }
    graceful.shutdown().await;
}

/// What the body reader enforces.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub timeout: Duration,
}

/// Middleware: reads the request body whole, at most `max_bytes` (413) within `timeout` (408),
/// so a client that declares a body and never sends it holds nothing for long.
pub async fn read_body(limits: BodyLimits, request: Request<Body>, next: axum::middleware::Next) -> Response {
    use http_body_util::BodyExt;
    let (parts, body) = request.into_parts();
    let read = http_body_util::Limited::new(body, limits.max_bytes).collect();
    match tokio::time::timeout(limits.timeout, read).await {
        Ok(Ok(collected)) => next.run(Request::from_parts(parts, Body::from(collected.to_bytes()))).await,
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => crate::http::ApiError::plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {} bytes", limits.max_bytes),
        )
        .into_response(),
        Ok(Err(_)) => {
            crate::http::ApiError::plain(StatusCode::BAD_REQUEST, "the request body could not be read").into_response()
        }
        Err(_) => crate::http::ApiError::plain(StatusCode::REQUEST_TIMEOUT, "the request body did not arrive in time")
            .into_response(),
    }
}
