//! A throwaway certificate authority for tests and local trials: a CA plus leaf certificates
//! for servers and clients, written as PEM files. Production certificates come from the
//! operator's CA (cert-manager, Vault, ...); nothing here is meant to guard real traffic.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::{CertFiles, Result, TlsError};

fn gen(e: rcgen::Error) -> TlsError {
    TlsError::Config(format!("generating a certificate: {e}"))
}

/// A CA whose key stays in memory; [`DevCa::issue`] writes leaf certificates next to its own.
pub struct DevCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
}

/// Server certificates serve (and, for mutual TLS between components, also authenticate as a
/// client), client certificates only authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

impl DevCa {
    /// A new CA named `name`, its certificate written to `dir/ca.pem`.
    pub fn create(dir: &Path, name: &str) -> Result<Self> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().map_err(gen)?).map_err(gen)?;
        write(&dir.join("ca.pem"), &issuer.pem())?;
        Ok(DevCa { issuer, dir: dir.to_path_buf() })
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A leaf certificate for `names` (DNS names or IP addresses), written to `dir/{file}.pem`
    /// and `dir/{file}-key.pem`.
    pub fn issue(&self, file: &str, names: &[&str], usage: Usage) -> Result<CertFiles> {
        let mut params =
            CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).map_err(gen)?;
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or(file));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = match usage {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        };
        let key = KeyPair::generate().map_err(gen)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen)?;
        let files =
            CertFiles { cert: self.dir.join(format!("{file}.pem")), key: self.dir.join(format!("{file}-key.pem")) };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}

fn write(path: &Path, pem: &str) -> Result<()> {
    std::fs::write(path, pem)
        .map_err(|e| TlsError::File { path: path.to_path_buf(), message: format!("cannot write: {e}") })
}
