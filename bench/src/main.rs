//! `make bench`: latency and memory of the session agent's execution core
//! (issue 3), each figure next to a bare-process baseline measured in the
//! same run, because the machines are shared and noisy (MEASURED.md): only
//! ratios within one run mean much.
//!
//! It reports numbers and never asserts them: a missed target is printed as
//! FAIL and recorded in the JSON, and the exit code is non-zero only when
//! something errored.
//!
//! Measurements (SPECIFICATION.md, "Execution core"):
//! 1. cold session create in gVisor vs spawning a bare `python3 -c`;
//! 2. warm session create (pool hit) vs the cold create;
//! 3. a warm Python step `1+1` over HTTP vs a bare persistent `python3`
//!    over pipes (plus, for diagnosis, the agent's driver bare and the
//!    agent's kernel in its sandbox without HTTP);
//! 4. idle memory of one Python sandbox, as PSS of all its host processes and
//!    as its cgroup's charge, vs a bare idle `python3`.
//!
//! Layout: `main.rs` (command line, the order of the phases, the JSON
//! report), `harness.rs` (the agent under test, in this process, and its
//! warm-pool waits), `sessionagent.rs` (the agent's figures), `dataplane.rs`
//! and `controlplane.rs` (the planes' figures), `baseline.rs` (bare-process
//! baselines), `memory.rs` (PSS and cgroup accounting), `report.rs`
//! (statistics, targets, machine information, the printed table).

// A benchmark needs bare baseline processes (and `runsc --version`) next to
// the agent's sandboxes; the rule that only the isolation module spawns
// processes is about the service, not its measuring harness.
#![allow(clippy::disallowed_methods)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

mod baseline;
mod controlplane;
mod dataplane;
mod harness;
mod memory;
mod report;
mod sessionagent;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;
use serde_json::{Value, json};

use crate::baseline::bare_baselines;
use crate::report::{Row, Series, Stat, machine_info, now_ms, print_series, print_table};
use crate::sessionagent::{kernel_direct_steps, phase_plain_agent, phase_pool_agent};

/// Command line of `make bench`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "bench",
    about = "Session agent latency and memory against bare-process baselines"
)]
struct Args {
    /// Small sample sizes for a smoke run (cold 5, warm 3, 200 steps).
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON report.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Cold session creates (default 20, quick 5).
    #[arg(long)]
    cold_n: Option<usize>,
    /// Warm session creates (default 20, quick 3).
    #[arg(long)]
    warm_n: Option<usize>,
    /// Timed steps (default 2000, quick 200).
    #[arg(long)]
    steps: Option<usize>,
    /// Untimed steps before the timed ones (default 100, quick 20).
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Sandbox technology of the agent under test.
    #[arg(long, env = "SESSION_ISOLATION", default_value = "gvisor")]
    isolation: String,
    /// The interpreter, in the sandboxes and for the baselines.
    #[arg(long, default_value = "/usr/bin/python3")]
    python: PathBuf,
    /// The runsc binary (for its version in the report).
    #[arg(long, default_value = "runsc")]
    runsc: PathBuf,
    /// Size of the artifact moved through the data plane, MiB (quick 32).
    #[arg(long)]
    artifact_mib: Option<usize>,
}

/// Sample sizes after `--quick` and the overrides.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
struct Sizes {
    cold_n: usize,
    warm_n: usize,
    steps: usize,
    warmup_steps: usize,
    /// Untimed creates/spawns before each create series (first-run disk cache).
    warmup_creates: usize,
}

impl Args {
    fn sizes(&self) -> Sizes {
        let (cold, warm, steps, warmup) = if self.quick {
            (5, 3, 200, 20)
        } else {
            (20, 20, 2000, 100)
        };
        Sizes {
            cold_n: self.cold_n.unwrap_or(cold).max(1),
            warm_n: self.warm_n.unwrap_or(warm).max(1),
            steps: self.steps.unwrap_or(steps).max(1),
            warmup_steps: self.warmup_steps.unwrap_or(warmup),
            warmup_creates: 1,
        }
    }

