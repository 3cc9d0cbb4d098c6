//! The session agent's own figures: cold and warm creates, HTTP steps, the
//! kernel driven directly, idle memory.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use clap::Parser;
use serde_json::json;
use shared::agent::{Runtime, StepMode, StepRequest, StepStatus};
use tokio_util::sync::CancellationToken;

use crate::harness::{Agent, token, wait_pool_full};
use crate::memory::{ProcMem, all_pids, cgroup_memory, mib, proc_mem, processes_of};
use crate::report::{Row, Series};
use crate::{Args, Sizes};

/// Cold creates, the HTTP step series and the idle memory, on an agent
/// without a warm pool.
pub(crate) async fn phase_plain_agent(
    args: &Args,
    sizes: Sizes,
    cold: &mut Row,
    step: &mut Row,
    memory: &mut Row,
) -> anyhow::Result<()> {
    let agent = Agent::start(args, "").await?;
    let r1 = measure_cold(&agent, sizes, cold).await;
    if let Err(e) = &r1 {
        cold.error = Some(format!("{e:#}"));
    }
    let r2 = measure_http_steps(&agent, sizes, step).await;
    if let Err(e) = &r2 {
        step.error = Some(format!("{e:#}"));
    }
    let r3 = measure_memory(&agent, memory).await;
    if let Err(e) = &r3 {
        memory.error = Some(format!("{e:#}"));
    }
    let stopped = agent.stop().await;
    r1.and(r2).and(r3).and(stopped)
}

async fn measure_cold(agent: &Agent, sizes: Sizes, row: &mut Row) -> anyhow::Result<()> {
    let mut samples = Vec::with_capacity(sizes.cold_n);
    let mut warm_flags = 0;
    for i in 0..sizes.warmup_creates + sizes.cold_n {
        agent.wait_sandboxes(0).await?;
        let (id, tok) = (format!("cold-{i}"), token());
        let t = Instant::now();
        let info = agent.create(&id, &tok).await?;
        let elapsed = t.elapsed();
        agent.delete(&id, &tok).await?;
        if i >= sizes.warmup_creates {
            samples.push(elapsed);
            warm_flags += usize::from(info.warm);
        }
    }
    agent.wait_sandboxes(0).await?;
    ensure!(
        warm_flags == 0,
        "{warm_flags} 'cold' creates reported warm=true on an agent without a pool"
    );
    row.series = Some(Series::ms(
        "agent cold create",
        "POST /v1/sessions (python) on an agent without a warm pool, until the 201 arrives: \
         runsc run + interpreter start + readiness round trip; DELETE untimed, next sample after the teardown",
        &samples,
    ));
    Ok(())
}

async fn measure_http_steps(agent: &Agent, sizes: Sizes, row: &mut Row) -> anyhow::Result<()> {
    let (id, tok) = ("steps".to_owned(), token());
    agent.create(&id, &tok).await?;
    let result = async {
        let mut samples = Vec::with_capacity(sizes.steps);
        for i in 0..sizes.warmup_steps + sizes.steps {
            let req = StepRequest {
                session_id: id.clone(),
                step_id: format!("st-{i}"),
                code: "1+1".into(),
                timeout_ms: None,
                mode: None,
                event: None,
            };
            let t = Instant::now();
            let r = agent
                .client
                .step(&req, Some(&tok))
                .await
                .with_context(|| format!("step {i}"))?;
            let elapsed = t.elapsed();
            ensure!(
                r.status == StepStatus::Ok && r.result == Some(json!(2)),
                "step {i} returned {:?} {:?} {:?}",
                r.status,
                r.result,
                r.error
            );
            if i >= sizes.warmup_steps {
                samples.push(elapsed);
            }
        }
        Ok::<_, anyhow::Error>(samples)
    }
    .await;
    agent.delete(&id, &tok).await?;
    agent.wait_sandboxes(0).await?;
    row.series = Some(Series::ms(
        "agent step over HTTP",
        "POST /v1/steps {code: \"1+1\"} on one warm session, sequential, keep-alive reqwest client with \
         TCP_NODELAY (shared::client::AgentClient), until the decoded StepResult",
        &result?,
    ));
    Ok(())
}

