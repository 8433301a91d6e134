use anyhow::Context;
use clap::Parser;
use qwen_router::config::RouterArgs;
use qwen_telemetry::LogConfig;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let args = RouterArgs::parse();
    let log = LogConfig { format: args.log_format, otlp_endpoint: args.otlp_endpoint.clone(), service: "qwen-router" };
    let _telemetry = qwen_telemetry::logging::init(&log)?;
    // Every client connection and worker channel is an open file: take what the hard limit
    // allows before sizing the connection caps from it.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(open_files = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let cfg = args.validate().map_err(anyhow::Error::msg)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let cancel = CancellationToken::new();
        let running = qwen_router::server::start(cfg, cancel.clone()).await.context("starting the router")?;
        // Tests and scripts read the bound addresses from stdout.
        println!("grpc listening on {}", running.grpc_addr);
        println!("http listening on {}", running.http_addr);
        qwen_telemetry::shutdown_signal().await;
        tracing::info!("shutting down");
        running.shutdown().await;
        anyhow::Ok(())
    })
}
