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

// A benchmark needs bare baseline processes (and `runsc --version`) next to
// the agent's sandboxes; the rule that only the isolation module spawns
// processes is about the service, not its measuring harness.
#![allow(clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod controlplane;
mod dataplane;

use anyhow::{Context, anyhow, bail, ensure};
use clap::Parser;
use serde::Serialize;
use serde_json::{Value, json};
use shared::agent::{CreateSessionRequest, Runtime, StepMode, StepRequest, StepStatus};
use shared::client::AgentClient;
use tokio_util::sync::CancellationToken;

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

// ---------------------------------------------------------------------------
// Statistics

/// Summary of a series; percentiles by nearest rank (p99 of 20 samples is
/// the maximum).
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
struct Stats {
    count: usize,
    mean: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn of(samples: &[f64]) -> Stats {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let rank = |q: f64| -> f64 {
            if n == 0 {
                return f64::NAN;
            }
            let idx = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            v[idx]
        };
        Stats {
            count: n,
            mean: if n == 0 {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / n as f64
            },
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            min: v.first().copied().unwrap_or(f64::NAN),
            max: v.last().copied().unwrap_or(f64::NAN),
        }
    }

    fn get(&self, stat: Stat) -> f64 {
        match stat {
            Stat::P50 => self.p50,
            Stat::P95 => self.p95,
            Stat::P99 => self.p99,
        }
    }
}

/// A named series of samples and what it measures.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Series {
    name: String,
    what: String,
    unit: &'static str,
    stats: Stats,
    samples: Vec<f64>,
}

impl Series {
    fn new(name: &str, what: &str, unit: &'static str, samples: Vec<f64>) -> Series {
        let stats = Stats::of(&samples);
        let samples = samples
            .into_iter()
            .map(|s| (s * 10_000.0).round() / 10_000.0)
            .collect();
        Series {
            name: name.into(),
            what: what.into(),
            unit,
            stats,
            samples,
        }
    }

