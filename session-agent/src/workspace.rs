//! Session workspaces: a size-limited tmpfs per sandbox (memory-backed, so
//! teardown leaves nothing on disk), and the files API over it, which resolves
//! every path inside the workspace without following symlinks out.

use std::io;
use std::path::{Component, Path, PathBuf};

use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use shared::CodedError;
use shared::ErrorCode;
use shared::agent::{FileEntry, MAX_OUTPUT_FILES};

use crate::isolation::SANDBOX_UID;

/// The files directly under a workspace's `output/`: name -> (modified, size).
#[derive(Debug, Default)]
pub struct OutputSnapshot(std::collections::HashMap<String, (Option<std::time::SystemTime>, u64)>);

/// Most `output/` entries read for a snapshot: a step that floods the
/// directory costs a bounded read, and its result lists a bounded part.
const OUTPUT_SCAN_LIMIT: usize = 4096;

/// One session's workspace on the host.
#[derive(Debug)]
pub struct Workspace {
    pub host_path: PathBuf,
    mounted: bool,
}

impl Workspace {
    /// Creates `<root>/<id>` and mounts a tmpfs of `size_mb` on it, owned by
    /// the sandbox uid. Where mounting is not permitted it falls back to a
    /// plain directory (and says so).
    pub fn create(root: &Path, id: &str, size_mb: u64) -> io::Result<Workspace> {
        let host_path = root.join(id);
        std::fs::create_dir_all(&host_path)?;
        let data = std::ffi::CString::new(format!(
            "size={size_mb}m,mode=0700,uid={SANDBOX_UID},gid={SANDBOX_UID}"
        ))
        .map_err(io::Error::other)?;
        let flags = rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV;
        let mounted = match rustix::mount::mount(
            "tmpfs",
            &host_path,
            "tmpfs",
            flags,
            Some(data.as_c_str()),
        ) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(path = %host_path.display(), error = %e,
                    "cannot mount a tmpfs workspace; using a plain directory (not size-limited, on disk)");
                let dir = std::fs::File::open(&host_path)?;
                // A non-root agent (a runtime pod's) cannot give it away, and
                // needs not: its interpreter runs as the agent's own uid.
                if rustix::process::geteuid().is_root() {
                    std::os::unix::fs::fchown(&dir, Some(SANDBOX_UID), Some(SANDBOX_UID))?;
                }
                std::fs::set_permissions(
                    &host_path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o700),
                )?;
                false
            }
        };
        Ok(Workspace { host_path, mounted })
    }

    /// Unmounts (discarding the tmpfs contents) and removes the directory.
    pub fn destroy(&self) {
        if self.mounted
            && let Err(e) =
                rustix::mount::unmount(&self.host_path, rustix::mount::UnmountFlags::DETACH)
        {
            tracing::warn!(path = %self.host_path.display(), error = %e, "unmounting workspace failed");
        }
        if let Err(e) = std::fs::remove_dir_all(&self.host_path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.host_path.display(), error = %e, "removing workspace failed");
        }
    }

    fn dir(&self) -> Result<Dir, CodedError> {
        Dir::open_ambient_dir(&self.host_path, ambient_authority()).map_err(|e| {
            CodedError::new(ErrorCode::Internal, format!("workspace unavailable: {e}"))
        })
    }

    /// Lists a directory (`""` is the root). Symlinks are listed, never followed.
    pub fn list(&self, rel: &str) -> Result<Vec<FileEntry>, CodedError> {
        let path = clean_path(rel, true)?;
        let root = self.dir()?;
        let dir = if path.as_os_str().is_empty() {
            root
        } else {
            root.open_dir_nofollow(&path).map_err(io_err)?
        };
        let mut out = Vec::new();
        for entry in dir.entries().map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry.metadata().map_err(io_err)?;
            let ft = meta.file_type();
            let kind = if ft.is_file() {
                "file"
            } else if ft.is_dir() {
                "dir"
            } else {
                "other"
            };
            let modified_ms = meta
                .modified()
                .ok()
                .and_then(|t| t.into_std().duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .unwrap_or(0);
            let full = if path.as_os_str().is_empty() {
                name
            } else {
                format!("{}/{name}", path.display())
            };
            out.push(FileEntry {
                path: full,
                kind: kind.into(),
                size: meta.len(),
                modified_ms,
            });
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// What is directly under `output/` now (name, modification time and
    /// size of each file): taken before a step, compared after it.
    pub fn output_snapshot(&self) -> OutputSnapshot {
        let mut files = std::collections::HashMap::new();
        if let Ok(dir) = self
            .dir()
            .and_then(|d| d.open_dir_nofollow(Path::new("output")).map_err(io_err))
            && let Ok(entries) = dir.entries()
        {
            for entry in entries.flatten().take(OUTPUT_SCAN_LIMIT) {
                if let Ok(meta) = entry.metadata()
                    && meta.is_file()
                {
                    let modified = meta.modified().ok().map(|t| t.into_std());
                    files.insert(
                        entry.file_name().to_string_lossy().into_owned(),
                        (modified, meta.len()),
                    );
                }
            }
        }
        OutputSnapshot(files)
    }

    /// The files directly under `output/` that are new, or whose
    /// modification time or size changed, since `before` (at most
    /// [`MAX_OUTPUT_FILES`]); `None` when there are none. Comparing two
    /// snapshots, not times against a clock: file times come from the
    /// kernel's coarse clock and can read earlier than a precise step start.
    pub fn output_changes(&self, before: &OutputSnapshot) -> Option<Vec<FileEntry>> {
        let after = self.output_snapshot();
        let mut files: Vec<FileEntry> = after
            .0
            .iter()
            .filter(|(name, now)| before.0.get(*name) != Some(now))
            .map(|(name, (modified, size))| FileEntry {
                path: format!("output/{name}"),
                kind: "file".into(),
                size: *size,
                modified_ms: modified
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    .unwrap_or(0),
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files.truncate(MAX_OUTPUT_FILES);
        (!files.is_empty()).then_some(files)
    }

    /// Whether `rel` names a directory (for GET dispatch).
    pub fn is_dir(&self, rel: &str) -> Result<bool, CodedError> {
        let path = clean_path(rel, true)?;
        if path.as_os_str().is_empty() {
            return Ok(true);
        }
        match self.dir()?.symlink_metadata(&path) {
            Ok(m) => Ok(m.is_dir()),
            Err(e) => Err(io_err(e)),
        }
    }

    /// Opens a regular file for reading.
    pub fn open_read(&self, rel: &str) -> Result<std::fs::File, CodedError> {
        let path = clean_path(rel, false)?;
        let mut opts = OpenOptions::new();
        // O_NONBLOCK: a FIFO planted by the sandbox must not hang the agent.
        opts.read(true)
            .custom_flags(libc_flags::O_NOFOLLOW | libc_flags::O_NONBLOCK);
        let file = self
            .dir()?
            .open_with(&path, &opts)
            .map_err(io_err)?
            .into_std();
        let meta = file.metadata().map_err(io_err)?;
        if !meta.is_file() {
            return Err(CodedError::new(
                ErrorCode::NotAFile,
                format!("{rel} is not a regular file"),
            ));
        }
        Ok(file)
    }

    /// Creates or replaces a file (and its parent directories), owned by the
    /// sandbox uid so code in the sandbox can change it.
    pub fn write(&self, rel: &str, content: &[u8]) -> Result<(), CodedError> {
        let path = clean_path(rel, false)?;
        let root = self.dir()?;
        let mut dir = root.try_clone().map_err(io_err)?;
        let parts: Vec<_> = path.components().collect();
        let (last, parents) = parts.split_last().ok_or_else(|| bad_path("empty path"))?;
        for part in parents {
            match dir.create_dir(part) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(e)),
            }
            // The directory fd may be O_PATH, so chown by name, not by fd.
            rustix::fs::chownat(
                &dir,
                Path::new(part),
                Some(sandbox_uid()),
                Some(sandbox_gid()),
                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| io_err(e.into()))?;
            dir = dir.open_dir_nofollow(Path::new(part)).map_err(io_err)?;
        }
        let mut opts = OpenOptions::new();
        opts.write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .custom_flags(libc_flags::O_NOFOLLOW | libc_flags::O_NONBLOCK);
        let file = dir.open_with(last, &opts).map_err(io_err)?.into_std();
        if !file.metadata().map_err(io_err)?.is_file() {
            return Err(CodedError::new(
                ErrorCode::NotAFile,
                format!("{rel} is not a regular file"),
            ));
        }
        std::os::unix::fs::fchown(&file, Some(SANDBOX_UID), Some(SANDBOX_UID)).map_err(io_err)?;
        use std::io::Write;
        let mut file = file;
        file.write_all(content).map_err(io_err)?;
        Ok(())
    }

    /// Deletes a file, a symlink (not its target) or a directory tree.
    pub fn delete(&self, rel: &str) -> Result<(), CodedError> {
        let path = clean_path(rel, false)?;
        let root = self.dir()?;
        let meta = root.symlink_metadata(&path).map_err(io_err)?;
        if meta.is_dir() {
            root.remove_dir_all(&path).map_err(io_err)
        } else {
            root.remove_file(&path).map_err(io_err)
        }
    }
}

fn sandbox_uid() -> rustix::fs::Uid {
    rustix::fs::Uid::from_raw(SANDBOX_UID)
}

fn sandbox_gid() -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw(SANDBOX_UID)
}

