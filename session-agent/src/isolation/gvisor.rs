//! OCI bundles for `runsc run`: a minimal read-only root, the session
//! workspace as the only writable host mount, uid 65534, no capabilities, no
//! new privileges, rlimits, and cgroup limits under the agent's cgroup.

use std::path::{Path, PathBuf};

use oci_spec::runtime::{
    Capabilities, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount,
    MountBuilder, PosixRlimit, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder,
    Spec, SpecBuilder, UserBuilder,
};
use shared::agent::{EffectiveLimits, Runtime};

use super::{
    LaunchError, SANDBOX_PACKAGES, SANDBOX_UID, SANDBOX_WORKSPACE, SandboxRoot, SandboxSpec,
};

/// A generous pids cgroup limit: it counts gVisor's own Sentry threads, so
/// fork bombs are contained by RLIMIT_NPROC inside the sandbox instead
/// (MEASURED.md).
const PIDS_CGROUP_LIMIT: i64 = 4096;

/// Writes `<bundles>/<id>/config.json` and returns the bundle directory.
pub fn write_bundle(
    bundles: &Path,
    root: &SandboxRoot,
    spec: &SandboxSpec,
    argv: &[String],
    env: &[(String, String)],
    cgroups_path: &str,
) -> Result<PathBuf, LaunchError> {
    let dir = bundles.join(&spec.sandbox_id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| LaunchError::Prepare(format!("{}: {e}", dir.display())))?;
    let config = build_spec(root, spec, argv, env, cgroups_path)?;
    config
        .save(dir.join("config.json"))
        .map_err(|e| LaunchError::Prepare(format!("writing OCI config: {e}")))?;
    Ok(dir)
}

fn oci_err(e: oci_spec::OciSpecError) -> LaunchError {
    LaunchError::Prepare(format!("OCI spec: {e}"))
}

/// The OCI runtime spec of one sandbox.
pub fn build_spec(
    root: &SandboxRoot,
    spec: &SandboxSpec,
    argv: &[String],
    env: &[(String, String)],
    cgroups_path: &str,
) -> Result<Spec, LaunchError> {
    let limits = &spec.limits;
    let none = Capabilities::new();
    let caps = LinuxCapabilitiesBuilder::default()
        .bounding(none.clone())
        .effective(none.clone())
        .inheritable(none.clone())
        .permitted(none.clone())
        .ambient(none)
        .build()
        .map_err(oci_err)?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(SANDBOX_UID)
                .gid(SANDBOX_UID)
                .additional_gids(Vec::<u32>::new())
                .build()
                .map_err(oci_err)?,
        )
        .args(argv.to_vec())
        .env(
            env.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
        )
        .cwd(SANDBOX_WORKSPACE)
        .capabilities(caps)
        .rlimits(rlimits(limits, spec.runtime)?)
        .no_new_privileges(true)
        .build()
        .map_err(oci_err)?;
    let namespaces = [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Network,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ]
    .into_iter()
    .map(|t| {
        LinuxNamespaceBuilder::default()
            .typ(t)
            .build()
            .map_err(oci_err)
    })
    .collect::<Result<Vec<_>, _>>()?;
    let memory_bytes = i64::try_from(limits.memory_mb * 1024 * 1024).unwrap_or(i64::MAX);
    let resources = LinuxResourcesBuilder::default()
        .memory(
            LinuxMemoryBuilder::default()
                .limit(memory_bytes)
                .build()
                .map_err(oci_err)?,
        )
        .cpu(
            LinuxCpuBuilder::default()
                .period(100_000u64)
                .quota(i64::try_from(limits.cpu_millicores * 100).unwrap_or(i64::MAX))
                .build()
                .map_err(oci_err)?,
        )
        .pids(
            LinuxPidsBuilder::default()
                .limit(PIDS_CGROUP_LIMIT)
                .build()
                .map_err(oci_err)?,
        )
        .build()
        .map_err(oci_err)?;
    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources)
        .cgroups_path(PathBuf::from(cgroups_path))
        .build()
        .map_err(oci_err)?;
    SpecBuilder::default()
        .version("1.0.2")
        .hostname("sandbox")
        .root(
            RootBuilder::default()
                .path(&root.skeleton)
                .readonly(true)
                .build()
                .map_err(oci_err)?,
        )
        .process(process)
        .mounts(mounts(root, spec)?)
        .linux(linux)
        .build()
        .map_err(oci_err)
}

fn mount(dest: &str, typ: &str, source: &Path, options: &[&str]) -> Result<Mount, LaunchError> {
    MountBuilder::default()
        .destination(dest)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
        .build()
        .map_err(oci_err)
}

fn mounts(root: &SandboxRoot, spec: &SandboxSpec) -> Result<Vec<Mount>, LaunchError> {
    let ro = ["rbind", "ro", "nosuid", "nodev"];
    let mut out = vec![
        mount(
            "/proc",
            "proc",
            Path::new("proc"),
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/dev",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "mode=755", "size=1m"],
        )?,
        mount(
            "/sys",
            "tmpfs",
            Path::new("tmpfs"),
            &["ro", "nosuid", "noexec", "nodev", "size=0"],
        )?,
        mount(
            "/tmp",
            "tmpfs",
            Path::new("tmpfs"),
            &["nosuid", "nodev", "mode=1777", "size=64m"],
        )?,
        mount("/etc", "bind", &root.etc, &ro)?,
    ];
    for dir in &root.system_dirs {
        let dest = dir.to_string_lossy().into_owned();
        out.push(mount(&dest, "bind", dir, &ro)?);
    }
    out.push(mount(
        SANDBOX_WORKSPACE,
        "bind",
        &spec.workspace,
        &["rbind", "rw", "nosuid", "nodev"],
    )?);
    if let Some(p) = &spec.packages {
        out.push(mount(SANDBOX_PACKAGES, "bind", p, &ro)?);
    }
    Ok(out)
}

