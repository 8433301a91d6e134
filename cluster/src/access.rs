//! How a process reaches etcd: endpoints, and optionally TLS (a CA, and a client certificate
//! when etcd checks them) and a user whose password is read from a file (never a flag: argv is
//! visible to every user of the host). Routers and workers take the same flags ([`EtcdArgs`]).

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::ConnectOptions;
use qwen_tls::{CertFiles, ClientTls};

/// Where etcd is and how to authenticate to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Etcd {
    pub endpoints: Vec<String>,
    /// TLS to etcd (the endpoints are then `https://`).
    pub tls: Option<ClientTls>,
    /// etcd's user/password authentication.
    pub user: Option<Credentials>,
}

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("user", &self.user).finish_non_exhaustive()
    }
}

impl Etcd {
    /// Plain endpoints, no TLS or user (tests, a local etcd).
    pub fn plain(endpoints: Vec<String>) -> Self {
        Etcd { endpoints, tls: None, user: None }
    }

    /// Client options carrying the TLS and user settings; `timeouts` (connect, per request,
    /// keep-alive interval and timeout) where the caller bounds its calls.
    pub(crate) fn options(&self, timeouts: Option<Timeouts>) -> crate::Result<ConnectOptions> {
        let mut options = ConnectOptions::new();
        if let Some(t) = timeouts {
            options = options
                .with_connect_timeout(t.connect)
                .with_timeout(t.request)
                .with_keep_alive(t.ping_every, t.ping_timeout);
        }
        if let Some(tls) = &self.tls {
            let config = tls.tonic().map_err(|e| crate::ClusterError::Invalid(format!("etcd TLS: {e}")))?;
            options = options.with_tls(config);
        }
        if let Some(c) = &self.user {
            // etcd's auth tokens expire (5 minutes by default): without a refresh, every call
            // after that would fail until the whole connection is rebuilt.
            options = options.with_user(c.user.clone(), c.password.clone()).with_auto_token_refresh(true);
        }
        Ok(options)
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub connect: Duration,
    pub request: Duration,
    pub ping_every: Duration,
    pub ping_timeout: Duration,
}

/// The etcd flags of every qwen-serve process.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (`https://` ones with --etcd-ca).
    #[arg(long, env = "QWEN_ETCD", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// TLS to etcd: the CA that signed etcd's server certificate.
    #[arg(long, env = "QWEN_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate for etcd's `--client-cert-auth` ...
    #[arg(long, env = "QWEN_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// ... and its private key.
    #[arg(long, env = "QWEN_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user (with --etcd-password-file), for an etcd with authentication enabled.
    #[arg(long, env = "QWEN_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// A file holding the etcd user's password (trailing newline ignored).
    #[arg(long, env = "QWEN_ETCD_PASSWORD_FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

const MAX_PASSWORD_BYTES: u64 = 4096;

impl EtcdArgs {
    /// `None` without endpoints; every file is read and checked now.
    pub fn validate(self) -> Result<Option<Etcd>, String> {
        if self.etcd.is_empty() {
            let given = self.etcd_ca.is_some()
                || self.etcd_cert.is_some()
                || self.etcd_user.is_some()
                || self.etcd_password_file.is_some();
            return if given { Err("--etcd-ca/--etcd-cert/--etcd-user: need --etcd".into()) } else { Ok(None) };
        }
        for e in &self.etcd {
            let ok = e.starts_with("http://") || e.starts_with("https://") || !e.contains("://");
            if !ok || e.is_empty() {
                return Err(format!("--etcd {e:?}: expected host:port or an http(s):// URL"));
            }
        }
        let identity = CertFiles::from_flags(self.etcd_cert, self.etcd_key, ("--etcd-cert", "--etcd-key"))
            .map_err(|e| e.to_string())?;
        let tls = match (self.etcd_ca, identity) {
            (Some(ca), identity) => Some(ClientTls { ca, identity, server_name: None }),
            (None, None) => None,
            (None, Some(_)) => return Err("--etcd-cert: needs --etcd-ca".into()),
        };
        if let Some(tls) = &tls {
            tls.tonic().map_err(|e| format!("--etcd-ca/--etcd-cert: {e}"))?;
            if let Some(plain) = self.etcd.iter().find(|e| e.starts_with("http://")) {
                return Err(format!("--etcd {plain}: TLS is on (--etcd-ca): use https://"));
            }
        }
        let user = match (self.etcd_user, self.etcd_password_file) {
            (Some(user), Some(file)) => Some(Credentials { user, password: read_password(&file)? }),
            (None, None) => None,
            (Some(_), None) => return Err("--etcd-user: needs --etcd-password-file".into()),
            (None, Some(_)) => return Err("--etcd-password-file: needs --etcd-user".into()),
        };
        if user.is_some() && tls.is_none() {
            tracing::warn!("--etcd-user without --etcd-ca: the password crosses the network in the clear");
        }
        Ok(Some(Etcd { endpoints: self.etcd, tls, user }))
    }
}

fn read_password(file: &std::path::Path) -> Result<String, String> {
    let at = |what: String| format!("--etcd-password-file {}: {what}", file.display());
    let meta = std::fs::metadata(file).map_err(|e| at(format!("cannot read: {e}")))?;
    if meta.len() > MAX_PASSWORD_BYTES {
        return Err(at(format!("larger than {MAX_PASSWORD_BYTES} bytes")));
    }
    let text = std::fs::read_to_string(file).map_err(|e| at(format!("cannot read: {e}")))?;
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(at("is empty".into()));
    }
    Ok(password.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(etcd: &[&str]) -> EtcdArgs {
        EtcdArgs { etcd: etcd.iter().map(|s| s.to_string()).collect(), ..Default::default() }
    }

    #[test]
    fn flags_are_checked_together() {
        assert_eq!(args(&[]).validate().unwrap(), None);
        assert_eq!(args(&["127.0.0.1:2379"]).validate().unwrap().unwrap().endpoints, vec!["127.0.0.1:2379"]);
        assert!(args(&["ftp://x"]).validate().unwrap_err().contains("ftp://x"));
        let no_endpoints = EtcdArgs { etcd_user: Some("u".into()), ..Default::default() };
        assert!(no_endpoints.validate().unwrap_err().contains("need --etcd"));
        let no_password = EtcdArgs { etcd_user: Some("u".into()), ..args(&["a:1"]) };
        assert!(no_password.validate().unwrap_err().contains("--etcd-password-file"));
        let missing_ca = EtcdArgs { etcd_ca: Some("/nonexistent/ca.pem".into()), ..args(&["https://a:1"]) };
        assert!(missing_ca.validate().unwrap_err().contains("/nonexistent/ca.pem"));
    }

    #[test]
    fn passwords_come_from_a_file_without_its_newline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let a = EtcdArgs { etcd_user: Some("qwen".into()), etcd_password_file: Some(file.clone()), ..args(&["a:1"]) };
        let etcd = a.validate().unwrap().unwrap();
        assert_eq!(etcd.user.as_ref().unwrap().password, "s3cret");
        assert!(!format!("{etcd:?}").contains("s3cret"), "Debug hides the password");
        std::fs::write(&file, "\n").unwrap();
        let a = EtcdArgs { etcd_user: Some("qwen".into()), etcd_password_file: Some(file), ..args(&["a:1"]) };
        assert!(a.validate().unwrap_err().contains("is empty"));
    }
}
