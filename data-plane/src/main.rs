//! `data-plane` binary: parse config, init telemetry, run until SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = data_plane::Config::parse();
    shared::telemetry::init_tracing();
    config.validate().map_err(anyhow::Error::msg)?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shared::server::shutdown_signal().await;
        trigger.cancel();
    });
    data_plane::run(config, shutdown).await
}
