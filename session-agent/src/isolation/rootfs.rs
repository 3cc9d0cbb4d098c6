//! The minimal root every sandbox sees: the runtime's system directories
//! (read-only), a synthetic `/etc`, and empty mount points. The host's `/` is
//! never the sandbox root (SECURITY.md, hardening item 1).

use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// Top-level host entries that may be symlinks into `/usr` (merged-usr) or
/// real directories holding the runtime's binaries and libraries.
const SYSTEM_ENTRIES: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Mount points created empty in the skeleton.
const MOUNT_POINTS: &[&str] = &["usr", "etc", "tmp", "workspace", "proc", "dev", "sys"];

/// The prepared skeleton and synthetic `/etc`.
#[derive(Debug, Clone)]
pub struct SandboxRoot {
    /// The read-only root directory (mount points and symlinks only).
    pub skeleton: PathBuf,
    /// The synthetic `/etc`.
    pub etc: PathBuf,
    /// Host system directories to bind read-only at the same path.
    pub system_dirs: Vec<PathBuf>,
    /// Top-level symlinks of the skeleton (`/bin` -> `usr/bin`), as (target, link).
    pub links: Vec<(PathBuf, PathBuf)>,
}

impl SandboxRoot {
    /// Builds (or rebuilds) the skeleton under `dir`.
    pub fn prepare(dir: &Path) -> io::Result<Self> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        let skeleton = dir.join("rootfs");
        let etc = dir.join("etc");
        std::fs::create_dir_all(&skeleton)?;
        std::fs::create_dir_all(&etc)?;
        for m in MOUNT_POINTS {
            std::fs::create_dir_all(skeleton.join(m))?;
        }
        let mut system_dirs = vec![PathBuf::from("/usr")];
        let mut links = Vec::new();
        for entry in SYSTEM_ENTRIES {
            let host = Path::new("/").join(entry);
            match std::fs::symlink_metadata(&host) {
                Ok(meta) if meta.file_type().is_symlink() => {
                    let target = std::fs::read_link(&host)?;
                    symlink(&target, skeleton.join(entry))?;
                    links.push((target, Path::new("/").join(entry)));
                }
                Ok(meta) if meta.is_dir() => {
                    std::fs::create_dir_all(skeleton.join(entry))?;
                    system_dirs.push(host);
                }
                _ => {}
            }
        }
        write_etc(&etc)?;
        Ok(SandboxRoot {
            skeleton,
            etc,
            system_dirs,
            links,
        })
    }
}

fn write_etc(etc: &Path) -> io::Result<()> {
    let files: &[(&str, &str)] = &[
        (
            "passwd",
            "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/workspace:/usr/sbin/nologin\n",
        ),
        ("group", "root:x:0:\nnogroup:x:65534:\n"),
        (
            "hosts",
            "127.0.0.1 localhost sandbox\n::1 localhost sandbox\n",
        ),
        ("hostname", "sandbox\n"),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files\n",
        ),
        ("resolv.conf", ""),
    ];
    for (name, content) in files {
        std::fs::write(etc.join(name), content)?;
    }
    // The dynamic loader's cache: without it libraries in multiarch
    // directories are not found. It names library paths only.
    if Path::new("/etc/ld.so.cache").is_file() {
        std::fs::copy("/etc/ld.so.cache", etc.join("ld.so.cache"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skeleton_has_no_host_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = SandboxRoot::prepare(&tmp.path().join("r")).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&root.skeleton)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in &names {
            assert!(
                MOUNT_POINTS.contains(&n.as_str()) || SYSTEM_ENTRIES.contains(&n.as_str()),
                "{n}"
            );
        }
        let etc: Vec<String> = std::fs::read_dir(&root.etc)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!etc.iter().any(|n| n == "shadow" || n == "gshadow"));
        assert!(root.system_dirs.contains(&PathBuf::from("/usr")));
    }
}
