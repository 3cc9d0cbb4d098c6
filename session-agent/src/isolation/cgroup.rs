//! cgroups for sandboxes, placed under the agent's own cgroup so a sandbox
//! is accounted where the agent is and is removed at teardown
//! (SECURITY.md, hardening item 8). runsc manages the cgroups of gVisor
//! sandboxes itself given `linux.cgroupsPath`; bubblewrap and `none`
//! sandboxes get one created here.
//!
//! Each agent's sandboxes sit under a parent named after its state
//! directory (`<own>/session-agent/<key>/<sandbox>`), so an agent that
//! starts after a crash sweeps exactly what its predecessor on the same
//! state directory left, never the cgroups of another agent on the host.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use shared::agent::EffectiveLimits;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The parent cgroup path (relative to each hierarchy) of all sandboxes.
#[derive(Debug, Clone)]
pub struct CgroupParent {
    /// e.g. `/process_api/abc/session-agent`
    relative: String,
    v1: bool,
}

/// A cgroup this module created for one sandbox.
#[derive(Debug)]
pub struct Cgroup {
    dirs: Vec<PathBuf>,
}

impl CgroupParent {
    /// The agent's memory cgroup (v1) or unified cgroup (v2), plus `name`
    /// and a key derived from the agent's state directory.
    pub fn discover(name: &str, state_dir: &Path) -> Self {
        let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let v1 = Path::new(CGROUP_ROOT).join("memory").is_dir();
        let own = text
            .lines()
            .filter_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                let wanted = if v1 {
                    controllers.split(',').any(|c| c == "memory")
                } else {
                    controllers.is_empty()
                };
                wanted.then(|| path.to_owned())
            })
            .next()
            .unwrap_or_else(|| "/".to_owned());
        let base = own.trim_end_matches('/');
        let state = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_owned());
        let digest = Sha256::digest(state.as_os_str().as_encoded_bytes());
        let key = hex::encode(&digest[..6]);
        CgroupParent {
            relative: format!("{base}/{name}/{key}"),
            v1,
        }
    }

    /// `linux.cgroupsPath` for a sandbox.
    pub fn child_path(&self, id: &str) -> String {
        format!("{}/{id}", self.relative)
    }

    fn dirs_for(&self, relative: &str) -> Vec<PathBuf> {
        let rel = relative.trim_start_matches('/');
        if self.v1 {
            ["memory", "pids", "cpu"]
                .iter()
                .map(|c| Path::new(CGROUP_ROOT).join(c).join(rel))
                .collect()
        } else {
            vec![Path::new(CGROUP_ROOT).join(rel)]
        }
    }

    /// Creates a limited cgroup for a sandbox (best effort: returns `None`
    /// where cgroups are not writable, and the rlimits still apply).
    pub fn create(&self, id: &str, limits: &EffectiveLimits) -> Option<Cgroup> {
        let dirs = self.dirs_for(&self.child_path(id));
        for d in &dirs {
            if let Err(e) = std::fs::create_dir_all(d) {
                tracing::warn!(cgroup = %d.display(), error = %e, "cannot create sandbox cgroup; relying on rlimits");
                return None;
            }
        }
        let mem = (limits.memory_mb * 1024 * 1024).to_string();
        let quota = (limits.cpu_millicores * 100).to_string();
        let writes: Vec<(PathBuf, String)> = if self.v1 {
            vec![
                (dirs[0].join("memory.limit_in_bytes"), mem),
                (dirs[1].join("pids.max"), "4096".into()),
                (dirs[2].join("cpu.cfs_period_us"), "100000".into()),
                (dirs[2].join("cpu.cfs_quota_us"), quota),
            ]
        } else {
            vec![
                (dirs[0].join("memory.max"), mem),
                (dirs[0].join("pids.max"), "4096".into()),
                (dirs[0].join("cpu.max"), format!("{quota} 100000")),
            ]
        };
        for (file, value) in writes {
            if let Err(e) = std::fs::write(&file, value) {
                tracing::warn!(file = %file.display(), error = %e, "cannot set cgroup limit");
            }
        }
        Some(Cgroup { dirs })
    }

    /// The parent's directory in every mounted hierarchy. runsc creates a
    /// gVisor sandbox's cgroup in all of them (blkio, cpuset, devices, ...),
    /// not only the three this module limits.
    fn parent_dirs(&self) -> Vec<PathBuf> {
        let rel = self.relative.trim_start_matches('/');
        if !self.v1 {
            return vec![Path::new(CGROUP_ROOT).join(rel)];
        }
        let Ok(entries) = std::fs::read_dir(CGROUP_ROOT) else {
            return vec![];
        };
        entries
            .flatten()
            // `cpu` and `cpuacct` are symlinks to `cpu,cpuacct`: each
            // hierarchy once.
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path().join(rel))
            .filter(|d| d.is_dir())
            .collect()
    }

    /// Sandbox cgroups that exist under this agent's parent, in any
    /// hierarchy.
    pub fn children(&self) -> Vec<PathBuf> {
        self.parent_dirs()
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flat_map(|entries| entries.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }

    /// Removes the sandbox cgroups no process is in: what a killed agent,
    /// or a sandbox whose launcher was killed, left behind. A cgroup still
    /// in use refuses removal and stays. Returns how many were removed.
    pub fn sweep(&self) -> usize {
        self.children()
            .into_iter()
            .filter(|d| std::fs::remove_dir(d).is_ok())
            .count()
    }

    /// Sweeps, then removes the (empty) parent directories, at agent
    /// shutdown.
    pub fn remove_parent(&self) {
        let swept = self.sweep();
        if swept > 0 {
            tracing::warn!(
                cgroups = swept,
                "removed sandbox cgroups left behind at shutdown"
            );
        }
        for d in self.parent_dirs() {
            let _ = std::fs::remove_dir(&d);
            // `session-agent` itself, once no agent uses it.
            if let Some(up) = d.parent() {
                let _ = std::fs::remove_dir(up);
            }
        }
    }
}

/// Removes an empty cgroup, waiting out processes that are still exiting
/// (a cgroup refuses removal until its last task is released).
async fn remove_cgroup_dir(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove sandbox cgroup");
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

impl Cgroup {
    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Removes the cgroup (after its processes exited).
    pub async fn remove(&self) {
        for d in &self.dirs {
            remove_cgroup_dir(d).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_state_directory_has_its_own_parent() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let pa = CgroupParent::discover("session-agent", a.path());
        let pb = CgroupParent::discover("session-agent", b.path());
        assert_ne!(pa.relative, pb.relative);
        assert_eq!(
            pa.relative,
            CgroupParent::discover("session-agent", a.path()).relative,
            "the key is stable across restarts"
        );
        assert!(
            pa.child_path("sa-1").ends_with("/sa-1")
                && pa.child_path("sa-1").contains("/session-agent/"),
            "{}",
            pa.child_path("sa-1")
        );
    }
}
