//! Certificates for qwen-serve: PEM files become rustls configs for the public ports (with a
//! server certificate that is re-read on reload, so a renewed certificate needs no restart) and
//! tonic settings for mutual TLS between routers, workers and etcd. Every error names the file.
//!
//! All TLS uses rustls with the `ring` provider, chosen explicitly so that no process-wide
//! default provider has to be installed.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

pub mod dev;

pub use tokio_rustls::server::TlsStream;
pub use tokio_rustls::TlsAcceptor;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("TLS settings: {0}")]
    Config(String),
}

impl TlsError {
    fn file(path: &Path, message: impl Into<String>) -> Self {
        TlsError::File { path: path.to_path_buf(), message: message.into() }
    }
}

pub type Result<T, E = TlsError> = std::result::Result<T, E>;

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// From a pair of optional flags: both or neither.
    pub fn from_flags(cert: Option<PathBuf>, key: Option<PathBuf>, flags: (&str, &str)) -> Result<Option<Self>> {
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(CertFiles { cert, key })),
            (None, None) => Ok(None),
            (Some(_), None) => Err(TlsError::Config(format!("{} needs {} too", flags.0, flags.1))),
            (None, Some(_)) => Err(TlsError::Config(format!("{} needs {} too", flags.1, flags.0))),
        }
    }
}

/// Largest PEM file read: certificate chains and CA bundles are kilobytes.
const MAX_PEM_BYTES: u64 = 1 << 20;

fn read_pem(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| TlsError::file(path, format!("cannot read: {e}")))?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(TlsError::file(path, format!("larger than {MAX_PEM_BYTES} bytes: not a PEM file")));
    }
    std::fs::read(path).map_err(|e| TlsError::file(path, format!("cannot read: {e}")))
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_pem(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| TlsError::file(path, format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(TlsError::file(path, "holds no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = read_pem(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::file(path, format!("holds no usable private key: {e}")))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certified_key(files: &CertFiles) -> Result<CertifiedKey> {
    let chain = load_certs(&files.cert)?;
    let key = load_key(&files.key)?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::file(&files.key, format!("unsupported private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| TlsError::file(&files.key, format!("does not match {}: {e}", files.cert.display())))?;
    Ok(certified)
}

/// A server certificate that [`ReloadingCert::reload`] replaces from its files; handshakes
/// after a reload present the new one, open connections keep theirs.
#[derive(Debug)]
pub struct ReloadingCert {
    files: CertFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn load(files: CertFiles) -> Result<Arc<Self>> {
        let current = RwLock::new(Arc::new(certified_key(&files)?));
        Ok(Arc::new(ReloadingCert { files, current }))
    }

    /// Re-reads the files; on any error the old certificate stays in use.
    pub fn reload(&self) -> Result<()> {
        let fresh = Arc::new(certified_key(&self.files)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    pub fn files(&self) -> &CertFiles {
        &self.files
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

fn roots(ca: &Path) -> Result<Arc<RootCertStore>> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(ca)? {
        store.add(cert).map_err(|e| TlsError::file(ca, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(store))
}

/// A rustls server config presenting `cert`; with `client_ca`, clients must present a
/// certificate signed by it. `alpn`: the protocols offered, in order of preference.
pub fn server_config(cert: Arc<ReloadingCert>, client_ca: Option<&Path>, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
                .build()
                .map_err(|e| TlsError::file(ca, format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// Server-side TLS for a tonic server: its certificate and, for mutual TLS, the CA that signs
/// its clients' certificates (a client without one is refused during the handshake).
pub fn tonic_server(cert: &CertFiles, client_ca: Option<&Path>) -> Result<tonic::transport::ServerTlsConfig> {
    // Parsed first so a bad file is reported by name, not by tonic at the first handshake.
    certified_key(cert)?;
    let identity = tonic::transport::Identity::from_pem(read_pem(&cert.cert)?, read_pem(&cert.key)?);
    let mut tls = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        roots(ca)?;
        tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read_pem(ca)?));
    }
    Ok(tls)
}

/// How a client reaches a TLS server: the CA it trusts, its own certificate for mutual TLS, and
/// the name to check in the server's certificate when it differs from the address's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub identity: Option<CertFiles>,
    pub server_name: Option<String>,
}

impl ClientTls {
    /// The tonic channel settings; every file is read and checked now.
    pub fn tonic(&self) -> Result<tonic::transport::ClientTlsConfig> {
        roots(&self.ca)?;
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(read_pem(&self.ca)?));
        if let Some(id) = &self.identity {
            certified_key(id)?;
            tls = tls.identity(tonic::transport::Identity::from_pem(read_pem(&id.cert)?, read_pem(&id.key)?));
        }
        if let Some(name) = &self.server_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }
}

/// Size and modification time of each file, to notice a change without reading it.
fn stamps(paths: &[PathBuf]) -> Vec<Option<(u64, SystemTime)>> {
    paths.iter().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.len(), m.modified().ok()?)))).collect()
}

/// Calls `reload` on SIGHUP and whenever one of `paths` changes (polled every `every`: a
/// Kubernetes Secret volume replaces files by a symlink swap, which inotify-style watches on the
/// file miss). Returns when `stop` resolves.
pub async fn reload_on_change(
    paths: Vec<PathBuf>,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
    mut reload: impl FnMut(),
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: reloading on file changes only");
            None
        }
    };
    let mut seen = stamps(&paths);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut stop => return,
            _ = hup => {
                tracing::info!("SIGHUP: reloading keys and certificates");
                seen = stamps(&paths);
                reload();
            }
            _ = tick.tick() => {
                let now = stamps(&paths);
                if now != seen {
                    tracing::info!("a key or certificate file changed: reloading");
                    seen = now;
                    reload();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

/// Mutual TLS between the ranks of a tensor-parallel group (blocking sockets): rank 0 serves
/// with its certificate and requires one from the CA of every rank that joins; joining ranks
/// check rank 0's against the same CA.
#[derive(Clone)]
pub struct PeerTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
    /// The name checked in rank 0's certificate (default: the host of its address).
    pub server_name: Option<String>,
}

impl std::fmt::Debug for PeerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl PeerTls {
    pub fn load(cert: &CertFiles, ca: &Path, server_name: Option<String>) -> Result<Self> {
        let server = server_config(ReloadingCert::load(cert.clone())?, Some(ca), &[])?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(ca)?)
            .with_client_auth_cert(load_certs(&cert.cert)?, load_key(&cert.key)?)
            .map_err(|e| TlsError::file(&cert.key, format!("cannot authenticate with it: {e}")))?;
        Ok(PeerTls { server, client: Arc::new(client), server_name })
    }
}
