//! Kernels: one persistent interpreter per session, driven over its stdio.
//!
//! Protocol. The agent writes one request to the driver's stdin (a JSON line
//! for Python and Node; a header line and an escaped code line for Bash). The
//! code's output flows on the interpreter's real stdout and stderr as it is
//! produced, so subprocess output is captured and the streams stay apart.
//! When the request is done the driver writes `MARK\n` on stderr, then
//! `MARK{json status}\n` on stdout, where `MARK = "\x1e\x1eSA:<nonce>:"` and
//! the nonce is fresh per request. The agent splits each stream at its mark.
//! Everything the driver says is untrusted (code in the sandbox can forge
//! it): sizes are capped and a malformed status is an error, never a panic.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use shared::agent::{EffectiveLimits, Runtime, StepError, StepMode, StepStatus};
use shared::secrets::SecretEnv;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::isolation::{LaunchError, Launcher, Sandbox, SandboxSpec};

/// Flags of every sandboxed Python: no `PYTHON*` environment hooks, no user
/// site, no `site` module (the host's .pth files must not run in a sandbox).
pub const PYTHON_FLAGS: [&str; 3] = ["-E", "-s", "-S"];

/// The Python driver, passed inline with `python3 -c`.
pub const PYTHON_DRIVER: &str = include_str!("drivers/python_driver.py");
/// The Node.js driver, passed inline with `node -e`.
pub const NODE_DRIVER: &str = include_str!("drivers/node_driver.js");
/// The Bash driver, passed inline with `bash -c`.
pub const BASH_DRIVER: &str = include_str!("drivers/bash_driver.sh");

/// The interpreter binaries (`SESSION_AGENT_PYTHON`, `_NODE`, `_BASH`), all
/// under `/usr` (the only host tree a sandbox sees).
#[derive(Debug, Clone)]
pub struct Interpreters {
    pub python: PathBuf,
    pub node: PathBuf,
    pub bash: PathBuf,
}

impl Interpreters {
    /// The command line of a runtime's kernel: the interpreter, its flags and
    /// the driver passed inline. The launcher runs it as given
    /// ([`SandboxSpec::argv`]).
    pub fn argv(&self, runtime: Runtime, limits: &EffectiveLimits) -> Vec<String> {
        match runtime {
            Runtime::Python => {
                let mut argv = vec![self.python.display().to_string()];
                argv.extend(PYTHON_FLAGS.map(String::from));
                argv.extend(["-c".into(), PYTHON_DRIVER.into()]);
                argv
            }
            Runtime::Node => vec![
                self.node.display().to_string(),
                // Leave room for the runtime's own memory outside the V8 heap.
                format!(
                    "--max-old-space-size={}",
                    (limits.memory_mb * 3 / 4).max(16)
                ),
                "-e".into(),
                NODE_DRIVER.into(),
            ],
            Runtime::Bash => vec![
                self.bash.display().to_string(),
                "--norc".into(),
                "--noprofile".into(),
                "-c".into(),
                BASH_DRIVER.into(),
            ],
        }
    }
}

/// Bytes of the status line allowed beyond the output cap (result JSON).
const STATUS_OVERHEAD: usize = 64 * 1024;

/// Output produced while a step runs, for streaming.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    Stdout(String),
    Stderr(String),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ExecRequest<'a> {
    pub code: &'a str,
    pub mode: StepMode,
    pub event: Option<&'a Value>,
    pub timeout: Duration,
    pub max_output: usize,
}

/// How a step ended, before the session wraps it into a `StepResult`.
#[derive(Debug, Clone)]
pub struct ExecOutcome {
    pub status: StepStatus,
    pub stdout: String,
    pub stderr: String,
    pub result: Option<Value>,
    pub error: Option<StepError>,
    pub truncated: bool,
    /// The interpreter is gone or unusable and must be replaced.
    pub kernel_dead: bool,
}

/// Why a kernel could not be started or configured.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("the interpreter did not become ready: {0}")]
    NotReady(String),
}

/// A live interpreter in its sandbox.
pub struct Kernel {
    pub runtime: Runtime,
    sandbox: Sandbox,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
    stderr: tokio::process::ChildStderr,
    /// Output that arrived after the previous request's mark.
    carry_out: Vec<u8>,
    carry_err: Vec<u8>,
    interrupt_grace: Duration,
    /// Read buffers, allocated once per kernel rather than per step.
    obuf: Box<[u8]>,
    ebuf: Box<[u8]>,
}