mod libc_flags {
    use rustix::fs::OFlags;
    // Bit patterns differ between architectures; take them from rustix.
    pub const O_NOFOLLOW: i32 = OFlags::NOFOLLOW.bits() as i32;
    pub const O_NONBLOCK: i32 = OFlags::NONBLOCK.bits() as i32;
}

trait OpenDirNoFollow {
    fn open_dir_nofollow(&self, path: &Path) -> io::Result<Dir>;
}

impl OpenDirNoFollow for Dir {
    /// Opens a subdirectory, refusing a symlink as the last component.
    fn open_dir_nofollow(&self, path: &Path) -> io::Result<Dir> {
        let meta = self.symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "a symlink is not a directory here",
            ));
        }
        self.open_dir(path)
    }
}

fn bad_path(msg: &str) -> CodedError {
    CodedError::new(ErrorCode::PathOutsideWorkspace, msg)
}

/// Lexical checks before any file system access: relative, no `..`, no NUL,
/// bounded length. `.` and empty segments are dropped.
pub fn clean_path(rel: &str, allow_root: bool) -> Result<PathBuf, CodedError> {
    if rel.len() > 4096 {
        return Err(CodedError::new(
            ErrorCode::InvalidArgument,
            "path is longer than 4096 bytes",
        ));
    }
    if rel.contains('\0') {
        return Err(bad_path("path contains a NUL byte"));
    }
    if rel.starts_with('/') {
        return Err(bad_path(
            "absolute paths are refused: paths are relative to the workspace",
        ));
    }
    let mut out = PathBuf::new();
    for comp in Path::new(rel).components() {
        match comp {
            Component::Normal(part) => {
                if part.len() > 255 {
                    return Err(CodedError::new(
                        ErrorCode::InvalidArgument,
                        "a path segment is longer than 255 bytes",
                    ));
                }
                out.push(part);
            }
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(bad_path(
                    "'..' is refused: paths must stay inside the workspace",
                ));
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad_path("absolute paths are refused"));
            }
        }
    }
    if out.as_os_str().is_empty() && !allow_root {
        return Err(CodedError::new(
            ErrorCode::InvalidArgument,
            "a file path is required",
        ));
    }
    Ok(out)
}

