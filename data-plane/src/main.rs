//! `data-plane` binary: parse config, init telemetry, run until SIGTERM.
//! `data-plane token --tenant T` mints a development service credential.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("token") {
        let args = data_plane::auth::TokenArgs::parse_from(std::env::args().skip(1));
        match data_plane::auth::mint_dev_token(&args) {
            Ok(token) => println!("{token}"),
            Err(e) => shared::env::exit_on_config_error("data-plane token", e),
        }
        return Ok(());
    }
    let mut config = data_plane::Config::parse();
    shared::telemetry::init_tracing();
    if let Err(e) = config.use_dev_keys() {
        shared::env::exit_on_config_error("data-plane", e);
    }
    if let Err(e) = config.validate() {
        shared::env::exit_on_config_error("data-plane", e);
    }
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shared::server::shutdown_signal().await;
        trigger.cancel();
    });
    shared::env::exit_on_run_error("data-plane", data_plane::run(config, shutdown).await)
}