async fn measure_memory(agent: &Agent, row: &mut Row) -> anyhow::Result<()> {
    agent.wait_sandboxes(0).await?;
    let (id, tok) = ("idle-memory".to_owned(), token());
    agent.create(&id, &tok).await?;
    let result = async {
        let ids = agent.sandbox_ids();
        ensure!(ids.len() == 1, "expected one sandbox, found {ids:?}");
        let sandbox_id = ids.into_iter().next().context("sandbox id")?;
        // Let start-up transients (page faults of the first request) settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pids = processes_of(&sandbox_id);
        ensure!(!pids.is_empty(), "no host process names sandbox {sandbox_id}");
        let procs: Vec<ProcMem> = pids.iter().filter_map(|p| proc_mem(*p).ok()).collect();
        let pss: u64 = procs.iter().map(|p| p.pss_kib).sum();
        let rss: u64 = procs.iter().map(|p| p.rss_kib).sum();
        let uss: u64 = procs.iter().map(|p| p.private_kib).sum();
        // PSS splits shared pages (the runsc binary) among every process
        // mapping them, so other sandboxes on the host lower it: say how many.
        let other_runsc = all_pids()
            .into_iter()
            .filter(|p| !pids.contains(p))
            .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.starts_with("runsc")))
            .count();
        let role = |p: &ProcMem| -> &'static str {
            if p.cmdline.contains(" gofer ") || p.comm.contains("gofer") {
                "gofer"
            } else if p.cmdline.contains(" boot ") || p.comm.contains("runsc-sandbox") {
                "sandbox (Sentry)"
            } else if p.cmdline.contains(" run ") {
                "runsc run (launcher, waits for the sandbox)"
            } else if p.cmdline.is_empty() {
                "stub (ptrace platform, application address space)"
            } else {
                "other"
            }
        };
        let mut by_role: BTreeMap<&str, (u64, u64, usize)> = BTreeMap::new();
        for p in &procs {
            let e = by_role.entry(role(p)).or_default();
            e.0 += p.pss_kib;
            e.1 += p.rss_kib;
            e.2 += 1;
        }
        let launcher_pss: u64 = procs.iter().filter(|p| role(p).starts_with("runsc run")).map(|p| p.pss_kib).sum();
        let cgroup = cgroup_memory(agent.state.path(), &sandbox_id);
        row.series = Some(Series::new(
            "sandbox idle PSS",
            "sum of PSS (/proc/<pid>/smaps_rollup) of every host process of one idle python session: processes \
             whose command line names the sandbox id (runsc run, gofer, sandbox) and all their descendants \
             (ptrace stubs), 2 s after the create returned",
            "MiB",
            vec![mib(pss)],
        ));
        row.details = json!({
            "sandboxId": sandbox_id,
            "pssMiB": mib(pss),
            "rssSumMiB": mib(rss),
            "ussSumMiB": mib(uss),
            "otherRunscProcessesOnHost": other_runsc,
            "pssWithoutLauncherMiB": mib(pss - launcher_pss),
            "byRole": by_role.iter().map(|(r, (pss, rss, n))| (r.to_string(), json!({"processes": n, "pssMiB": mib(*pss), "rssMiB": mib(*rss)}))).collect::<BTreeMap<_, _>>(),
            "cgroup": cgroup,
            "processes": procs,
        });
        Ok::<_, anyhow::Error>(())
    }
    .await;
    agent.delete(&id, &tok).await?;
    agent.wait_sandboxes(0).await?;
    result?;
    row.informational.push(per_session_pss(agent, 3).await?);
    Ok(())
}