fn io_err(e: io::Error) -> CodedError {
    match e.kind() {
        io::ErrorKind::NotFound => {
            CodedError::new(ErrorCode::FileNotFound, "no such file in the workspace")
        }
        // cap-std reports a path that leads outside the directory (through a
        // symlink or otherwise) as PermissionDenied; the agent runs as root, so
        // nothing else inside the workspace is denied.
        io::ErrorKind::PermissionDenied => {
            bad_path("the path leads outside the workspace (symlinks out are refused)")
        }
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge => {
            CodedError::new(ErrorCode::WorkspaceFull, "the workspace is full")
        }
        io::ErrorKind::NotADirectory | io::ErrorKind::IsADirectory => {
            CodedError::new(ErrorCode::NotAFile, format!("wrong kind of file: {e}"))
        }
        io::ErrorKind::DirectoryNotEmpty => {
            CodedError::new(ErrorCode::InvalidArgument, e.to_string())
        }
        _ if e.raw_os_error() == Some(40) => bad_path("the path goes through a symlink"), // ELOOP
        _ if e.raw_os_error() == Some(28) => {
            CodedError::new(ErrorCode::WorkspaceFull, "the workspace is full")
        } // ENOSPC
        _ if e.raw_os_error() == Some(6) => {
            CodedError::new(ErrorCode::NotAFile, "not a regular file")
        } // ENXIO (FIFO)
        _ => CodedError::new(ErrorCode::Internal, format!("workspace I/O failed: {e}")),
    }
}

