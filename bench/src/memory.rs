//! Host memory accounting: PSS from `/proc/<pid>/smaps_rollup` and the
//! sandbox's memory cgroup.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use serde_json::{Value, json};

pub(crate) fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn cmdline(pid: u32) -> String {
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
pub(crate) struct ProcMem {
    pid: u32,
    pub(crate) comm: String,
    pub(crate) cmdline: String,
    pub(crate) rss_kib: u64,
    pub(crate) pss_kib: u64,
    pss_anon_kib: u64,
    pss_file_kib: u64,
    pss_shmem_kib: u64,
    /// USS: pages only this process maps (independent of other processes).
    pub(crate) private_kib: u64,
}

pub(crate) fn proc_mem(pid: u32) -> anyhow::Result<ProcMem> {
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
pub(crate) fn processes_of(needle: &str) -> Vec<u32> {
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

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The sandbox's memory cgroup as runsc created it from `linux.cgroupsPath`.
pub(crate) fn cgroup_memory(state_dir: &Path, sandbox_id: &str) -> Value {
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