impl std::fmt::Debug for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kernel")
            .field("runtime", &self.runtime)
            .field("sandbox", &self.sandbox.id)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DriverStatus {
    #[serde(default)]
    status: String,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<StepError>,
    #[serde(default)]
    exit_code: Option<i32>,
}

/// The raw end of one request.
struct RawOutcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status_line: Option<Vec<u8>>,
    status_overflow: bool,
    truncated: bool,
    interrupted: bool,
    /// No mark arrived in time (after the interrupt, for steps).
    gave_up: bool,
    /// The session ended while the step ran.
    cancelled: bool,
    /// The interpreter's stdout or stderr closed.
    exited: Option<crate::isolation::ExitInfo>,
    eof: bool,
}

impl Kernel {
    /// Starts a sandbox with the runtime's driver and waits until the
    /// interpreter answers.
    pub async fn start(
        launcher: &Launcher,
        spec: &SandboxSpec,
        ready_timeout: Duration,
        interrupt_grace: Duration,
    ) -> Result<Kernel, KernelError> {
        let mut sandbox = launcher.start(spec).await?;
        let Some((stdin, stdout, stderr)) = sandbox.take_stdio() else {
            sandbox.destroy().await;
            return Err(KernelError::NotReady("sandbox stdio unavailable".into()));
        };
        let mut kernel = Kernel {
            runtime: spec.runtime,
            sandbox,
            stdin,
            stdout,
            stderr,
            carry_out: Vec::new(),
            carry_err: Vec::new(),
            interrupt_grace,
            obuf: vec![0u8; 64 * 1024].into_boxed_slice(),
            ebuf: vec![0u8; 64 * 1024].into_boxed_slice(),
        };
        match kernel
            .set_env(&BTreeMap::new(), &SecretEnv::new(), ready_timeout)
            .await
        {
            Ok(()) => Ok(kernel),
            Err(e) => {
                kernel.destroy().await;
                Err(e)
            }
        }
    }

    /// The sandbox id (for logs).
    pub fn sandbox_id(&self) -> &str {
        &self.sandbox.id
    }

    /// Sets environment variables (and secrets) in the interpreter: over
    /// its stdin, so a value is never in a command line, a file or the
    /// sandbox's initial environment (`/proc/<pid>/environ`). Also the
    /// readiness probe: an empty map round-trips through the driver.
    pub async fn set_env(
        &mut self,
        env: &BTreeMap<String, String>,
        secrets: &SecretEnv,
        timeout: Duration,
    ) -> Result<(), KernelError> {
        let nonce = new_nonce();
        let all: BTreeMap<&str, &str> = env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(secrets.iter().map(|(k, v)| (k.as_str(), v.expose())))
            .collect();
        // The request holds secret values: wiped once written.
        let payload = Zeroizing::new(match self.runtime {
            Runtime::Python | Runtime::Node => {
                let mut line = serde_json::to_vec(&EnvRequest {
                    op: "env",
                    nonce: &nonce,
                    env: &all,
                })
                .unwrap_or_default();
                line.push(b'\n');
                line
            }
            Runtime::Bash => {
                let code = Zeroizing::new(
                    all.iter()
                        .map(|(k, v)| format!("export {k}='{}'\n", v.replace('\'', "'\\''")))
                        .collect::<String>(),
                );
                bash_request(&nonce, &code)
            }
        });
        let raw = self
            .run_request(&payload, &nonce, timeout, 64 * 1024, None, None)
            .await;
        if raw.status_line.is_some() && !raw.gave_up {
            return Ok(());
        }
        let detail = String::from_utf8_lossy(&raw.stderr[..raw.stderr.len().min(2048)])
            .trim()
            .to_owned();
        Err(KernelError::NotReady(if raw.eof {
            format!("the interpreter exited during start-up: {detail}")
        } else {
            format!("no answer within {} ms {detail}", timeout.as_millis())
        }))
    }

    /// Runs one step.
    pub async fn execute(
        &mut self,
        req: &ExecRequest<'_>,
        sink: Option<&mpsc::UnboundedSender<OutputEvent>>,
        cancel: &CancellationToken,
    ) -> ExecOutcome {
        let nonce = new_nonce();
        let payload = match self.runtime {
            Runtime::Python | Runtime::Node => json_line(&json!({
                "op": "exec",
                "nonce": nonce,
                "code": req.code,
                "mode": match req.mode { StepMode::Eval => "eval", StepMode::Handler => "handler" },
                "event": req.event,
            })),
            Runtime::Bash => bash_request(&nonce, req.code),
        };
        let raw = self
            .run_request(
                &payload,
                &nonce,
                req.timeout,
                req.max_output,
                sink,
                Some(cancel),
            )
            .await;
        self.outcome(raw, req)
    }

