//! The isolation launcher: the only module of the workspace that spawns
//! processes. It starts one interpreter per sandbox under gVisor (`runsc run`
//! on a generated OCI bundle), bubblewrap, directly in a runtime pod that is
//! itself the sandbox (`pod`), or with nothing (development only), and hands
//! back its stdio pipes.
#![allow(clippy::disallowed_methods)]

mod bwrap;
mod cgroup;
pub mod flags;
mod gvisor;
mod rootfs;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use shared::agent::{EffectiveLimits, Runtime};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

pub use cgroup::CgroupParent;
pub use rootfs::SandboxRoot;

/// How sessions are isolated (`SESSION_ISOLATION`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IsolationKind {
    /// gVisor: `runsc run` with the ptrace platform, one sandbox per session.
    Gvisor,
    /// bubblewrap namespaces: the fallback when runsc is absent.
    Bwrap,
    /// No isolation at all: development only, refused when ENV=production.
    None,
    /// The interpreter runs directly in the agent's container, which is the
    /// sandbox: a Kubernetes pod of a gVisor RuntimeClass holding one session.
    Pod,
}

impl IsolationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IsolationKind::Gvisor => "gvisor",
            IsolationKind::Bwrap => "bwrap",
            IsolationKind::None => "none",
            IsolationKind::Pod => "pod",
        }
    }

    /// Whether the interpreter sees the agent's own filesystem, so its
    /// workspace and packages are at their host paths (`none`, `pod`).
    pub fn shares_host_paths(self) -> bool {
        matches!(self, IsolationKind::None | IsolationKind::Pod)
    }
}

/// The uid and gid every sandboxed interpreter runs as.
pub const SANDBOX_UID: u32 = 65534;

/// Where the workspace appears inside the sandbox.
pub const SANDBOX_WORKSPACE: &str = "/workspace";

/// What the launcher needs to know about the host.
#[derive(Debug, Clone)]
pub struct LauncherConfig {
    pub kind: IsolationKind,
    /// Directory for bundles, the runsc state root and the sandbox root skeleton.
    pub state_dir: PathBuf,
    pub runsc_path: PathBuf,
    pub runsc_platform: String,
    /// Extra runsc global flags (each checked against the deny list).
    pub runsc_extra_flags: Vec<String>,
    pub bwrap_path: PathBuf,
}

/// Everything about one sandbox to start.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    /// Unique among live sandboxes; becomes a container id and cgroup name.
    pub sandbox_id: String,
    /// Selects runtime-specific resource limits (rlimits); the launcher does
    /// not know how an interpreter is started.
    pub runtime: Runtime,
    /// The command run in the sandbox: `argv[0]` is an absolute path under
    /// `/usr`. Built by `kernels` (interpreter, flags and inline driver).
    pub argv: Vec<String>,
    /// The host directory mounted read-write at [`SANDBOX_WORKSPACE`].
    pub workspace: PathBuf,
    pub limits: EffectiveLimits,
    /// Installed packages, mounted read-only at [`SANDBOX_PACKAGES`].
    pub packages: Option<PathBuf>,
}

/// Where a session's packages appear inside the sandbox.
pub const SANDBOX_PACKAGES: &str = "/packages";

/// How long a gVisor sandbox gets to end by itself after its stdin closes
/// before it is killed.
const EXIT_ON_EOF_GRACE: Duration = Duration::from_millis(500);

/// Why a sandbox could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Config(String),
    #[error("could not start {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not prepare the sandbox: {0}")]
    Prepare(String),
}

/// Starts sandboxes. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Launcher {
    inner: Arc<LauncherInner>,
}

#[derive(Debug)]
struct LauncherInner {
    config: LauncherConfig,
    root: SandboxRoot,
    cgroups: CgroupParent,
    runsc_root: PathBuf,
    bundles: PathBuf,
    /// runsc's global flags, built and checked against the deny list once.
    runsc_flags: Vec<String>,
}

