//! bubblewrap sandboxes (the fallback when runsc is absent) and the rlimit
//! wrapper shared with `none`. bwrap runs as uid 65534 on the host, so its
//! user namespace maps to an unprivileged uid, never to host root
//! (SECURITY.md, hardening item 9); its environment is cleared.

use std::path::Path;

use shared::agent::{EffectiveLimits, Runtime};
use tokio::process::Command;

use super::{SANDBOX_UID, SANDBOX_WORKSPACE, SandboxRoot, SandboxSpec};

/// `prlimit` with the sandbox's rlimits, run as uid 65534.
pub fn prlimit_wrapper(limits: &EffectiveLimits, runtime: Runtime) -> Command {
    let mut cmd = Command::new("prlimit");
    cmd.arg(format!("--nproc={}", limits.max_processes))
        .arg(format!("--fsize={}", limits.disk_mb * 1024 * 1024))
        .arg("--nofile=1024")
        .arg("--core=0");
    if runtime == Runtime::Python {
        cmd.arg(format!("--as={}", limits.memory_mb * 1024 * 1024));
    }
    cmd.uid(SANDBOX_UID).gid(SANDBOX_UID);
    cmd
}

/// The bwrap command line of a sandbox.
pub fn command(
    bwrap: &Path,
    root: &SandboxRoot,
    spec: &SandboxSpec,
    argv: &[String],
    env: &[(String, String)],
) -> Command {
    let mut cmd = prlimit_wrapper(&spec.limits, spec.runtime);
    cmd.arg("--").arg(bwrap);
    cmd.args([
        "--unshare-all",
        "--die-with-parent",
        "--cap-drop",
        "ALL",
        "--clearenv",
    ]);
    cmd.args(["--hostname", "sandbox"]);
    for dir in &root.system_dirs {
        cmd.arg("--ro-bind").arg(dir).arg(dir);
    }
    for entry in std::fs::read_dir(&root.skeleton)
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        if let Ok(target) = std::fs::read_link(&path) {
            cmd.arg("--symlink")
                .arg(target)
                .arg(Path::new("/").join(entry.file_name()));
        }
    }
    cmd.arg("--ro-bind").arg(&root.etc).arg("/etc");
    cmd.args(["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]);
    cmd.arg("--bind")
        .arg(&spec.workspace)
        .arg(SANDBOX_WORKSPACE);
    cmd.args(["--chdir", SANDBOX_WORKSPACE]);
    for (k, v) in env {
        cmd.arg("--setenv").arg(k).arg(v);
    }
    cmd.arg("--").args(argv);
    cmd.env_clear();
    cmd
}
