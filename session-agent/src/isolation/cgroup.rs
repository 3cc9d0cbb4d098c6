//! cgroups for sandboxes, placed under the agent's own cgroup so a sandbox
//! is accounted where the agent is and is removed at teardown
//! (SECURITY.md, hardening item 8). runsc manages the cgroups of gVisor
//! sandboxes itself given `linux.cgroupsPath`; bubblewrap and `none`
//! sandboxes get one created here.

use std::path::{Path, PathBuf};

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
    /// The agent's memory cgroup (v1) or unified cgroup (v2), plus `name`.
    pub fn discover(name: &str) -> Self {
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
        CgroupParent {
            relative: format!("{base}/{name}"),
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

    /// Removes the (empty) parent directories at agent shutdown.
    pub fn remove_parent(&self) {
        for d in self.dirs_for(&self.relative) {
            let _ = std::fs::remove_dir(d);
        }
    }
}

impl Cgroup {
    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    /// Removes the cgroup (after its processes exited).
    pub fn remove(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}