impl Launcher {
    /// Checks the host (binaries, flags), builds the sandbox root skeleton and
    /// reaps sandboxes a previous agent left behind.
    pub async fn new(config: LauncherConfig) -> Result<Self, LaunchError> {
        let required: Vec<(&str, &Path)> = match config.kind {
            IsolationKind::Gvisor => vec![("runsc", config.runsc_path.as_path())],
            IsolationKind::Bwrap => vec![("bwrap", config.bwrap_path.as_path())],
            IsolationKind::None => vec![],
            // The runtime image must carry them (util-linux): refuse to
            // start in one that does not, rather than fail every session.
            IsolationKind::Pod => vec![
                ("setpriv", Path::new(bwrap::SETPRIV)),
                ("prlimit", Path::new(bwrap::PRLIMIT)),
            ],
        };
        for (name, path) in required {
            if resolve_binary(path).is_none() {
                return Err(LaunchError::Config(format!(
                    "{name} not found at {} (SESSION_ISOLATION={}): install it with `make deps` \
                     (apt-get install -y {}) or choose another isolation",
                    path.display(),
                    config.kind.as_str(),
                    match name {
                        "runsc" => "runsc",
                        "bwrap" => "bubblewrap",
                        _ => "util-linux",
                    },
                )));
            }
        }
        let state = &config.state_dir;
        let runsc_root = state.join("runsc");
        let bundles = state.join("bundles");
        for dir in [state.as_path(), &runsc_root, &bundles] {
            std::fs::create_dir_all(dir)
                .map_err(|e| LaunchError::Prepare(format!("{}: {e}", dir.display())))?;
        }
        let root = SandboxRoot::prepare(&state.join("root"))
            .map_err(|e| LaunchError::Prepare(format!("sandbox root: {e}")))?;
        let cgroups = CgroupParent::discover("session-agent", state);
        let launcher = Launcher {
            inner: Arc::new(LauncherInner {
                runsc_flags: runsc_global_flags(&config, &runsc_root)?,
                config,
                root,
                cgroups,
                runsc_root,
                bundles,
            }),
        };
        launcher.reap_leftovers().await;
        Ok(launcher)
    }

    pub fn kind(&self) -> IsolationKind {
        self.inner.config.kind
    }

