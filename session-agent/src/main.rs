//! `session-agent` binary: parse config, init telemetry, run until SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = session_agent::Config::parse();
    shared::telemetry::init_tracing();
    if let Err(e) = config.validate() {
        anyhow::bail!("invalid configuration: {e}");
    }
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shared::server::shutdown_signal().await;
        trigger.cancel();
    });
    session_agent::run(config, shutdown).await
}