    fn ms(name: &str, what: &str, durations: &[Duration]) -> Series {
        Series::new(
            name,
            what,
            "ms",
            durations.iter().map(|d| d.as_secs_f64() * 1000.0).collect(),
        )
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
enum Stat {
    P50,
    P95,
    P99,
}

/// An upper bound on one statistic.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Target {
    stat: Stat,
    max: f64,
    unit: &'static str,
    measured: Option<f64>,
    pass: bool,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    key: &'static str,
    title: &'static str,
    series: Option<Series>,
    targets: Vec<Target>,
    /// Every target met (false when the measurement errored).
    pass: bool,
    baseline: Option<Series>,
    /// `series.p50 / baseline.p50`.
    ratio_p50: Option<f64>,
    /// Further series that help explain the figure; not compared with targets.
    informational: Vec<Series>,
    details: Value,
    error: Option<String>,
}

impl Row {
    fn new(key: &'static str, title: &'static str, targets: &[(Stat, f64, &'static str)]) -> Row {
        Row {
            key,
            title,
            series: None,
            targets: targets
                .iter()
                .map(|&(stat, max, unit)| Target {
                    stat,
                    max,
                    unit,
                    measured: None,
                    pass: false,
                })
                .collect(),
            pass: false,
            baseline: None,
            ratio_p50: None,
            informational: Vec::new(),
            details: Value::Null,
            error: None,
        }
    }

    /// Fills targets and the ratio once the series are known.
    fn finish(&mut self) {
        if let Some(s) = &self.series {
            for t in &mut self.targets {
                let v = s.stats.get(t.stat);
                t.measured = Some(v);
                t.pass = v <= t.max;
            }
            self.pass = self.error.is_none() && self.targets.iter().all(|t| t.pass);
            if let Some(b) = &self.baseline {
                self.ratio_p50 = Some(s.stats.p50 / b.stats.p50);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The agent under test, in this process

struct Agent {
    url: String,
    client: AgentClient,
    state: tempfile::TempDir,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Agent {
    /// Starts `session_agent::serve` on an ephemeral loopback port with a
    /// fresh state directory and waits for its health check.
    async fn start(args: &Args, warm_pool: &str) -> anyhow::Result<Agent> {
        let state = tempfile::Builder::new()
            .prefix("sa-bench-")
            .tempdir_in("/tmp")
            .context("state dir")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding")?;
        let port = listener.local_addr()?.port();
        // Every setting that matters is explicit so SESSION_AGENT_* variables
        // in the environment cannot change what is measured.
        let argv: Vec<String> = vec![
            "session-agent".into(),
            "--env".into(),
            "dev".into(),
            "--isolation".into(),
            args.isolation.clone(),
            "--state-dir".into(),
            state.path().display().to_string(),
            "--warm-pool".into(),
            warm_pool.into(),
            "--auth-bypass".into(),
            "false".into(),
            "--python".into(),
            args.python.display().to_string(),
            "--idle-timeout-seconds".into(),
            "3600".into(),
        ];
        let config =
            <session_agent::Config as Parser>::try_parse_from(argv).context("agent config")?;
        config
            .validate()
            .map_err(|e| anyhow!("agent config: {e}"))?;
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(session_agent::serve(listener, config, shutdown.clone()));
        let client = AgentClient::new(format!("http://127.0.0.1:{port}"))?;
        let mut agent = Agent {
            url: format!("http://127.0.0.1:{port}"),
            client,
            state,
            shutdown,
            handle: Some(handle),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match agent.client.health().await {
                Ok(h) => {
                    ensure!(
                        h.isolation == args.isolation,
                        "agent runs {} not {}",
                        h.isolation,
                        args.isolation
                    );
                    return Ok(agent);
                }
                Err(e) if Instant::now() > deadline => {
                    let _ = agent.stop_inner().await;
                    bail!("agent did not come up: {e}");
                }
                Err(_) => {
                    if agent.handle.as_ref().is_some_and(|h| h.is_finished()) {
                        agent.stop_inner().await?;
                        bail!("agent stopped during start-up");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    fn workspace_root(&self) -> PathBuf {
        self.state.path().join("workspaces")
    }

    /// Sandboxes alive (each has a workspace until its teardown finished).
    fn sandbox_ids(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.workspace_root())
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits (untimed) until exactly `n` sandboxes exist, so a teardown in
    /// the background does not compete with the next sample.
    async fn wait_sandboxes(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.sandbox_ids().len() != n {
            ensure!(
                Instant::now() < deadline,
                "{} sandboxes after 60 s, expected {n}",
                self.sandbox_ids().len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    async fn create(&self, id: &str, token: &str) -> anyhow::Result<shared::agent::SessionInfo> {
        let req = CreateSessionRequest {
            session_id: id.into(),
            runtime: "python".into(),
            token: Some(token.into()),
            limits: None,
            env: None,
            ttl_seconds: None,
            idle_timeout_seconds: None,
            packages_dir: None,
        };
        self.client
            .create_session(&req)
            .await
            .with_context(|| format!("creating session {id}"))
    }

    async fn delete(&self, id: &str, token: &str) -> anyhow::Result<()> {
        self.client
            .delete_session(id, Some(token))
            .await
            .with_context(|| format!("deleting session {id}"))
    }

    /// Cancels the agent, waits for it to destroy every sandbox, then checks
    /// that no process of this agent's state directory is left.
    async fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner().await
    }

    async fn stop_inner(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await
                .context("agent task panicked")?
                .context("agent stopped with an error")?;
        }
        let marker = self.state.path().display().to_string();
        let left: Vec<u32> = all_pids()
            .into_iter()
            .filter(|p| cmdline(*p).contains(&marker))
            .collect();
        ensure!(
            left.is_empty(),
            "processes left behind by the agent: {left:?}"
        );
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

// ---------------------------------------------------------------------------
// Bare-process baselines (blocking I/O on a blocking thread)

/// A child that is killed and reaped when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `python3 -E -s -S -c 'print(1)'` until its one line arrives.
fn bare_spawn_once(python: &Path) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut child = Command::new(python)
        .args(session_agent::kernels::PYTHON_FLAGS)
        .args(["-c", "print(1)"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {}", python.display()))?;
    let mut line = String::new();
    let stdout = child.stdout.take().context("stdout")?;
    BufReader::new(stdout).read_line(&mut line)?;
    let elapsed = start.elapsed();
    let status = child.wait()?;
    ensure!(
        line.trim() == "1" && status.success(),
        "bare python answered {line:?} ({status})"
    );
    Ok(elapsed)
}

const TINY_REPL: &str = "import sys\n\
r = sys.stdin.buffer.readline\n\
w = sys.stdout.buffer.write\n\
f = sys.stdout.buffer.flush\n\
w(b'ready\\n'); f()\n\
while True:\n    \
    line = r()\n    \
    if not line:\n        \
        break\n    \
    w(repr(eval(line)).encode() + b'\\n'); f()\n";

/// A persistent bare `python3` running a tiny read-eval-print loop.
struct BareRepl {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    child: Reaped,
}

impl BareRepl {
    fn start(python: &Path) -> anyhow::Result<BareRepl> {
        let mut child = Command::new(python)
            .args(session_agent::kernels::PYTHON_FLAGS)
            .args(["-c", TINY_REPL])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {}", python.display()))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut repl = BareRepl {
            stdin,
            stdout,
            child: Reaped(child),
        };
        let mut line = String::new();
        repl.stdout.read_line(&mut line)?;
        ensure!(line == "ready\n", "bare REPL said {line:?}");
        Ok(repl)
    }

    fn eval(&mut self, expr: &str) -> anyhow::Result<String> {
        self.stdin.write_all(format!("{expr}\n").as_bytes())?;
        self.stdin.flush()?;
        let mut line = String::new();
        ensure!(self.stdout.read_line(&mut line)? > 0, "bare REPL exited");
        Ok(line)
    }
}

/// The agent's own Python driver as a bare process: the same protocol
/// (JSON request, marks on both streams) without gVisor or HTTP.
struct BareDriver {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr: BufReader<ChildStderr>,
    child: Reaped,
}

impl BareDriver {
    fn start(python: &Path) -> anyhow::Result<BareDriver> {
        let mut child = Command::new(python)
            .args(session_agent::kernels::PYTHON_FLAGS)
            .args(["-c", session_agent::kernels::PYTHON_DRIVER])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("LANG", "C.UTF-8")
            .env("PYTHONIOENCODING", "utf-8")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {}", python.display()))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let stderr = BufReader::new(child.stderr.take().context("stderr")?);
        let mut d = BareDriver {
            stdin,
            stdout,
            stderr,
            child: Reaped(child),
        };
        d.request(&json!({"op": "env", "env": {}}))?;
        Ok(d)
    }

    /// One request; returns the status JSON after the stdout mark.
    fn request(&mut self, req: &Value) -> anyhow::Result<String> {
        let nonce = hex::encode(rand::random::<[u8; 16]>());
        let mut req = req.clone();
        req["nonce"] = json!(nonce);
        let mut line = serde_json::to_vec(&req)?;
        line.push(b'\n');
        self.stdin.write_all(&line)?;
        self.stdin.flush()?;
        let mark = format!("\x1e\x1eSA:{nonce}:");
        // The driver writes the stderr mark first, then the stdout status.
        let mut err = String::new();
        ensure!(self.stderr.read_line(&mut err)? > 0, "bare driver exited");
        ensure!(err.starts_with(&mark), "bare driver stderr: {err:?}");
        let mut out = String::new();
        ensure!(self.stdout.read_line(&mut out)? > 0, "bare driver exited");
        out.strip_prefix(&mark)
            .map(|s| s.trim_end().to_owned())
            .ok_or_else(|| anyhow!("bare driver stdout: {out:?}"))
    }

    fn eval(&mut self, code: &str) -> anyhow::Result<String> {
        self.request(&json!({"op": "exec", "code": code, "mode": "eval"}))
    }
}

fn time_steps(
    n: usize,
    warmup: usize,
    mut step: impl FnMut(usize) -> anyhow::Result<()>,
) -> anyhow::Result<Vec<Duration>> {
    for i in 0..warmup {
        step(i)?;
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        step(warmup + i)?;
        out.push(t.elapsed());
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Host memory accounting

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim_end()
                .to_owned()
        })
        .unwrap_or_default()
}

fn ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Memory of one process from `/proc/<pid>/smaps_rollup`, KiB.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct ProcMem {
    pid: u32,
    comm: String,
    cmdline: String,
    rss_kib: u64,
    pss_kib: u64,
    pss_anon_kib: u64,
    pss_file_kib: u64,
    pss_shmem_kib: u64,
    /// USS: pages only this process maps (independent of other processes).
    private_kib: u64,
}

fn proc_mem(pid: u32) -> anyhow::Result<ProcMem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .with_context(|| format!("reading /proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let mut cmd = cmdline(pid);
    if cmd.len() > 160 {
        let cut = (0..=160)
            .rev()
            .find(|i| cmd.is_char_boundary(*i))
            .unwrap_or(0);
        cmd.truncate(cut);
        cmd.push_str("...");
    }
    Ok(ProcMem {
        pid,
        comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cmdline: cmd,
        rss_kib: field("Rss"),
        pss_kib: field("Pss"),
        pss_anon_kib: field("Pss_Anon"),
        pss_file_kib: field("Pss_File"),
        pss_shmem_kib: field("Pss_Shmem"),
        private_kib: field("Private_Clean") + field("Private_Dirty"),
    })
}

/// Processes whose command line names `needle`, plus all their descendants
/// (under the ptrace platform gVisor's stub processes carry no name).
fn processes_of(needle: &str) -> Vec<u32> {
    let pids = all_pids();
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for &p in &pids {
        if let Some(pp) = ppid(p) {
            children.entry(pp).or_default().push(p);
        }
    }
    let mut found: BTreeSet<u32> = pids
        .iter()
        .copied()
        .filter(|p| cmdline(*p).contains(needle))
        .collect();
    let mut queue: Vec<u32> = found.iter().copied().collect();
    while let Some(p) = queue.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or_default() {
            if found.insert(c) {
                queue.push(c);
            }
        }
    }
    found.into_iter().collect()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The sandbox's memory cgroup as runsc created it from `linux.cgroupsPath`.
fn cgroup_memory(state_dir: &Path, sandbox_id: &str) -> Value {
    let rel = session_agent::isolation::CgroupParent::discover("session-agent", state_dir)
        .child_path(sandbox_id);
    let rel = rel.trim_start_matches('/');
    let v1 = Path::new("/sys/fs/cgroup/memory").join(rel);
    let v2 = Path::new("/sys/fs/cgroup").join(rel);
    let read_u64 = |p: PathBuf| {
        std::fs::read_to_string(p)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    if let Some(usage) = read_u64(v1.join("memory.usage_in_bytes")) {
        let stat = std::fs::read_to_string(v1.join("memory.stat")).unwrap_or_default();
        let pick: BTreeMap<&str, u64> = stat
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(k, _)| {
                matches!(
                    *k,
                    "total_rss" | "total_cache" | "total_shmem" | "total_mapped_file"
                )
            })
            .filter_map(|(k, v)| Some((k, v.trim().parse().ok()?)))
            .collect();
        json!({
            "hierarchy": "v1",
            "path": v1.display().to_string(),
            "usageInBytes": usage,
            "usageMiB": usage as f64 / 1048576.0,
            "stat": pick,
        })
    } else if let Some(current) = read_u64(v2.join("memory.current")) {
        json!({"hierarchy": "v2", "path": v2.display().to_string(), "currentBytes": current, "currentMiB": current as f64 / 1048576.0})
    } else {
        json!({"available": false, "lookedAt": [v1.display().to_string(), v2.display().to_string()]})
    }
}

// ---------------------------------------------------------------------------
// Phases

/// Cold creates, the HTTP step series and the idle memory, on an agent
/// without a warm pool.
async fn phase_plain_agent(
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
async fn phase_pool_agent(args: &Args, sizes: Sizes, row: &mut Row) -> anyhow::Result<()> {
    let agent = Agent::start(args, "python=2").await?;
    let r = measure_warm(&agent, sizes, row).await;
    if let Err(e) = &r {
        row.error = Some(format!("{e:#}"));
    }
    let stopped = agent.stop().await;
    r.and(stopped)
}

async fn wait_pool_full(agent: &Agent) -> anyhow::Result<Duration> {
    wait_pool(agent, 2).await
}

/// Waits (untimed) until the python pool holds `n` idle sandboxes and no
/// session or teardown is left.
async fn wait_pool(agent: &Agent, n: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    loop {
        let h = agent.client.health().await?;
        // Full pool and no teardown still running in the background.
        if h.warm_pool.get("python") == Some(&n)
            && h.sessions == 0
            && agent.sandbox_ids().len() == n
        {
            return Ok(t.elapsed());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the warm pool did not refill in 60 s: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
async fn kernel_direct_steps(args: &Args, sizes: Sizes) -> anyhow::Result<Series> {
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

// ---------------------------------------------------------------------------
// Machine information

fn command_output(program: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Some(text.trim().to_owned())
}

fn machine_info(args: &Args) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")?
            .split_once(':')
            .map(|(_, v)| v.trim().to_owned())
    });
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total_kib = meminfo.lines().find_map(|l| {
        l.strip_prefix("MemTotal:")?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()
    });
    json!({
        "nproc": std::thread::available_parallelism().map(usize::from).ok(),
        "cpuModel": cpu_model,
        "memTotalMiB": mem_total_kib.map(mib),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned()),
        "loadavg": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_owned()),
        "runscVersion": command_output(&args.runsc, &["--version"]),
        "python": command_output(&args.python, &["--version"]),
        "isolation": args.isolation,
        "runscPlatform": "ptrace (agent default)",
        "cgroup": if Path::new("/sys/fs/cgroup/memory").is_dir() { "v1 (memory hierarchy present)" } else { "v2" },
    })
}

// ---------------------------------------------------------------------------
// Report

fn fmt_value(v: f64, unit: &str) -> String {
    if v.is_nan() {
        return "-".into();
    }
    match unit {
        "ms" if v < 10.0 => format!("{v:.3} ms"),
        "ms" => format!("{v:.1} ms"),
        _ => format!("{v:.1} {unit}"),
    }
}

fn print_series(s: &Series) {
    let st = &s.stats;
    println!(
        "  {:<34} n={:<5} mean={:<12} p50={:<12} p95={:<12} p99={:<12}",
        s.name,
        st.count,
        fmt_value(st.mean, s.unit),
        fmt_value(st.p50, s.unit),
        fmt_value(st.p95, s.unit),
        fmt_value(st.p99, s.unit),
    );
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "{:<32} {:>11} {:>11} {:>11}  {:<22} {:<6} {:>14} {:>9}",
        "measurement", "p50", "p95", "p99", "target", "result", "baseline p50", "ratio"
    );
    println!("{}", "-".repeat(125));
    for r in rows {
        let target = r
            .targets
            .iter()
            .map(|t| format!("{:?}<={}", t.stat, t.max).to_lowercase() + t.unit)
            .collect::<Vec<_>>()
            .join(", ");
        let Some(s) = &r.series else {
            println!(
                "{:<32} {:>11} {:>11} {:>11}  {:<22} {:<6}",
                r.title, "-", "-", "-", target, "ERROR"
            );
            continue;
        };
        let st = &s.stats;
        let verdict = if r.error.is_some() {
            "ERROR"
        } else if r.pass {
            "pass"
        } else {
            "FAIL"
        };
        println!(
            "{:<32} {:>11} {:>11} {:>11}  {:<22} {:<6} {:>14} {:>9}",
            r.title,
            fmt_value(st.p50, s.unit),
            fmt_value(st.p95, s.unit),
            fmt_value(st.p99, s.unit),
            target,
            verdict,
            r.baseline
                .as_ref()
                .map_or("-".into(), |b| fmt_value(b.stats.p50, b.unit)),
            r.ratio_p50.map_or("-".into(), |x| format!("{x:.2}x")),
        );
    }
    println!();
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
        "control plane in front of it (SQLite, then PostgreSQL): steps, jobs, sustained jobs ..."
    );
    let mut cp_rows = controlplane::CpRows {
        step: Row::new(
            "cpStep",
            "step through control plane",
            &[(Stat::P50, 2.0, "ms"), (Stat::P95, 5.0, "ms")],
        ),
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
        cp_rows.step,
        cp_rows.job,
        cp_rows.throughput_sqlite,
        cp_rows.throughput_postgres,
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

struct Baselines {
    spawn: Series,
    repl_step: Series,
    driver_step: Series,
    repl_pss: Series,
    driver_pss: Series,
}

fn bare_baselines(python: &Path, sizes: Sizes) -> anyhow::Result<Baselines> {
    for _ in 0..sizes.warmup_creates {
        bare_spawn_once(python)?;
    }
    let spawns = (0..sizes.cold_n)
        .map(|_| bare_spawn_once(python))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let mut repl = BareRepl::start(python)?;
    let repl_steps = time_steps(sizes.steps, sizes.warmup_steps, |_| {
        let answer = repl.eval("1+1")?;
        ensure!(answer == "2\n", "bare REPL answered {answer:?}");
        Ok(())
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let repl_pss = proc_mem(repl.child.0.id())?;

    let mut driver = BareDriver::start(python)?;
    let driver_steps = time_steps(sizes.steps, sizes.warmup_steps, |_| {
        let status = driver.eval("1+1")?;
        ensure!(
            serde_json::from_str::<Value>(&status)?["result"] == json!(2),
            "bare driver answered {status}"
        );
        Ok(())
    })?;
    std::thread::sleep(Duration::from_secs(2));
    let driver_pss = proc_mem(driver.child.0.id())?;

    Ok(Baselines {
        spawn: Series::ms(
            "bare python3 spawn",
            "spawn `python3 -E -s -S -c 'print(1)'` and read its one line over a pipe (same N)",
            &spawns,
        ),
        repl_step: Series::ms(
            "bare python3 REPL over pipes",
            "write `1+1\\n` to a persistent bare python3 running a tiny read-eval-print loop, read `2\\n`",
            &repl_steps,
        ),
        driver_step: Series::ms(
            "bare agent driver over pipes",
            "the agent's Python driver as a bare process: JSON exec request, marks on stderr and stdout",
            &driver_steps,
        ),
        repl_pss: Series::new(
            "bare idle python3 PSS",
            "PSS of the idle bare python3 REPL process after the step series",
            "MiB",
            vec![mib(repl_pss.pss_kib)],
        ),
        driver_pss: Series::new(
            "bare idle agent driver PSS",
            "PSS of the agent's Python driver as a bare idle process (imports ast, asyncio, json, ...)",
            "MiB",
            vec![mib(driver_pss.pss_kib)],
        ),
    })
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