    fn out_path(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench/session-agent.json")
        })
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let sizes = args.sizes();
    let started_ms = now_ms();
    let started = Instant::now();
    let machine = machine_info(&args);
    println!(
        "session agent bench ({}): {sizes:?}",
        if args.quick { "quick" } else { "full" }
    );
    println!("machine: {machine}");
    let mut errors: Vec<String> = Vec::new();

    let mut cold = Row::new(
        "coldCreate",
        "cold create (gVisor, python)",
        &[(Stat::P50, 300.0, "ms")],
    );
    let mut warm = Row::new(
        "warmCreate",
        "warm create (pool hit)",
        &[(Stat::P50, 15.0, "ms"), (Stat::P95, 50.0, "ms")],
    );
    let mut step = Row::new(
        "warmStep",
        "warm step 1+1 over HTTP",
        &[(Stat::P50, 1.0, "ms"), (Stat::P99, 5.0, "ms")],
    );
    let mut memory = Row::new(
        "idleMemory",
        "idle memory, PSS, all procs",
        &[(Stat::P50, 25.0, "MiB")],
    );

    // Bare baselines, on a blocking thread: plain std pipes, no runtime.
    println!("baselines: bare processes ...");
    let python = args.python.clone();
    let baselines = tokio::task::spawn_blocking(move || bare_baselines(&python, sizes))
        .await
        .context("baseline thread panicked")?;
    let baselines = match baselines {
        Ok(b) => Some(b),
        Err(e) => {
            errors.push(format!("bare baselines: {e:#}"));
            None
        }
    };

    println!("agent without warm pool: cold creates, steps over HTTP, idle memory ...");
    if let Err(e) = phase_plain_agent(&args, sizes, &mut cold, &mut step, &mut memory).await {
        errors.push(format!("agent without pool: {e:#}"));
    }

    println!("kernel driven directly (no HTTP) ...");
    match kernel_direct_steps(&args, sizes).await {
        Ok(s) => step.informational.push(s),
        Err(e) => errors.push(format!("kernel without HTTP: {e:#}")),
    }

    println!("agent with warm pool python=2: warm creates ...");
    if let Err(e) = phase_pool_agent(&args, sizes, &mut warm).await {
        errors.push(format!("agent with pool: {e:#}"));
    }

    println!("data plane in front of an agent with warm pool python=2: steps, jobs, artifacts ...");
    let mut dp_rows = dataplane::DpRows {
        step: Row::new(
            "dpStep",
            "step through data plane",
            &[(Stat::P50, 1.5, "ms"), (Stat::P99, 6.0, "ms")],
        ),
        job: Row::new(
            "dpJob",
            "one-shot job, warm pool",
            &[(Stat::P50, 100.0, "ms"), (Stat::P95, 250.0, "ms")],
        ),
        upload: Row::new(
            "artifactUpload",
            "artifact upload (fs)",
            &[(Stat::P50, 5.0, "ms/MiB")],
        ),
        download: Row::new(
            "artifactDownload",
            "artifact download (fs)",
            &[(Stat::P50, 5.0, "ms/MiB")],
        ),
    };
    if let Err(e) = dataplane::phase_data_plane(&args, sizes, &mut dp_rows).await {
        errors.push(format!("data plane: {e:#}"));
    }

    println!(
        "data plane with the k8s backend (k8s-fixture) beside the local backend: warm claims, cold creates ..."
    );
    let mut k8s_rows = dataplane::K8sRows {
        warm: Row::new(
            "k8sWarmClaim",
            "k8s warm-pool claim",
            &[(Stat::P50, 50.0, "ms")],
        ),
        cold: Row::new("k8sColdCreate", "k8s cold create", &[]),
    };
    if let Err(e) = dataplane::phase_k8s(&args, sizes, &mut k8s_rows).await {
        errors.push(format!("k8s backend: {e:#}"));
    }

    println!(
        "control plane in front of it (SQLite, then PostgreSQL): steps, jobs, sustained jobs ..."
    );
    let mut cp_rows = controlplane::CpRows {
        step: Row::new(
            "cpStep",
            "step through control plane",
            &[(Stat::P50, 2.0, "ms"), (Stat::P95, 5.0, "ms")],
        ),
        mcp_step: Row::new("mcpStep", "run_step tool via MCP", &[]).with_max_ratio(1.5),
        job: Row::new(
            "cpJob",
            "one-shot job via control plane",
            &[(Stat::P50, 120.0, "ms")],
        ),
        throughput_sqlite: Row::new(
            "cpJobsSqlite",
            "sustained jobs, SQLite",
            &[(Stat::P50, 100.0, "ms/job")],
        ),
        throughput_postgres: Row::new(
            "cpJobsPostgres",
            "sustained jobs, PostgreSQL",
            &[(Stat::P50, 100.0, "ms/job")],
        ),
        limiter: Row::new(
            "cpRateLimiterRedis",
            "rate limiter (Redis) on a warm step",
            &[(Stat::P50, 0.3, "ms")],
        ),
        artifact_upload: Row::new(
            "cpArtifactUpload",
            "artifact upload via control plane",
            &[(Stat::P50, 6.7, "ms/MiB")],
        ),
        artifact_download: Row::new(
            "cpArtifactDownload",
            "artifact download via control plane",
            &[(Stat::P50, 6.7, "ms/MiB")],
        ),
    };
    if let Err(e) = controlplane::phase_control_plane(&args, sizes, &mut cp_rows).await {
        errors.push(format!("control plane: {e:#}"));
    }

    if let Some(b) = baselines {
        cold.baseline = Some(b.spawn);
        step.baseline = Some(b.repl_step);
        step.informational.insert(0, b.driver_step);
        memory.baseline = Some(b.repl_pss);
        memory.informational.push(b.driver_pss);
    }
    warm.baseline = cold.series.clone().map(|mut s| {
        s.name = "agent cold create (row 1)".into();
        s
    });
    // The same idle session, counted as the kernel charges it: the memory of
    // the sandbox's own cgroup (Sentry, gofer and application), which is what
    // its memory limit sees and what decides how many fit in a node's memory.
    // The PSS row above also counts the `runsc run` launcher and every page
    // shared with the runsc binary; both rows are reported.
    let mut memory_cgroup = Row::new(
        "idleMemoryCgroup",
        "idle memory, sandbox cgroup",
        &[(Stat::P50, 25.0, "MiB")],
    );
    match memory
        .details
        .pointer("/cgroup/usageMiB")
        .and_then(Value::as_f64)
    {
        Some(mib) => {
            memory_cgroup.series = Some(Series::new(
                "sandbox cgroup usage",
                "memory.usage_in_bytes (v1) or memory.current (v2) of the idle session's sandbox cgroup, \
                 read with the PSS figure",
                "MiB",
                vec![mib],
            ));
            memory_cgroup.baseline = memory.baseline.clone();
        }
        None => memory_cgroup.error = Some("the sandbox cgroup could not be read".into()),
    }
    let mut rows = vec![
        cold,
        warm,
        step,
        memory,
        memory_cgroup,
        dp_rows.step,
        dp_rows.job,
        dp_rows.upload,
        dp_rows.download,
        k8s_rows.warm,
        k8s_rows.cold,
        cp_rows.step,
        cp_rows.mcp_step,
        cp_rows.job,
        cp_rows.throughput_sqlite,
        cp_rows.throughput_postgres,
        cp_rows.limiter,
        cp_rows.artifact_upload,
        cp_rows.artifact_download,
    ];
    for r in &mut rows {
        r.finish();
    }

    for r in &rows {
        println!("{}:", r.title);
        for s in r
            .series
            .iter()
            .chain(r.baseline.iter())
            .chain(r.informational.iter())
        {
            print_series(s);
        }
        if let Some(e) = &r.error {
            println!("  error: {e}");
        }
    }
    if let Some(mem) = rows.iter().find(|r| r.key == "idleMemory") {
        let d = &mem.details;
        if let (Some(pss), Some(rss), Some(uss), Some(nolaunch), Some(other)) = (
            d.get("pssMiB").and_then(Value::as_f64),
            d.get("rssSumMiB").and_then(Value::as_f64),
            d.get("ussSumMiB").and_then(Value::as_f64),
            d.get("pssWithoutLauncherMiB").and_then(Value::as_f64),
            d.get("otherRunscProcessesOnHost"),
        ) {
            println!(
                "idle memory of one sandbox: PSS {pss:.1} MiB (without the `runsc run` launcher {nolaunch:.1} MiB), \
                 USS {uss:.1} MiB, RSS sum {rss:.1} MiB; other runsc processes on the host: {other}"
            );
        }
        if let Some(by_role) = mem.details.get("byRole") {
            println!("idle memory by process role: {by_role}");
        }
        if let Some(cg) = mem.details.get("cgroup") {
            println!("idle memory, sandbox cgroup: {cg}");
        }
    }
    print_table(&rows);

    let all_pass = rows.iter().all(|r| r.pass);
    let report = json!({
        "schema": "session-agent-bench/1",
        "startedAtMs": started_ms,
        "elapsedSeconds": started.elapsed().as_secs_f64(),
        "mode": if args.quick { "quick" } else { "full" },
        "sizes": sizes,
        "machine": machine,
        "notes": [
            "Targets are from architecture/SPECIFICATION.md (issue 3). Figures are reported, never asserted.",
            "Percentiles by nearest rank: with 20 samples p95 is the 19th and p99 the largest.",
            "Each baseline was measured in this same run; compare ratios, not absolute numbers, across runs.",
            "idleMemory compares PSS (shared pages split between sharers) with the target; RSS and the cgroup's usage are in details.",
        ],
        "allTargetsMet": all_pass,
        "errors": errors,
        "measurements": rows,
    });
    let out = args.out_path();
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", out.display()))?;
    let shown = out.canonicalize().unwrap_or(out);
    println!("all targets met: {all_pass}; JSON: {}", shown.display());
    for e in &errors {
        eprintln!("error: {e}");
    }
    Ok(errors.is_empty())
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Only warnings by default: the agent logs every step at info, which
    // would measure the terminal rather than the agent.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let args = Args::parse();
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}
