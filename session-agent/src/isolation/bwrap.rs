//! bubblewrap sandboxes (the fallback when runsc is absent), the process
//! chain shared with `none`, and the direct start of `pod` ([`in_pod`]):
//! `sh` (joins the sandbox cgroup, then execs) -> `setpriv` (uid 65534, no
//! groups, no new privileges) -> [`bwrap` ... -- ] `prlimit` (rlimits) -> the
//! interpreter. bwrap thus runs unprivileged, so its user namespace maps to
//! uid 65534, never to host root (SECURITY.md, hardening item 9), and its
//! environment is cleared.
//!
//! Under bwrap the rlimits are set inside the sandbox, after bwrap made its
//! user namespace: RLIMIT_NPROC then counts the processes of that namespace
//! only (per-namespace ucounts, Linux 5.14+). Set before bwrap, it counted
//! every uid-65534 process on the host, so a few concurrent sandboxes with a
//! small `maxProcesses` made the next bwrap fail with EAGAIN.

use std::ffi::OsString;
use std::path::Path;

use shared::agent::{EffectiveLimits, Runtime};
use tokio::process::Command;

use super::{
    SANDBOX_PACKAGES, SANDBOX_UID, SANDBOX_WORKSPACE, SandboxRoot, SandboxSpec, cgroup::Cgroup,
};

/// util-linux's `setpriv` and `prlimit`, at their Debian paths (`pod` calls
/// them by absolute path: a runtime image must carry them).
pub(super) const SETPRIV: &str = "/usr/bin/setpriv";
pub(super) const PRLIMIT: &str = "/usr/bin/prlimit";

/// Joins the cgroups named before `--` (so no process of the sandbox ever
/// runs outside them), then execs the rest.
const JOIN_CGROUP_THEN_EXEC: &str =
    r#"while [ "$1" != "--" ]; do echo $$ > "$1" || exit 126; shift; done; shift; exec "$@""#;

/// The unprivileged prefix: uid and gid 65534, no groups, no new privileges.
fn drop_privileges() -> Vec<OsString> {
    vec![
        "setpriv".into(),
        format!("--reuid={SANDBOX_UID}").into(),
        format!("--regid={SANDBOX_UID}").into(),
        "--clear-groups".into(),
        "--no-new-privs".into(),
        "--".into(),
    ]
}

/// The rlimits prefix: `prlimit ... --`, which then execs the interpreter.
fn limit(limits: &EffectiveLimits, runtime: Runtime) -> Vec<OsString> {
    let mut v: Vec<OsString> = vec![
        PRLIMIT.into(),
        format!("--nproc={}", limits.max_processes).into(),
        format!("--fsize={}", limits.disk_mb * 1024 * 1024).into(),
        "--nofile=1024".into(),
        "--core=0".into(),
    ];
    if runtime == Runtime::Python {
        v.push(format!("--as={}", limits.memory_mb * 1024 * 1024).into());
    }
    v.push("--".into());
    v
}

/// The command that runs `inner` inside `cgroup` (when there is one).
fn in_cgroup(cgroup: Option<&Cgroup>, inner: Vec<OsString>) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c").arg(JOIN_CGROUP_THEN_EXEC).arg("sh");
    if let Some(cg) = cgroup {
        cmd.args(cg.procs_files());
    }
    cmd.arg("--").args(inner);
    cmd.env_clear();
    cmd
}

/// `none`: the interpreter with rlimits and uid 65534, nothing else.
pub fn unisolated(
    cgroup: Option<&Cgroup>,
    spec: &SandboxSpec,
    argv: &[String],
    env: &[(String, String)],
) -> Command {
    let mut inner = drop_privileges();
    inner.extend(limit(&spec.limits, spec.runtime));
    inner.extend(argv.iter().map(OsString::from));
    let mut cmd = in_cgroup(cgroup, inner);
    cmd.envs(env.iter().cloned()).current_dir(&spec.workspace);
    cmd
}

/// `pod`: the container is the sandbox (a gVisor RuntimeClass pod), so the
/// interpreter runs directly, with the rlimits and cleared environment of
/// `none` and no new privileges. An agent started as root (a misconfigured
/// pod, or a test on a root host) still drops it to uid 65534; the pod's
/// non-root agent (65534 already) cannot change uid, and its container runs
/// without capabilities. No shell: the image needs only `setpriv` and
/// `prlimit` besides the interpreter.
pub fn in_pod(spec: &SandboxSpec, argv: &[String], env: &[(String, String)]) -> Command {
    let mut cmd = Command::new(SETPRIV);
    if rustix::process::geteuid().is_root() {
        cmd.args([
            format!("--reuid={SANDBOX_UID}"),
            format!("--regid={SANDBOX_UID}"),
            "--clear-groups".to_owned(),
        ]);
    }
    cmd.arg("--no-new-privs").arg("--");
    cmd.args(limit(&spec.limits, spec.runtime));
    cmd.args(argv);
    cmd.env_clear()
        .envs(env.iter().cloned())
        .current_dir(&spec.workspace);
    cmd
}

/// The bwrap command line of a sandbox.
pub fn command(
    bwrap: &Path,
    cgroup: Option<&Cgroup>,
    root: &SandboxRoot,
    spec: &SandboxSpec,
    argv: &[String],
    env: &[(String, String)],
) -> Command {
    let mut v = drop_privileges();
    v.push(bwrap.into());
    for a in [
        "--unshare-all",
        "--die-with-parent",
        "--cap-drop",
        "ALL",
        "--clearenv",
        "--hostname",
        "sandbox",
    ] {
        v.push(a.into());
    }
    for dir in &root.system_dirs {
        v.extend(["--ro-bind".into(), dir.into(), dir.into()]);
    }
    for (target, link) in &root.links {
        v.extend(["--symlink".into(), target.into(), link.into()]);
    }
    v.extend(["--ro-bind".into(), root.etc.clone().into(), "/etc".into()]);
    for a in [
        "--proc", "/proc", "--dev", "/dev", "--size", "67108864", "--tmpfs", "/tmp",
    ] {
        v.push(a.into());
    }
    v.extend([
        "--bind".into(),
        spec.workspace.clone().into(),
        SANDBOX_WORKSPACE.into(),
    ]);
    if let Some(p) = &spec.packages {
        v.extend([
            "--ro-bind".into(),
            p.clone().into(),
            SANDBOX_PACKAGES.into(),
        ]);
    }
    // bwrap's root is a writable tmpfs: make it read-only once everything is mounted.
    v.extend([
        "--remount-ro".into(),
        "/".into(),
        "--chdir".into(),
        SANDBOX_WORKSPACE.into(),
    ]);
    for (k, val) in env {
        v.extend(["--setenv".into(), k.into(), val.into()]);
    }
    v.push("--".into());
    v.extend(limit(&spec.limits, spec.runtime));
    v.extend(argv.iter().map(OsString::from));
    in_cgroup(cgroup, v)
}