    /// The environment of a fresh interpreter: nothing from the agent's own.
    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("HOME".into(), SANDBOX_WORKSPACE.into()),
            ("TMPDIR".into(), "/tmp".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("PYTHONIOENCODING".into(), "utf-8".into()),
        ]
    }

    /// Starts a sandbox running `spec.argv`.
    pub async fn start(&self, spec: &SandboxSpec) -> Result<Sandbox, LaunchError> {
        let argv = &spec.argv;
        if argv.is_empty() {
            return Err(LaunchError::Config("empty sandbox command line".into()));
        }
        let mut env = self.env();
        if let Some(p) = &spec.packages {
            // The driver puts this on the import path.
            let inside = if self.kind().shares_host_paths() {
                p.display().to_string()
            } else {
                SANDBOX_PACKAGES.into()
            };
            env.push(("SANDBOX_PACKAGES".into(), inside));
        }
        if self.kind().shares_host_paths() {
            // Unisolated, the workspace is at its host path.
            for (k, v) in &mut env {
                if k == "HOME" {
                    *v = spec.workspace.display().to_string();
                }
            }
        }
        let inner = &self.inner;
        let (mut cmd, cleanup) = match inner.config.kind {
            IsolationKind::Gvisor => {
                let cgroups_path = inner.cgroups.child_path(&spec.sandbox_id);
                let bundle = gvisor::write_bundle(
                    &inner.bundles,
                    &inner.root,
                    spec,
                    argv,
                    &env,
                    &cgroups_path,
                )?;
                let mut cmd = Command::new(&inner.config.runsc_path);
                cmd.args(&inner.runsc_flags)
                    .arg("run")
                    .arg("--bundle")
                    .arg(&bundle)
                    .arg(&spec.sandbox_id);
                (cmd, Cleanup::Bundle(bundle))
            }
            IsolationKind::Bwrap => {
                let cgroup = inner.cgroups.create(&spec.sandbox_id, &spec.limits);
                let cmd = bwrap::command(
                    &inner.config.bwrap_path,
                    cgroup.as_ref(),
                    &inner.root,
                    spec,
                    argv,
                    &env,
                );
                (cmd, Cleanup::Cgroup(cgroup))
            }
            IsolationKind::None => {
                let cgroup = inner.cgroups.create(&spec.sandbox_id, &spec.limits);
                let cmd = bwrap::unisolated(cgroup.as_ref(), spec, argv, &env);
                (cmd, Cleanup::Cgroup(cgroup))
            }
            // The pod's own cgroup (its CPU and memory limits) is the
            // sandbox's: the agent creates none.
            IsolationKind::Pod => (bwrap::in_pod(spec, argv, &env), Cleanup::Cgroup(None)),
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        let mut child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            what: format!("{} sandbox", inner.config.kind.as_str()),
            source,
        })?;
        let stdio = match (child.stdin.take(), child.stdout.take(), child.stderr.take()) {
            (Some(i), Some(o), Some(e)) => Stdio3 {
                stdin: i,
                stdout: o,
                stderr: e,
            },
            _ => return Err(LaunchError::Prepare("sandbox stdio pipes missing".into())),
        };
        Ok(Sandbox {
            id: spec.sandbox_id.clone(),
            launcher: self.clone(),
            child,
            stdio: Some(stdio),
            cleanup,
        })
    }

    async fn runsc(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        let root = format!("--root={}", self.inner.runsc_root.display());
        let fut = Command::new(&self.inner.config.runsc_path)
            .arg(root)
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(Duration::from_secs(20), fut).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "runsc timed out",
            )),
        }
    }

    /// Destroys every gVisor container in the agent's runsc root, then the
    /// bundles, runsc lock files and sandbox cgroups: what a previous agent
    /// on this state directory left behind when it was killed.
    async fn reap_leftovers(&self) {
        if self.inner.config.kind == IsolationKind::Gvisor
            && let Ok(out) = self.runsc(&["list", "-quiet"]).await
        {
            for id in String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
            {
                tracing::warn!(
                    sandbox = id,
                    "destroying a sandbox left by a previous agent"
                );
                let _ = self.runsc(&["delete", "-force", id]).await;
            }
            self.remove_stale_runsc_locks();
        }
        let _ = std::fs::remove_dir_all(&self.inner.bundles);
        let _ = std::fs::create_dir_all(&self.inner.bundles);
        let swept = self.inner.cgroups.sweep();
        if swept > 0 {
            tracing::warn!(
                cgroups = swept,
                "removed sandbox cgroups left by a previous agent"
            );
        }
    }

    /// runsc keeps `<id>_sandbox:<id>.lock` beside each container's state
    /// file and leaves it when its launcher is killed; a lock without a
    /// state file belongs to no container.
    fn remove_stale_runsc_locks(&self) {
        let Ok(entries) = std::fs::read_dir(&self.inner.runsc_root) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|x| x == "lock")
                && !path.with_extension("state").exists()
            {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Removes what sandboxes left on the host beyond their own teardown
    /// (called once at shutdown, after every sandbox is destroyed).
    pub fn cleanup_host_state(&self) {
        if self.inner.config.kind == IsolationKind::Gvisor {
            self.remove_stale_runsc_locks();
        }
        self.inner.cgroups.remove_parent();
    }
}

enum Cleanup {
    Bundle(PathBuf),
    Cgroup(Option<cgroup::Cgroup>),
}

struct Stdio3 {
    stdin: ChildStdin,
    stdout: ChildStdout,
    stderr: ChildStderr,
}

/// How a sandbox ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code of the launcher process (128+signal when killed by one).
    pub code: Option<i32>,
}