/// Prefix of every sandbox and workspace name the agent creates. Only such
/// entries are ever reaped, so a mistaken `WORKSPACE_ROOT` cannot make the
/// agent delete anything else.
pub const WORKSPACE_PREFIX: &str = "sa-";

/// Unmounts and removes workspaces a previous agent left under `root`.
pub fn reap_workspaces(root: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let prefix = format!("{}/{WORKSPACE_PREFIX}", root.display());
    for line in mounts.lines() {
        if let Some(mp) = line.split(' ').nth(4)
            && mp.starts_with(&prefix)
        {
            tracing::warn!(path = mp, "unmounting a workspace left by a previous agent");
            let _ = rustix::mount::unmount(mp, rustix::mount::UnmountFlags::DETACH);
        }
    }
    if let Ok(entries) = std::fs::read_dir(root) {
        for e in entries.flatten() {
            if e.file_name()
                .to_string_lossy()
                .starts_with(WORKSPACE_PREFIX)
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_is_refused_lexically() {
        for bad in ["../x", "a/../../x", "/etc/passwd", "a/\0b", "a/.."] {
            let err = clean_path(bad, false).unwrap_err();
            assert_eq!(err.code, ErrorCode::PathOutsideWorkspace, "{bad}");
        }
        assert_eq!(clean_path("./a//b/", false).unwrap(), PathBuf::from("a/b"));
        assert_eq!(
            clean_path("", false).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        assert!(clean_path("", true).unwrap().as_os_str().is_empty());
    }

    fn plain_ws() -> (tempfile::TempDir, Workspace) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("ws");
        std::fs::create_dir(&path).unwrap();
        (
            tmp,
            Workspace {
                host_path: path,
                mounted: false,
            },
        )
    }

    #[test]
    fn symlink_out_is_refused() {
        let (tmp, ws) = plain_ws();
        std::fs::write(tmp.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", ws.host_path.join("abs")).unwrap();
        std::os::unix::fs::symlink("../secret", ws.host_path.join("rel")).unwrap();
        std::os::unix::fs::symlink(tmp.path(), ws.host_path.join("dirlink")).unwrap();
        for p in ["abs", "rel"] {
            let e = ws.open_read(p).unwrap_err();
            assert_eq!(e.code, ErrorCode::PathOutsideWorkspace, "{p}: {e}");
        }
        assert_eq!(
            ws.open_read("dirlink/secret").unwrap_err().code,
            ErrorCode::PathOutsideWorkspace
        );
        assert_eq!(
            ws.write("dirlink/new", b"x").unwrap_err().code,
            ErrorCode::PathOutsideWorkspace
        );
        assert_eq!(
            ws.write("abs", b"x").unwrap_err().code,
            ErrorCode::PathOutsideWorkspace
        );
        assert_eq!(
            ws.list("dirlink").unwrap_err().code,
            ErrorCode::PathOutsideWorkspace
        );
        assert!(!tmp.path().join("new").exists());
        // Deleting the link removes the link, not the target.
        ws.delete("rel").unwrap();
        assert!(tmp.path().join("secret").exists());
    }

    #[test]
    fn write_read_list_delete() {
        let (_tmp, ws) = plain_ws();
        ws.write("a/b/c.txt", b"hello").unwrap();
        let mut s = String::new();
        use std::io::Read;
        ws.open_read("a/b/c.txt")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "hello");
        let list = ws.list("a").unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].path, "a/b");
        assert_eq!(list[0].kind, "dir");
        assert_eq!(ws.open_read("a").unwrap_err().code, ErrorCode::NotAFile);
        ws.delete("a").unwrap();
        assert_eq!(
            ws.open_read("a/b/c.txt").unwrap_err().code,
            ErrorCode::FileNotFound
        );
    }
}
