//! `qwen-dev-certs DIR [NAME...]`: a throwaway CA and certificates for a local TLS trial
//! (router, worker and client certificates valid for NAMEs, default localhost and 127.0.0.1).
//! Not for production: use your own CA there (see docs/security.md).

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next() else {
        anyhow::bail!("usage: qwen-dev-certs DIR [NAME...]  (writes ca.pem, server.pem, client.pem and keys to DIR)");
    };
    let mut names: Vec<String> = args.collect();
    if names.is_empty() {
        names = vec!["localhost".into(), "127.0.0.1".into()];
    }
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let dir = std::path::Path::new(&dir);
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
    let ca = qwen_tls::dev::DevCa::create(dir, "qwen-serve dev CA")?;
    ca.issue("server", &names, qwen_tls::dev::Usage::Server)?;
    ca.issue("client", &["qwen-client"], qwen_tls::dev::Usage::Client)?;
    println!(
        "{}: ca.pem, server.pem + server-key.pem ({}), client.pem + client-key.pem",
        dir.display(),
        names.join(", ")
    );
    Ok(())
}