/// PSS per session with `n` idle sessions alive: PSS splits the pages the
/// sessions share (the runsc binary) between them, so this is closer to the
/// cost of one more session on a busy agent.
async fn per_session_pss(agent: &Agent, n: usize) -> anyhow::Result<Series> {
    let sessions: Vec<(String, String)> = (0..n).map(|i| (format!("idle-{i}"), token())).collect();
    let mut created = Vec::new();
    let mut result = async {
        for (id, tok) in &sessions {
            agent.create(id, tok).await?;
            created.push((id.clone(), tok.clone()));
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ids = agent.sandbox_ids();
        ensure!(ids.len() == n, "expected {n} sandboxes, found {ids:?}");
        let mut samples = Vec::new();
        for id in &ids {
            let pss: u64 = processes_of(id)
                .into_iter()
                .filter_map(|p| proc_mem(p).ok())
                .map(|m| m.pss_kib)
                .sum();
            samples.push(mib(pss));
        }
        Ok::<_, anyhow::Error>(samples)
    }
    .await;
    for (id, tok) in &created {
        if let Err(e) = agent.delete(id, tok).await {
            result = result.and(Err(e));
        }
    }
    agent.wait_sandboxes(0).await?;
    Ok(Series::new(
        &format!("PSS per session, {n} idle sessions"),
        "the same PSS sum per session while several idle python sessions are alive (shared runsc pages split between them)",
        "MiB",
        result?,
    ))
}

/// Warm creates on an agent with `--warm-pool python=2`.
pub(crate) async fn phase_pool_agent(
    args: &Args,
    sizes: Sizes,
    row: &mut Row,
) -> anyhow::Result<()> {
    let agent = Agent::start(args, "python=2").await?;
    let r = measure_warm(&agent, sizes, row).await;
    if let Err(e) = &r {
        row.error = Some(format!("{e:#}"));
    }
    let stopped = agent.stop().await;
    r.and(stopped)
}

async fn measure_warm(agent: &Agent, sizes: Sizes, row: &mut Row) -> anyhow::Result<()> {
    let mut samples = Vec::with_capacity(sizes.warm_n);
    let mut refills = Vec::with_capacity(sizes.warm_n);
    let mut misses = 0usize;
    for i in 0..sizes.warmup_creates + sizes.warm_n {
        let refill = wait_pool_full(agent).await?;
        if i > 0 {
            refills.push(refill);
        }
        let (id, tok) = (format!("warm-{i}"), token());
        let t = Instant::now();
        let info = agent.create(&id, &tok).await?;
        let elapsed = t.elapsed();
        agent.delete(&id, &tok).await?;
        if i >= sizes.warmup_creates {
            samples.push(elapsed);
            misses += usize::from(!info.warm);
        }
    }
    wait_pool_full(agent).await?;
    row.series = Some(Series::ms(
        "agent warm create",
        "POST /v1/sessions (python) with the pool full (python=2, polled untimed before each sample): claim + \
         env round trip through the driver + bookkeeping; DELETE untimed",
        &samples,
    ));
    row.informational.push(Series::ms(
        "pool refill (untimed wait)",
        "from the previous DELETE's answer until the pool held 2 idle sandboxes and the deleted one was torn down",
        &refills,
    ));
    row.details = json!({ "poolMisses": misses, "poolTarget": "python=2" });
    ensure!(
        misses == 0,
        "{misses} of {} creates missed the full warm pool",
        sizes.warm_n
    );
    Ok(())
}

/// The agent's kernel in its sandbox, driven directly (no HTTP): splits the
/// HTTP step into transport and sandbox round trip.
pub(crate) async fn kernel_direct_steps(args: &Args, sizes: Sizes) -> anyhow::Result<Series> {
    use session_agent::kernels::{ExecRequest, Kernel};
    let state = tempfile::Builder::new()
        .prefix("sa-bench-kernel-")
        .tempdir_in("/tmp")?;
    let argv = vec![
        "session-agent".to_owned(),
        "--isolation".into(),
        args.isolation.clone(),
        "--state-dir".into(),
        state.path().display().to_string(),
        "--python".into(),
        args.python.display().to_string(),
    ];
    let config = <session_agent::Config as Parser>::try_parse_from(argv)?;
    let launcher = session_agent::isolation::Launcher::new(config.launcher_config()).await?;
    let settings = config.settings();
    std::fs::create_dir_all(&settings.workspace_root)?;
    let sandbox_id = format!("sa-bench-{}", hex::encode(rand::random::<[u8; 6]>()));
    let workspace = session_agent::workspace::Workspace::create(
        &settings.workspace_root,
        &sandbox_id,
        settings.defaults.disk_mb,
    )?;
    let spec = session_agent::isolation::SandboxSpec {
        sandbox_id,
        runtime: Runtime::Python,
        argv: config
            .interpreters()
            .argv(Runtime::Python, &settings.defaults),
        workspace: workspace.host_path.clone(),
        limits: settings.defaults,
        packages: None,
    };
    let started = Kernel::start(
        &launcher,
        &spec,
        settings.ready_timeout,
        settings.interrupt_grace,
    )
    .await;
    let mut kernel = match started {
        Ok(k) => k,
        Err(e) => {
            workspace.destroy();
            launcher.cleanup_host_state();
            return Err(e.into());
        }
    };
    let cancel = CancellationToken::new();
    let mut samples = Vec::with_capacity(sizes.steps);
    let mut failure = None;
    for i in 0..sizes.warmup_steps + sizes.steps {
        let req = ExecRequest {
            code: "1+1",
            mode: StepMode::Eval,
            event: None,
            timeout: Duration::from_millis(settings.defaults.timeout_ms),
            max_output: 1024 * 1024,
        };
        let t = Instant::now();
        let out = kernel.execute(&req, None, &cancel).await;
        let elapsed = t.elapsed();
        if out.status != StepStatus::Ok || out.result != Some(json!(2)) {
            failure = Some(anyhow!(
                "kernel step {i}: {:?} {:?} {:?}",
                out.status,
                out.result,
                out.error
            ));
            break;
        }
        if i >= sizes.warmup_steps {
            samples.push(elapsed);
        }
    }
    kernel.destroy().await;
    workspace.destroy();
    launcher.cleanup_host_state();
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(Series::ms(
        "kernel in sandbox, no HTTP",
        "session_agent::kernels::Kernel::execute(\"1+1\") on a sandboxed python driven from this process: \
         the agent's pipe protocol through gVisor without HTTP, JSON or sessions",
        &samples,
    ))
}
