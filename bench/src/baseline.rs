//! Bare-process baselines: the same work without the agent, measured in
//! the same run (blocking I/O on a blocking thread).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, ensure};
use serde_json::{Value, json};

use crate::Sizes;
use crate::memory::{mib, proc_mem};
use crate::report::Series;

/// A child that is killed and reaped when dropped.
struct Reaped(pub(crate) Child);

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
    pub(crate) stdin: ChildStdin,
    pub(crate) stdout: BufReader<ChildStdout>,
    child: Reaped,
}

impl BareRepl {
    pub(crate) fn start(python: &Path) -> anyhow::Result<BareRepl> {
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
    pub(crate) stdin: ChildStdin,
    pub(crate) stdout: BufReader<ChildStdout>,
    pub(crate) stderr: BufReader<ChildStderr>,
    child: Reaped,
}

impl BareDriver {
    pub(crate) fn start(python: &Path) -> anyhow::Result<BareDriver> {
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
    pub(crate) fn request(&mut self, req: &Value) -> anyhow::Result<String> {
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

pub(crate) struct Baselines {
    pub(crate) spawn: Series,
    pub(crate) repl_step: Series,
    pub(crate) driver_step: Series,
    pub(crate) repl_pss: Series,
    pub(crate) driver_pss: Series,
}

pub(crate) fn bare_baselines(python: &Path, sizes: Sizes) -> anyhow::Result<Baselines> {
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
