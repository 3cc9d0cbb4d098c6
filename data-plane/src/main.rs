//! `data-plane` binary: parse config, init telemetry, run until SIGTERM.
//! `data-plane token --tenant T` mints a development service credential.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("token") {
        let args = data_plane::auth::TokenArgs::parse_from(std::env::args().skip(1));
        println!(
            "{}",
            data_plane::auth::mint_dev_token(&args).map_err(anyhow::Error::msg)?
        );
        return Ok(());
    }
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
