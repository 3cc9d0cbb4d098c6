//! `session-agent` binary: parse config, init telemetry, run until SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut config = session_agent::Config::parse();
    shared::telemetry::init_tracing();
    if let Err(e) = config.use_dev_keys() {
        shared::env::exit_on_config_error("session-agent", e);
    }
    if let Err(e) = config.validate() {
        shared::env::exit_on_config_error("session-agent", e);
    }
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shared::server::shutdown_signal().await;
        trigger.cancel();
    });
    shared::env::exit_on_run_error("session-agent", session_agent::run(config, shutdown).await)
}
