//! `data-plane` binary: parse config, init telemetry, run until SIGTERM.
//! `data-plane token --tenant T` mints a development service credential.
//! `data-plane k8s-objects` prints the objects the `k8s` backend creates
//! (the runtime NetworkPolicy, a warm and a bound runtime pod) as a
//! Kubernetes `List`, for review and offline validation.

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
    if std::env::args().nth(1).as_deref() == Some("k8s-objects") {
        let config = data_plane::Config::parse_from(
            std::iter::once("data-plane".to_owned()).chain(std::env::args().skip(2)),
        );
        match data_plane::runtime::k8s::example_objects(&config) {
            Ok(list) => println!("{list}"),
            Err(e) => shared::env::exit_on_config_error("data-plane k8s-objects", e),
        }
        return Ok(());
    }
    let mut config = data_plane::Config::parse();
    let telemetry = match shared::telemetry::init("data-plane", &config.telemetry) {
        Ok(t) => t,
        Err(e) => shared::env::exit_on_config_error("data-plane", e),
    };
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
    let result = data_plane::run(config, shutdown).await;
    // The servers have drained: export the spans still buffered.
    telemetry.shutdown();
    shared::env::exit_on_run_error("data-plane", result)
}
