//! Starting a router: the pool and its health loop, membership (static or etcd), the public gRPC
//! server (with health and reflection) and the OpenAI HTTP server; all stop on one token.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{Auth, Gate};
use crate::config::{Discovery, RouterConfig, Security};
use crate::conn::{BodyLimits, ConnConfig, Limited};
use crate::error::{Result, RouterError};
use crate::generate::Router;
use crate::grpc::PublicService;
use crate::metrics::Port;
use crate::pool::{Member, Pool};

/// The gRPC services the public port serves, as reflection lists them.
const SERVED: [&str; 4] = [
    "qwen.serve.v1.Generation",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub router: Arc<Router>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    cancel: CancellationToken,
}

impl Running {
    /// Stops accepting, lets in-flight requests finish, and returns when every task ended.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

pub async fn start(cfg: RouterConfig, cancel: CancellationToken) -> Result<Running> {
    let pool = Arc::new(Pool::new(cfg.pool, crate::policy::build(&cfg.policy), cfg.local_tokenizers));
    let router = Arc::new(Router::new(pool.clone(), cfg.generate));
    let Credentials { gate, tls, reloader } = credentials(&cfg.security, &router, cancel.clone())?;
    let mut tasks = vec![pool.spawn_health(cancel.clone()), reloader];
    tasks.push(membership(&cfg.discovery, router.clone(), cancel.clone()));

    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr).await.map_err(|e| RouterError::Internal(format!("{what} {addr}: cannot bind: {e}")))
    };
    let grpc_listener = bind(cfg.grpc_listen, "--grpc-listen").await?;
    let http_listener = bind(cfg.http_listen, "--http-listen").await?;
    let grpc_addr = grpc_listener.local_addr().map_err(|e| RouterError::Internal(e.to_string()))?;
    let http_addr = http_listener.local_addr().map_err(|e| RouterError::Internal(e.to_string()))?;

    let conn = cfg.conn;
    let metrics = router.metrics.clone();
    let acceptor = |alpn: &[&[u8]]| -> Result<Option<qwen_tls::TlsAcceptor>> {
        let Some(cert) = &tls else { return Ok(None) };
        let config =
            qwen_tls::server_config(cert.clone(), None, alpn).map_err(|e| RouterError::Internal(e.to_string()))?;
        Ok(Some(qwen_tls::TlsAcceptor::from(config)))
    };
    let grpc_listener =
        Limited::new(grpc_listener, conn.max_connections, Port::Grpc, metrics.clone()).with_tls(acceptor(&[b"h2"])?);
    let http_listener = Limited::new(http_listener, conn.max_connections, Port::Http, metrics)
        .with_tls(acceptor(&[b"h2", b"http/1.1"])?);
    let grpc = GrpcConfig { router: router.clone(), conn, gate: gate.clone() };
    tasks.push(tokio::spawn(serve_grpc(grpc_listener, grpc, cancel.clone())));
    let http = crate::http::HttpConfig {
        router: router.clone(),
        body: BodyLimits { max_bytes: cfg.max_body_bytes, timeout: conn.body_read_timeout },
        gate,
    };
    tasks.push(tokio::spawn(crate::http::serve(http_listener, http, conn, cancel.clone())));
    Ok(Running { grpc_addr, http_addr, router, tasks, cancel })
}

/// The API-key gate and the public certificate, loaded, with the task that reloads both.
struct Credentials {
    gate: Option<Arc<Gate>>,
    tls: Option<Arc<qwen_tls::ReloadingCert>>,
    reloader: tokio::task::JoinHandle<()>,
}

/// Loads keys and certificate (an unreadable file stops the start, naming it) and starts the
/// task that reloads both on SIGHUP or when their files change.
fn credentials(security: &Security, router: &Arc<Router>, cancel: CancellationToken) -> Result<Credentials> {
    let auth = security.auth.clone().map(Auth::load).transpose().map_err(RouterError::Internal)?;
    let gate = auth.clone().map(|a| Gate::new(a, router.metrics.clone()));
    let tls = security.tls.clone().map(qwen_tls::ReloadingCert::load).transpose();
    let tls = tls.map_err(|e| RouterError::Internal(e.to_string()))?;
    let mut paths = Vec::new();
    paths.extend(security.auth.iter().map(|a| a.key_file.clone()));
    paths.extend(security.tls.iter().flat_map(|t| [t.cert.clone(), t.key.clone()]));
    let (metrics, cert) = (router.metrics.clone(), tls.clone());
    let reload = move || {
        if let Some(auth) = &auth {
            let result = auth.reload();
            match &result {
                Ok(keys) => tracing::info!(keys, "API keys reloaded"),
                Err(e) => tracing::error!(error = %e, "API keys not reloaded: the previous keys stay in force"),
            }
            metrics.credentials_reloaded(result.is_ok());
        }
        if let Some(cert) = &cert {
            let result = cert.reload();
            if let Err(e) = &result {
                tracing::error!(error = %e, "TLS certificate not reloaded: the previous one stays in use");
            }
            metrics.credentials_reloaded(result.is_ok());
        }
    };
    let every = security.reload_every;
    let task = tokio::spawn(async move {
        if !paths.is_empty() {
            qwen_tls::reload_on_change(paths, every, cancel.cancelled_owned(), reload).await;
        }
    });
    Ok(Credentials { gate, tls, reloader: task })
}