    fn outcome(&self, raw: RawOutcome, req: &ExecRequest<'_>) -> ExecOutcome {
        let stdout = lossy(&raw.stdout, raw.truncated);
        let stderr = lossy(&raw.stderr, raw.truncated);
        let timeout_ms = req.timeout.as_millis();
        let mut out = ExecOutcome {
            status: StepStatus::Ok,
            stdout,
            stderr,
            result: None,
            error: None,
            truncated: raw.truncated,
            kernel_dead: false,
        };
        if raw.cancelled {
            out.status = StepStatus::Killed;
            out.kernel_dead = true;
            out.error = Some(StepError {
                kind: "SessionEnded".into(),
                message: "the session was deleted or expired while the step ran".into(),
                traceback: String::new(),
            });
            return out;
        }
        if raw.gave_up {
            out.status = StepStatus::Timeout;
            out.kernel_dead = true;
            out.error = Some(StepError {
                kind: "Timeout".into(),
                message: format!(
                    "step exceeded its timeout of {timeout_ms} ms and did not stop when interrupted; \
                     the interpreter was restarted and its state was lost"
                ),
                traceback: String::new(),
            });
            return out;
        }
        if raw.eof || raw.status_line.is_none() {
            out.kernel_dead = true;
            let code = raw.exited.and_then(|e| e.code);
            let oom = raw.exited.is_some_and(|e| e.killed_by_sigkill())
                || out.stderr.contains("JavaScript heap out of memory");
            out.status = if raw.interrupted {
                StepStatus::Timeout
            } else {
                StepStatus::Killed
            };
            out.error = Some(if oom {
                StepError {
                    kind: "MemoryError".into(),
                    message: "the sandbox ran out of memory and was killed; the interpreter was restarted \
                              and its state was lost"
                        .into(),
                    traceback: String::new(),
                }
            } else {
                StepError {
                    kind: "SandboxExited".into(),
                    message: format!(
                        "the interpreter exited{}; it was restarted and its state was lost",
                        code.map(|c| format!(" with status {c}"))
                            .unwrap_or_default()
                    ),
                    traceback: String::new(),
                }
            });
            return out;
        }
        let line = raw.status_line.unwrap_or_default();
        if raw.status_overflow {
            out.status = StepStatus::Error;
            out.truncated = true;
            out.error = Some(StepError {
                kind: "ResultTooLarge".into(),
                message: format!(
                    "the result is larger than the output cap of {} bytes",
                    req.max_output
                ),
                traceback: String::new(),
            });
            return out;
        }
        let status: DriverStatus = match serde_json::from_slice(&line) {
            Ok(s) => s,
            Err(e) => {
                out.status = StepStatus::Error;
                out.error = Some(StepError {
                    kind: "KernelProtocolError".into(),
                    message: format!("the interpreter sent a malformed status: {e}"),
                    traceback: String::new(),
                });
                return out;
            }
        };
        if raw.interrupted {
            out.status = StepStatus::Timeout;
            out.error = Some(StepError {
                kind: "Timeout".into(),
                message: format!(
                    "step exceeded its timeout of {timeout_ms} ms and was interrupted"
                ),
                traceback: status.error.map(|e| e.traceback).unwrap_or_default(),
            });
            return out;
        }
        match (status.status.as_str(), status.exit_code) {
            (_, Some(code)) if code != 0 => {
                out.status = StepStatus::Error;
                out.error = Some(StepError {
                    kind: "ExitStatus".into(),
                    message: format!("exit status {code}"),
                    traceback: String::new(),
                });
            }
            ("ok", _) => out.result = status.result,
            _ => {
                out.status = StepStatus::Error;
                out.error = Some(status.error.unwrap_or_else(|| StepError {
                    kind: "Error".into(),
                    message: "the step failed".into(),
                    traceback: String::new(),
                }));
            }
        }
        out
    }