impl ExitInfo {
    /// A SIGKILL nobody in the agent sent: the memory limit's OOM kill.
    pub fn killed_by_sigkill(&self) -> bool {
        self.code == Some(137)
    }
}

/// A running sandbox. Dropping it kills the launcher process; call
/// [`Sandbox::destroy`] for an orderly teardown.
pub struct Sandbox {
    pub id: String,
    launcher: Launcher,
    child: Child,
    stdio: Option<Stdio3>,
    cleanup: Cleanup,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Takes the interpreter's stdin, stdout and stderr (once).
    pub fn take_stdio(&mut self) -> Option<(ChildStdin, ChildStdout, ChildStderr)> {
        self.stdio.take().map(|s| (s.stdin, s.stdout, s.stderr))
    }

    /// Sends SIGINT to every process of the sandbox (Ctrl-C semantics).
    pub async fn interrupt(&self) {
        match self.launcher.kind() {
            IsolationKind::Gvisor => {
                if let Err(e) = self
                    .launcher
                    .runsc(&["kill", "-all", &self.id, "INT"])
                    .await
                {
                    tracing::warn!(sandbox = %self.id, error = %e, "runsc kill INT failed");
                }
            }
            IsolationKind::Bwrap | IsolationKind::None | IsolationKind::Pod => {
                if let Some(pid) = self.child.id() {
                    signal_tree(
                        pid,
                        rustix::process::Signal::INT,
                        self.launcher.kind() == IsolationKind::Bwrap,
                    );
                }
            }
        }
    }

    /// Non-blocking check whether the sandbox has exited.
    pub fn try_exit(&mut self) -> Option<ExitInfo> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(exit_info(status)),
            _ => None,
        }
    }

    /// Waits up to `limit` for the sandbox to exit on its own.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<ExitInfo> {
        match tokio::time::timeout(limit, self.child.wait()).await {
            Ok(Ok(status)) => Some(exit_info(status)),
            _ => None,
        }
    }

    /// Kills every process of the sandbox and removes its host state.
    /// (`runsc kill KILL` and waiting for `runsc run` to exit takes ~1.5 s;
    /// `runsc delete --force` after a SIGINT was seen to stall 5 s, so it is
    /// only the fallback.)
    pub async fn destroy(mut self) {
        drop(self.stdio.take());
        // Every driver exits on stdin EOF, and a sandbox whose init exits
        // ends by itself: an idle gVisor sandbox is gone without spawning
        // `runsc kill` (a Go process per teardown, the larger part of its
        // CPU cost). A busy one is killed after the grace.
        if self.launcher.kind() == IsolationKind::Gvisor {
            let _ = tokio::time::timeout(EXIT_ON_EOF_GRACE, self.child.wait()).await;
        }
        if self.try_exit().is_none() {
            match self.launcher.kind() {
                IsolationKind::Gvisor => {
                    if let Err(e) = self.launcher.runsc(&["kill", &self.id, "KILL"]).await {
                        tracing::warn!(sandbox = %self.id, error = %e, "runsc kill failed");
                    }
                }
                IsolationKind::Bwrap | IsolationKind::None | IsolationKind::Pod => {
                    if let Some(pid) = self.child.id() {
                        signal_tree(pid, rustix::process::Signal::KILL, false);
                    }
                }
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(sandbox = %self.id, "sandbox did not exit after SIGKILL; forcing its deletion");
            if self.launcher.kind() == IsolationKind::Gvisor {
                let _ = self.launcher.runsc(&["delete", "-force", &self.id]).await;
            }
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        match &self.cleanup {
            Cleanup::Bundle(dir) => {
                let _ = std::fs::remove_dir_all(dir);
            }
            Cleanup::Cgroup(Some(cg)) => cg.remove().await,
            Cleanup::Cgroup(None) => {}
        }
    }
}

fn exit_info(status: std::process::ExitStatus) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    ExitInfo {
        code: status.code().or_else(|| status.signal().map(|s| 128 + s)),
    }
}

