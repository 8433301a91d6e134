use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::dev::{DevCa, Usage};

fn client_config(ca: &Path, identity: Option<&CertFiles>) -> Arc<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots(ca).unwrap());
    Arc::new(match identity {
        Some(id) => builder.with_client_auth_cert(load_certs(&id.cert).unwrap(), load_key(&id.key).unwrap()).unwrap(),
        None => builder.with_no_client_auth(),
    })
}

/// One TLS round trip: the server echoes a line; returns the server certificate the client saw.
async fn round_trip(server: Arc<ServerConfig>, client: Arc<rustls::ClientConfig>) -> std::io::Result<Vec<u8>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let serve = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = TlsAcceptor::from(server).accept(tcp).await?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.shutdown().await
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await?;
    tls.write_all(b"hello").await?;
    let mut back = [0u8; 5];
    tls.read_exact(&mut back).await?;
    assert_eq!(&back, b"hello");
    let seen = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let _ = serve.await;
    Ok(seen)
}

#[tokio::test]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::create(dir.path(), "test CA").unwrap();
    let server = ReloadingCert::load(ca.issue("server", &["localhost"], Usage::Server).unwrap()).unwrap();
    let client = ca.issue("client", &["client"], Usage::Client).unwrap();
    let config = server_config(server, Some(&ca.ca_file()), &[]).unwrap();

    round_trip(config.clone(), client_config(&ca.ca_file(), Some(&client))).await.unwrap();
    assert!(round_trip(config.clone(), client_config(&ca.ca_file(), None)).await.is_err(), "no client certificate");

    let other_dir = tempfile::tempdir().unwrap();
    let other = DevCa::create(other_dir.path(), "another CA").unwrap();
    let stranger = other.issue("client", &["client"], Usage::Client).unwrap();
    assert!(round_trip(config, client_config(&ca.ca_file(), Some(&stranger))).await.is_err(), "foreign CA");
}

#[tokio::test]
async fn a_reloaded_certificate_serves_new_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::create(dir.path(), "test CA").unwrap();
    let files = ca.issue("server", &["localhost"], Usage::Server).unwrap();
    let cert = ReloadingCert::load(files.clone()).unwrap();
    let config = server_config(cert.clone(), None, &[]).unwrap();
    let first = round_trip(config.clone(), client_config(&ca.ca_file(), None)).await.unwrap();

    ca.issue("server", &["localhost"], Usage::Server).unwrap(); // same paths, new certificate
    cert.reload().unwrap();
    let second = round_trip(config.clone(), client_config(&ca.ca_file(), None)).await.unwrap();
    assert_ne!(first, second);

    // A broken file keeps the old certificate serving.
    std::fs::write(&files.cert, "not pem").unwrap();
    let err = cert.reload().unwrap_err().to_string();
    assert!(err.contains("server.pem"), "{err}");
    assert_eq!(round_trip(config, client_config(&ca.ca_file(), None)).await.unwrap(), second);
}

#[test]
fn bad_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    assert!(load_certs(&missing).unwrap_err().to_string().contains("nope.pem"));
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    assert!(load_certs(&empty).unwrap_err().to_string().contains("no CERTIFICATE"));
    assert!(load_key(&empty).unwrap_err().to_string().contains("empty.pem"));

    let ca = DevCa::create(dir.path(), "test CA").unwrap();
    let a = ca.issue("a", &["localhost"], Usage::Server).unwrap();
    let b = ca.issue("b", &["localhost"], Usage::Server).unwrap();
    let mismatched = CertFiles { cert: a.cert, key: b.key };
    let err = ReloadingCert::load(mismatched).unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");
    assert!(CertFiles::from_flags(Some("c".into()), None, ("--tls-cert", "--tls-key")).is_err());
}

#[tokio::test]
async fn file_changes_and_sighup_trigger_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "a").unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = stop_signal();
    let task = tokio::spawn(reload_on_change(vec![file.clone()], Duration::from_millis(20), stop.1, move || {
        let _ = tx.send(());
    }));
    tokio::time::sleep(Duration::from_millis(50)).await;
    std::fs::write(&file, "ab").unwrap();
    tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.expect("reload after a change");
    let _ = stop.0.send(());
    task.await.unwrap();
}

fn stop_signal() -> (tokio::sync::oneshot::Sender<()>, impl std::future::Future<Output = ()>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}
