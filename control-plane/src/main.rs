//! `control-plane` binary: parse config, init telemetry, run until SIGTERM.
//!
//! Also: `control-plane token --tenant T --roles R` mints a development
//! token; `control-plane audit verify` checks the audit hash chain;
//! `control-plane openapi` prints the API description.

use clap::Parser;
use tokio_util::sync::CancellationToken;

/// `control-plane audit verify`.
#[derive(Debug, Parser)]
#[command(
    name = "control-plane audit verify",
    about = "Walk the audit hash chain and report the first broken link (exit 1 if broken)"
)]
struct AuditArgs {
    #[arg(long, env = "DATABASE_DRIVER", value_enum, default_value = "sqlite")]
    database_driver: control_plane::config::DatabaseDriver,
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "file:control-plane.db?cache=shared&mode=rwc"
    )]
    database_url: String,
    /// `SEQ:HASH` (`headSeq` and `head` of a report saved earlier outside
    /// the database): the event at SEQ must still carry HASH. Catches a
    /// chain rewritten with recomputed hashes, or cut short.
    #[arg(long, value_name = "SEQ:HASH", value_parser = control_plane::audit::Anchor::parse)]
    anchor: Option<control_plane::audit::Anchor>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("token") => {
            let a = control_plane::identity::TokenArgs::parse_from(args.iter().skip(1));
            match control_plane::identity::mint_dev_token(&a) {
                Ok(token) => println!("{token}"),
                Err(e) => shared::env::exit_on_config_error("control-plane token", e),
            }
            return Ok(());
        }
        Some("openapi") => {
            println!("{}", control_plane::api::openapi_json());
            return Ok(());
        }
        Some("audit") if args.get(2).map(String::as_str) == Some("verify") => {
            let a = AuditArgs::parse_from(args.iter().skip(2));
            let db =
                control_plane::storage::Db::connect(a.database_driver, &a.database_url, 2).await?;
            let report =
                control_plane::audit::AuditLog::new(db, control_plane::metrics::Metrics::new())
                    .verify_against(a.anchor.as_ref())
                    .await
                    .map_err(|e| anyhow::anyhow!(e.to_string()))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            if !report.ok {
                std::process::exit(1);
            }
            return Ok(());
        }
        _ => {}
    }
    let mut config = control_plane::Config::parse();
    let telemetry = match shared::telemetry::init("control-plane", &config.telemetry) {
        Ok(t) => t,
        Err(e) => shared::env::exit_on_config_error("control-plane", e),
    };
    if let Err(e) = config.use_dev_keys() {
        shared::env::exit_on_config_error("control-plane", e);
    }
    if let Err(e) = config.validate() {
        shared::env::exit_on_config_error("control-plane", e);
    }
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shared::server::shutdown_signal().await;
        trigger.cancel();
    });
    let result = control_plane::run(config, shutdown).await;
    // The servers have drained: export the spans still buffered.
    telemetry.shutdown();
    shared::env::exit_on_run_error("control-plane", result)
}
