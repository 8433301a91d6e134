//! A real etcd server for tests: Debian's `etcd` binary on free loopback ports with a temporary
//! data directory, stopped (by PID) when dropped. It can be stopped and restarted on the same
//! ports to test what clients do while etcd is away.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdServer {
    /// `None` while stopped.
    child: Option<Child>,
    dir: tempfile_dir::TempDir,
    peer_port: u16,
    /// Plain HTTP `/health` and `/metrics`, also when clients need TLS.
    metrics_port: u16,
    options: EtcdOptions,
    pub endpoint: String,
}

/// How to start the test etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdOptions {
    pub tls: Option<ServerTls>,
    /// `--auth-token-ttl`: how long an auth token lives (etcd's default is 300 s).
    pub auth_token_ttl_secs: Option<u32>,
}

/// TLS on etcd's client port: its certificate, and the CA that signs the client certificates
/// it requires (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: qwen_tls::CertFiles,
    pub client_ca: std::path::PathBuf,
}

/// Minimal temp dir so this crate needs no dev-only dependency at runtime.
mod tempfile_dir {
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
            let _ = std::fs::remove_file(self.0.with_extension("log"));
        }
    }
}

/// `n` distinct loopback ports that were free a moment ago. They come from below Linux's
/// ephemeral range (32768–60999), where `bind(…:0)` and every outgoing connection take their
/// ports, so a client socket elsewhere in the test run cannot grab one between this call and the
/// server's bind — the race that `bind(0)`-then-close has. All `n` are held open together so
/// they differ.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    // Not a test input: only spreads concurrent test processes over the range.
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut state = nanos.subsec_nanos() ^ std::process::id().wrapping_mul(2_654_435_761);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n * 200 {
        if held.len() == n {
            break;
        }
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let port = (LOW + (state >> 8) % SPAN) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
        }
    }
    if held.len() < n {
        // A crowded range: fall back to the kernel's choice.
        while held.len() < n {
            held.push(TcpListener::bind("127.0.0.1:0")?);
        }
    }
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Attempts with fresh ports before `start_with` gives up: another process may still bind a
/// port between our check and etcd's bind.
const START_ATTEMPTS: usize = 4;

impl EtcdServer {
    /// Starts etcd and waits until it answers; `Err` says what is missing.
    pub fn start() -> Result<EtcdServer, String> {
        Self::start_with(EtcdOptions::default())
    }

    /// Starts etcd with `options`: TLS on its client port (clients need a certificate from the
    /// client CA), a short auth-token life.
    pub fn start_with(options: EtcdOptions) -> Result<EtcdServer, String> {
        let mut errors = Vec::new();
        for _ in 0..START_ATTEMPTS {
            match Self::start_once(options.clone()) {
                Ok(server) => return Ok(server),
                Err(e) => errors.push(e),
            }
        }
        Err(errors.join("; then "))
    }

    fn start_once(options: EtcdOptions) -> Result<EtcdServer, String> {
        let ports = free_ports(3).map_err(|e| e.to_string())?;
        let (client_port, peer_port, metrics_port) = (ports[0], ports[1], ports[2]);
        let dir = std::env::temp_dir().join(format!("qwen-etcd-{}-{client_port}", std::process::id()));
        let scheme = if options.tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client_port}");
        let dir = tempfile_dir::TempDir(dir);
        let mut server = EtcdServer { child: None, dir, peer_port, metrics_port, options, endpoint };
        server.spawn()?;
        Ok(server)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new("etcd");
        command
            .args(["--name", "test", "--data-dir"])
            .arg(&self.dir.0)
            .args(["--listen-client-urls", &self.endpoint, "--advertise-client-urls", &self.endpoint])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{}", self.metrics_port)]);
        if let Some(ttl) = self.options.auth_token_ttl_secs {
            command.arg(format!("--auth-token-ttl={ttl}"));
        }
        if let Some(tls) = &self.options.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert.cert)
                .arg("--key-file")
                .arg(&tls.cert.key)
                .arg("--trusted-ca-file")
                .arg(&tls.client_ca)
                .arg("--client-cert-auth");
        }
        // etcd logs to stderr; kept beside the data directory so a failed start can say why.
        let log_path = self.log_path();
        let log = std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let child = command
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start etcd (apt-get install etcd-server): {e}"))?;
        let child = self.child.insert(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        // An open port is not a ready server: wait for /health to say so.
        while !healthy(self.metrics_port) {
            // E.g. a port taken meanwhile by someone else (restarts reuse them): fail now.
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("etcd exited: {status}: {}", self.log_tail()));
            }
            if Instant::now() > deadline {
                return Err("etcd did not report healthy within 20 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.0.with_extension("log")
    }

    /// etcd's last log lines (it logs one JSON or text line per event).
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(3)..].join(" | ")
    }

    /// How a client with no certificate or user reaches it.
    pub fn access(&self) -> crate::Etcd {
        crate::Etcd::plain(vec![self.endpoint.clone()])
    }

    /// The running etcd's process id; `None` while stopped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd (SIGKILL, like a crash) and waits for it to exit; the data directory stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports with the same data: keys and leases survive (etcd
    /// renews every lease's TTL when it comes back).
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.spawn()
    }

    /// Starts etcd again on the same ports with an empty data directory: every key and lease is
    /// gone and revisions start over, as after losing the etcd cluster.
    pub fn restart_empty(&mut self) -> Result<(), String> {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir.0);
        self.spawn()
    }
}

/// etcd's `GET /health` answers `{"health":"true"}` once it serves requests.
fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Turns on etcd's authentication as a deployment would: a `root` user, a `qwen-worker` role
/// that may read and write everything under [`crate::keys::PREFIX`] and a `qwen-router` role
/// that may only read it, each held by a user of the same name with `password`. `admin`
/// reaches etcd before authentication is on.
pub async fn enable_auth(admin: &crate::Etcd, root_password: &str, password: &str) -> crate::Result<()> {
    use etcd_client::Permission;
    let mut c = crate::connect(admin).await?;
    let prefix = crate::keys::PREFIX;
    c.role_add("qwen-worker").await?;
    c.role_grant_permission("qwen-worker", Permission::read_write(prefix).with_prefix()).await?;
    c.role_add("qwen-router").await?;
    c.role_grant_permission("qwen-router", Permission::read(prefix).with_prefix()).await?;
    for user in ["qwen-worker", "qwen-router"] {
        c.user_add(user, password, None).await?;
        c.user_grant_role(user, user).await?;
    }
    c.user_add("root", root_password, None).await?;
    c.user_grant_role("root", "root").await?;
    c.auth_enable().await?;
    Ok(())
}