/// Signals `pid` and all its descendants (optionally sparing the bwrap
/// supervisor processes, which would tear the sandbox down on SIGINT).
fn signal_tree(pid: u32, signal: rustix::process::Signal, spare_bwrap: bool) {
    let mut pids = vec![pid];
    let mut i = 0;
    while i < pids.len() && pids.len() < 4096 {
        let p = pids[i];
        let path = format!("/proc/{p}/task/{p}/children");
        if let Ok(text) = std::fs::read_to_string(path) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|s| s.parse::<u32>().ok()),
            );
        }
        i += 1;
    }
    for p in pids {
        if spare_bwrap && is_bwrap(p) {
            continue;
        }
        let Ok(raw) = i32::try_from(p) else { continue };
        if let Some(pid) = rustix::process::Pid::from_raw(raw) {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }
}

fn is_bwrap(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "bwrap")
}

/// Finds an executable: an absolute path as is, a bare name on PATH.
pub fn resolve_binary(path: &Path) -> Option<PathBuf> {
    if path.is_absolute() {
        return path.is_file().then(|| path.to_path_buf());
    }
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(path))
        .find(|p| p.is_file())
}

/// `--root`, `--platform`, `--network=none` and the configured extras, each
/// checked against the deny list (so is the fixed part: a platform value
/// cannot smuggle a flag in).
fn runsc_global_flags(c: &LauncherConfig, runsc_root: &Path) -> Result<Vec<String>, LaunchError> {
    let mut flags = vec![
        format!("--root={}", runsc_root.display()),
        format!("--platform={}", c.runsc_platform),
        "--network=none".to_owned(),
    ];
    flags.extend(c.runsc_extra_flags.iter().cloned());
    for f in &flags {
        flags::check_runsc_flag(f).map_err(|e| LaunchError::Config(e.to_string()))?;
    }
    Ok(flags)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// `isolation` is the bottom layer of the agent: it runs the argv it is
    /// handed ([`super::SandboxSpec::argv`]) and imports no other module of
    /// the crate (`kernels` once passed its drivers and flags this way; the
    /// two imported each other). Reads every source file of the module, so a
    /// new file is covered too.
    #[test]
    fn isolation_imports_no_other_module_of_the_crate() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        // The crate's other top-level modules: `src/x.rs` and `src/x/`.
        let mut siblings: Vec<String> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter_map(|p| {
                let stem = p.file_stem()?.to_str()?.to_owned();
                (p.is_dir() || p.extension().is_some_and(|x| x == "rs")).then_some(stem)
            })
            .filter(|m| !["isolation", "lib", "main"].contains(&m.as_str()))
            .collect();
        siblings.sort();
        siblings.dedup();
        assert!(siblings.contains(&"kernels".to_owned()), "{siblings:?}");
        // Spelt in pieces so this test does not match itself.
        let (krate, sup, sep) = ("crate", "super", "::");
        let mut forbidden = vec![format!("{sup}{sep}{sup}"), format!("{krate}{sep}{{")];
        for m in &siblings {
            forbidden.push(format!("{krate}{sep}{m}"));
            forbidden.push(format!("{sup}{sep}{m}"));
        }
        let mut files = vec![src.join("isolation")];
        let mut checked = 0;
        let mut found = Vec::new();
        while let Some(p) = files.pop() {
            if p.is_dir() {
                files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            checked += 1;
            let text = std::fs::read_to_string(&p).unwrap();
            for (n, line) in text.lines().enumerate() {
                for f in &forbidden {
                    if line.contains(f.as_str()) {
                        found.push(format!("{}:{}: {f}", p.display(), n + 1));
                    }
                }
            }
        }
        assert!(checked >= 6, "only {checked} files under src/isolation");
        assert!(
            found.is_empty(),
            "isolation must not import other modules of the agent (hand it data instead, \
             e.g. SandboxSpec::argv):\n{}",
            found.join("\n")
        );
    }
}