    /// Writes a request and reads both streams up to their marks.
    async fn run_request(
        &mut self,
        payload: &[u8],
        nonce: &str,
        timeout: Duration,
        max_output: usize,
        sink: Option<&mpsc::UnboundedSender<OutputEvent>>,
        // Steps are interruptible (SIGINT at the deadline) and cancellable
        // (session deleted); the readiness probe is neither.
        cancel: Option<&CancellationToken>,
    ) -> RawOutcome {
        let interruptible = cancel.is_some();
        let never = CancellationToken::new();
        let cancel = cancel.unwrap_or(&never);
        let mark = format!("\x1e\x1eSA:{nonce}:").into_bytes();
        let mut out = Scan::new(mark.clone(), max_output, true);
        let mut err = Scan::new(mark, max_output, false);
        let Kernel {
            sandbox,
            stdin,
            stdout,
            stderr,
            carry_out,
            carry_err,
            interrupt_grace,
            obuf,
            ebuf,
            ..
        } = self;
        let carried_out = std::mem::take(carry_out);
        let carried_err = std::mem::take(carry_err);
        out.feed(&carried_out, sink, OutputEvent::Stdout).await;
        err.feed(&carried_err, sink, OutputEvent::Stderr).await;

        let deadline = Instant::now() + timeout;
        let mut interrupted_at: Option<Instant> = None;
        let mut written = 0usize;
        let mut write_failed = false;
        let mut eof = false;
        let mut gave_up = false;
        let mut cancelled = false;
        while !(out.done() && err.done()) {
            let wake = match interrupted_at {
                None => deadline,
                Some(t) => t + *interrupt_grace,
            };
            tokio::select! {
                r = stdin.write(&payload[written..]), if written < payload.len() && !write_failed => match r {
                    Ok(n) if n > 0 => {
                        written += n;
                        if written == payload.len() {
                            let _ = stdin.flush().await;
                        }
                    }
                    _ => write_failed = true,
                },
                r = stdout.read(obuf), if !out.done() => match r {
                    Ok(n) if n > 0 => out.feed(&obuf[..n], sink, OutputEvent::Stdout).await,
                    _ => { eof = true; break; }
                },
                r = stderr.read(ebuf), if !err.done() => match r {
                    Ok(n) if n > 0 => err.feed(&ebuf[..n], sink, OutputEvent::Stderr).await,
                    _ => { eof = true; break; }
                },
                _ = cancel.cancelled() => {
                    cancelled = true;
                    break;
                }
                _ = tokio::time::sleep_until(wake) => {
                    if interruptible && interrupted_at.is_none() {
                        sandbox.interrupt().await;
                        interrupted_at = Some(Instant::now());
                    } else {
                        gave_up = true;
                        break;
                    }
                }
            }
        }
        let exited = if eof {
            sandbox.wait_exit(Duration::from_secs(2)).await
        } else {
            None
        };
        out.flush(sink, OutputEvent::Stdout).await;
        err.flush(sink, OutputEvent::Stderr).await;
        *carry_out = std::mem::take(&mut out.after);
        *carry_err = std::mem::take(&mut err.after);
        RawOutcome {
            truncated: out.truncated || err.truncated,
            status_line: out.status_done.then_some(out.status),
            status_overflow: out.status_overflow,
            stdout: out.captured,
            stderr: err.captured,
            interrupted: interrupted_at.is_some(),
            gave_up,
            cancelled,
            exited,
            eof,
        }
    }

    /// Kills the sandbox and removes its host state.
    pub async fn destroy(self) {
        let Kernel {
            sandbox,
            stdin,
            stdout,
            stderr,
            ..
        } = self;
        drop((stdin, stdout, stderr));
        sandbox.destroy().await;
    }
}

/// The driver's `env` request.
#[derive(serde::Serialize)]
struct EnvRequest<'a> {
    op: &'static str,
    nonce: &'a str,
    env: &'a BTreeMap<&'a str, &'a str>,
}

fn json_line(v: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(v).unwrap_or_default();
    line.push(b'\n');
    line
}

/// `nonce exec\n<escaped code>\n`: the code on one line, decoded by
/// `printf %b` (backslash, newline and control bytes escaped).
fn bash_request(nonce: &str, code: &str) -> Vec<u8> {
    let mut out = format!("{nonce} exec\n").into_bytes();
    for &b in code.as_bytes() {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\0{b:03o}").as_bytes()),
            _ => out.push(b),
        }
    }
    out.push(b'\n');
    out
}

fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// UTF-8 text of captured bytes; a character cut by truncation is dropped.
fn lossy(bytes: &[u8], truncated: bool) -> String {
    if truncated
        && let Err(e) = std::str::from_utf8(bytes)
        && e.error_len().is_none()
    {
        return String::from_utf8_lossy(&bytes[..e.valid_up_to()]).into_owned();
    }
    String::from_utf8_lossy(bytes).into_owned()
}

/// Splits one output stream at the request's mark, capturing up to the cap
/// and forwarding chunks for streaming.
struct Scan {
    mark: Vec<u8>,
    want_status: bool,
    cap: usize,
    pending: Vec<u8>,
    captured: Vec<u8>,
    truncated: bool,
    found: bool,
    status: Vec<u8>,
    status_done: bool,
    status_overflow: bool,
    utf8_carry: Vec<u8>,
    after: Vec<u8>,
}

impl Scan {
    fn new(mark: Vec<u8>, cap: usize, want_status: bool) -> Self {
        Scan {
            mark,
            want_status,
            cap,
            pending: Vec::new(),
            captured: Vec::new(),
            truncated: false,
            found: false,
            status: Vec::new(),
            status_done: false,
            status_overflow: false,
            utf8_carry: Vec::new(),
            after: Vec::new(),
        }
    }

    fn done(&self) -> bool {
        self.status_done
    }

    async fn feed(
        &mut self,
        data: &[u8],
        sink: Option<&mpsc::UnboundedSender<OutputEvent>>,
        wrap: fn(String) -> OutputEvent,
    ) {
        if data.is_empty() {
            return;
        }
        if self.found {
            self.after_mark(data);
            return;
        }
        self.pending.extend_from_slice(data);
        if let Some(i) = find(&self.pending, &self.mark) {
            let pending = std::mem::take(&mut self.pending);
            self.emit(&pending[..i], sink, wrap).await;
            self.found = true;
            self.after_mark(&pending[i + self.mark.len()..]);
        } else {
            let keep = partial_mark_suffix(&self.pending, &self.mark);
            let emit_len = self.pending.len() - keep;
            let head: Vec<u8> = self.pending.drain(..emit_len).collect();
            self.emit(&head, sink, wrap).await;
        }
    }

    /// After the mark comes the status line (JSON on stdout, empty on stderr).
    fn after_mark(&mut self, data: &[u8]) {
        if self.status_done {
            self.after.extend_from_slice(data);
            return;
        }
        let (line, rest) = match data.iter().position(|&b| b == b'\n') {
            Some(j) => (&data[..j], Some(&data[j + 1..])),
            None => (data, None),
        };
        let limit = if self.want_status {
            self.cap + STATUS_OVERHEAD
        } else {
            0
        };
        if self.status.len() + line.len() > limit {
            self.status_overflow = true;
        } else {
            self.status.extend_from_slice(line);
        }
        if let Some(rest) = rest {
            self.status_done = true;
            self.after.extend_from_slice(rest);
        }
    }

    async fn emit(
        &mut self,
        bytes: &[u8],
        sink: Option<&mpsc::UnboundedSender<OutputEvent>>,
        wrap: fn(String) -> OutputEvent,
    ) {
        if bytes.is_empty() {
            return;
        }
        let room = self.cap.saturating_sub(self.captured.len());
        let take = room.min(bytes.len());
        if take < bytes.len() {
            self.truncated = true;
        }
        let kept = &bytes[..take];
        self.captured.extend_from_slice(kept);
        if let (Some(sink), false) = (sink, kept.is_empty()) {
            self.utf8_carry.extend_from_slice(kept);
            let valid = match std::str::from_utf8(&self.utf8_carry) {
                Ok(_) => self.utf8_carry.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => self.utf8_carry.len(),
            };
            if valid > 0 {
                let chunk: Vec<u8> = self.utf8_carry.drain(..valid).collect();
                let _ = sink.send(wrap(String::from_utf8_lossy(&chunk).into_owned()));
            }
        }
    }

    /// At the end of a request: output held back as a possible mark prefix
    /// (when the mark never came) and any incomplete character.
    async fn flush(
        &mut self,
        sink: Option<&mpsc::UnboundedSender<OutputEvent>>,
        wrap: fn(String) -> OutputEvent,
    ) {
        if !self.found && !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            self.emit(&pending, sink, wrap).await;
        }
        if let (Some(sink), false) = (sink, self.utf8_carry.is_empty()) {
            let chunk = std::mem::take(&mut self.utf8_carry);
            let _ = sink.send(wrap(String::from_utf8_lossy(&chunk).into_owned()));
        }
    }
}