struct GrpcConfig {
    router: Arc<Router>,
    conn: ConnConfig,
    gate: Option<Arc<Gate>>,
}

async fn serve_grpc(listener: Limited, cfg: GrpcConfig, cancel: CancellationToken) {
    let GrpcConfig { router, conn, gate } = cfg;
    use tonic::service::interceptor::InterceptedService;
    let check = crate::grpc::KeyCheck(gate.clone());
    // Health answers without a key only where --health-without-key says so.
    let health_check = crate::grpc::KeyCheck(gate.filter(|g| !g.open().health));
    use qwen_proto::serve::generation_server::GenerationServer;
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<GenerationServer<PublicService>>().await;
    // Both reflection versions: grpcurl and Python's reflection client still speak v1alpha.
    // Only what this port serves is listed: the descriptor set also holds the worker's service.
    let reflection = |b: tonic_reflection::server::Builder<'static>| {
        SERVED.iter().fold(
            b.register_encoded_file_descriptor_set(qwen_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |b, name| b.with_service_name(*name),
        )
    };
    let v1 = reflection(tonic_reflection::server::Builder::configure()).build_v1();
    let v1alpha = reflection(tonic_reflection::server::Builder::configure()).build_v1alpha();
    let (v1, v1alpha) = match (v1, v1alpha) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "reflection descriptors are broken");
            return;
        }
    };
    // Accepted sockets have TCP_NODELAY (streamed chunks are small writes: Nagle would hold
    // them for the peer's ACK) and hold a connection slot until they close.
    let incoming = listener.into_incoming(conn.header_read_timeout, cancel.clone());
    let result = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(conn.keepalive_interval))
        .http2_keepalive_timeout(Some(conn.keepalive_interval / 2))
        .add_service(InterceptedService::new(health_service, health_check))
        .add_service(InterceptedService::new(v1, check.clone()))
        .add_service(InterceptedService::new(v1alpha, check.clone()))
        .add_service(InterceptedService::new(GenerationServer::new(PublicService::new(router)), check))
        .serve_with_incoming_shutdown(incoming, cancel.cancelled_owned())
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server failed");
    }
}

/// Keeps the pool's membership current; joiners are probed at once so they serve without waiting
/// for the next health round.
fn membership(discovery: &Discovery, router: Arc<Router>, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
    let pool = router.pool.clone();
    match discovery {
        Discovery::Static(members) => {
            let members = members.clone();
            tokio::spawn(async move {
                for g in pool.sync(&members) {
                    let pool = pool.clone();
                    tokio::spawn(async move { pool.probe(&g).await });
                }
                cancel.cancelled().await;
            })
        }
        Discovery::Etcd { etcd, relist_every } => {
            let cfg = qwen_cluster::discovery::MembershipConfig { etcd: etcd.clone(), relist_every: *relist_every };
            tokio::spawn(async move {
                let membership = qwen_cluster::discovery::Membership::start(cfg, cancel.clone());
                let mut connection = membership.connection();
                let metrics = router.metrics.clone();
                tokio::spawn(async move {
                    loop {
                        metrics.set_etcd_connected(*connection.borrow_and_update());
                        if connection.changed().await.is_err() {
                            return;
                        }
                    }
                });
                let mut updates = membership.subscribe();
                loop {
                    let members: Vec<Member> = updates
                        .borrow_and_update()
                        .values()
                        .map(|r| Member { group: r.group.clone(), addr: r.grpc_addr.clone() })
                        .collect();
                    for g in pool.sync(&members) {
                        let pool = pool.clone();
                        tokio::spawn(async move { pool.probe(&g).await });
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        changed = updates.changed() => if changed.is_err() { return },
                    }
                }
            })
        }
    }
}