fn rlimit(typ: PosixRlimitType, value: u64) -> Result<PosixRlimit, LaunchError> {
    PosixRlimitBuilder::default()
        .typ(typ)
        .hard(value)
        .soft(value)
        .build()
        .map_err(oci_err)
}

/// rlimits gVisor enforces inside the sandbox: processes (fork bombs fail
/// with EAGAIN), file size (runsc has no disk quota), open files, no core
/// dumps, and for Python the address space (allocations past the memory
/// limit raise MemoryError instead of killing the sandbox).
pub fn rlimits(
    limits: &EffectiveLimits,
    runtime: Runtime,
) -> Result<Vec<PosixRlimit>, LaunchError> {
    let mut out = vec![
        rlimit(PosixRlimitType::RlimitNproc, limits.max_processes)?,
        rlimit(PosixRlimitType::RlimitFsize, limits.disk_mb * 1024 * 1024)?,
        rlimit(PosixRlimitType::RlimitNofile, 1024)?,
        rlimit(PosixRlimitType::RlimitCore, 0)?,
    ];
    if runtime == Runtime::Python {
        out.push(rlimit(
            PosixRlimitType::RlimitAs,
            limits.memory_mb * 1024 * 1024,
        )?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (tempfile::TempDir, Spec) {
        let tmp = tempfile::tempdir().unwrap();
        let root = SandboxRoot::prepare(&tmp.path().join("root")).unwrap();
        let spec = SandboxSpec {
            sandbox_id: "sb-1".into(),
            runtime: Runtime::Python,
            argv: vec!["/usr/bin/python3".into()],
            workspace: tmp.path().join("ws"),
            packages: None,
            limits: EffectiveLimits {
                memory_mb: 256,
                cpu_millicores: 500,
                max_processes: 32,
                disk_mb: 16,
                timeout_ms: 1000,
                max_output_bytes: 1024,
            },
        };
        let oci = build_spec(
            &root,
            &spec,
            &["/usr/bin/python3".into()],
            &[("PATH".into(), "/usr/bin".into())],
            "/a/sb-1",
        )
        .unwrap();
        (tmp, oci)
    }

    #[test]
    fn process_is_unprivileged() {
        let (_tmp, spec) = sample();
        let p = spec.process().as_ref().unwrap();
        assert_eq!(p.user().uid(), 65534);
        assert_eq!(p.user().gid(), 65534);
        assert_eq!(p.no_new_privileges(), Some(true));
        let caps = p.capabilities().as_ref().unwrap();
        for set in [
            caps.bounding(),
            caps.effective(),
            caps.inheritable(),
            caps.permitted(),
            caps.ambient(),
        ] {
            assert!(set.as_ref().unwrap().is_empty());
        }
        let env = p.env().as_ref().unwrap();
        assert_eq!(env, &vec!["PATH=/usr/bin".to_owned()]);
    }

    #[test]
    fn root_is_readonly_skeleton_and_workspace_is_the_only_rw_bind() {
        let (_tmp, spec) = sample();
        assert_eq!(spec.root().as_ref().unwrap().readonly(), Some(true));
        let rw_binds: Vec<String> = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .filter(|m| m.typ().as_deref() == Some("bind"))
            .filter(|m| !m.options().as_ref().unwrap().iter().any(|o| o == "ro"))
            .map(|m| m.destination().display().to_string())
            .collect();
        assert_eq!(rw_binds, vec!["/workspace".to_owned()]);
        let sources: Vec<String> = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|m| m.source().as_ref().map(|s| s.display().to_string()))
            .collect();
        for forbidden in ["/", "/home", "/root", "/var", "/etc"] {
            assert!(
                !sources.iter().any(|s| s == forbidden),
                "{forbidden} must not be mounted"
            );
        }
    }

    #[test]
    fn limits_reach_cgroup_and_rlimits() {
        let (_tmp, spec) = sample();
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(linux.cgroups_path().as_ref().unwrap(), Path::new("/a/sb-1"));
        let res = linux.resources().as_ref().unwrap();
        assert_eq!(
            res.memory().as_ref().unwrap().limit(),
            Some(256 * 1024 * 1024)
        );
        assert_eq!(res.cpu().as_ref().unwrap().quota(), Some(50_000));
        let rl = spec.process().as_ref().unwrap().rlimits().as_ref().unwrap();
        let nproc = rl
            .iter()
            .find(|r| r.typ() == PosixRlimitType::RlimitNproc)
            .unwrap();
        assert_eq!(nproc.hard(), 32);
        let fsize = rl
            .iter()
            .find(|r| r.typ() == PosixRlimitType::RlimitFsize)
            .unwrap();
        assert_eq!(fsize.hard(), 16 * 1024 * 1024);
        let ns: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert!(ns.contains(&LinuxNamespaceType::Network));
    }
}