/// Length of the longest suffix of `data` that is a proper prefix of `mark`:
/// the bytes to hold back because the mark may continue in the next read.
fn partial_mark_suffix(data: &[u8], mark: &[u8]) -> usize {
    let longest = data.len().min(mark.len().saturating_sub(1));
    (1..=longest)
        .rev()
        .find(|&k| data.ends_with(&mark[..k]))
        .unwrap_or(0)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn scan_all(chunks: &[&[u8]], cap: usize, want_status: bool) -> (Scan, Vec<OutputEvent>) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut s = Scan::new(b"\x1e\x1eSA:n:".to_vec(), cap, want_status);
        for c in chunks {
            s.feed(c, Some(&tx), OutputEvent::Stdout).await;
        }
        s.flush(Some(&tx), OutputEvent::Stdout).await;
        drop(tx);
        let mut ev = Vec::new();
        while let Some(e) = rx.recv().await {
            ev.push(e);
        }
        (s, ev)
    }

    #[tokio::test]
    async fn mark_split_across_chunks() {
        let (s, ev) = scan_all(
            &[b"hello \x1e", b"\x1eSA:", b"n:{\"status\":\"ok\"}\nlater"],
            100,
            true,
        )
        .await;
        assert_eq!(s.captured, b"hello ");
        assert!(s.status_done);
        assert_eq!(s.status, b"{\"status\":\"ok\"}");
        assert_eq!(s.after, b"later");
        let text: String = ev
            .iter()
            .map(|e| match e {
                OutputEvent::Stdout(s) | OutputEvent::Stderr(s) => s.as_str(),
            })
            .collect();
        assert_eq!(text, "hello ");
    }

    #[tokio::test]
    async fn output_is_forwarded_at_once_unless_it_may_start_a_mark() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut s = Scan::new(b"\x1e\x1eSA:n:".to_vec(), 100, true);
        s.feed(b"0\n", Some(&tx), OutputEvent::Stdout).await;
        assert_eq!(rx.try_recv().unwrap(), OutputEvent::Stdout("0\n".into()));
        s.feed(b"1\x1e", Some(&tx), OutputEvent::Stdout).await;
        assert_eq!(rx.try_recv().unwrap(), OutputEvent::Stdout("1".into()));
        assert!(rx.try_recv().is_err(), "a possible mark start is held back");
        assert_eq!(partial_mark_suffix(b"ab\x1e\x1eS", b"\x1e\x1eSA:"), 3);
        assert_eq!(partial_mark_suffix(b"abc", b"\x1e\x1eSA:"), 0);
    }

    #[tokio::test]
    async fn cap_truncates_and_keeps_scanning() {
        let (s, _) = scan_all(&[&[b'x'; 50], &[b'y'; 50], b"\x1e\x1eSA:n:{}\n"], 10, true).await;
        assert_eq!(s.captured.len(), 10);
        assert!(s.truncated);
        assert!(s.status_done);
    }

    #[tokio::test]
    async fn utf8_split_is_not_mangled_in_stream() {
        let snow = "☃".as_bytes();
        let (_, ev) = scan_all(&[&snow[..1], &snow[1..], b"\x1e\x1eSA:n:{}\n"], 100, true).await;
        let text: String = ev
            .iter()
            .map(|e| match e {
                OutputEvent::Stdout(s) | OutputEvent::Stderr(s) => s.as_str(),
            })
            .collect();
        assert_eq!(text, "☃");
    }

    #[tokio::test]
    async fn stderr_mark_consumes_its_newline() {
        let (s, _) = scan_all(&[b"warn\n\x1e\x1eSA:n:\nnext"], 100, false).await;
        assert_eq!(s.captured, b"warn\n");
        assert!(s.done());
        assert_eq!(s.after, b"next");
    }

    #[test]
    fn bash_escaping_round_trips_through_printf_b_rules() {
        let req = bash_request("n", "echo 'a\\b'\nprintf '\\t'\x01");
        let text = String::from_utf8(req).unwrap();
        assert_eq!(text, "n exec\necho 'a\\\\b'\\nprintf '\\\\t'\\0001\n");
    }

    #[test]
    fn truncated_text_drops_cut_character() {
        let bytes = "ab☃".as_bytes();
        assert_eq!(lossy(&bytes[..3], true), "ab");
        assert_eq!(lossy(b"ok", false), "ok");
    }
}
