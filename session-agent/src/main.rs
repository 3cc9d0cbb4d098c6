//! `session-agent` binary: make the process non-dumpable, parse config, init
//! telemetry, run until SIGTERM.

use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // First, before any interpreter exists: code running as the agent's uid
    // (a runtime pod's interpreter, SESSION_ISOLATION=pod) must not ptrace
    // the agent or read its /proc/<pid>/mem or environ. The flag is
    // process-wide, kept across fork and reset by the interpreter's execve,
    // so only the agent is covered. Here and not in `run`/`serve`, which the
    // in-process tests call: their test runner must stay dumpable.
    shared::env::exit_on_run_error(
        "session-agent",
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
            .map_err(|e| {
                anyhow::anyhow!("cannot make the agent non-dumpable (prctl PR_SET_DUMPABLE): {e}")
            }),
    )?;
    let mut config = session_agent::Config::parse();
    let telemetry = match shared::telemetry::init("session-agent", &config.telemetry) {
        Ok(t) => t,
        Err(e) => shared::env::exit_on_config_error("session-agent", e),
    };
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
    let result = session_agent::run(config, shutdown).await;
    // The servers have drained: export the spans still buffered.
    telemetry.shutdown();
    shared::env::exit_on_run_error("session-agent", result)
}
