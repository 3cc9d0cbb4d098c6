//! The dependency allowlist (decision 4): a session's packages are checked
//! against a per-runtime allowlist, every decision is audited, and allowed
//! ones are installed here, outside the sandbox, from a package index into a
//! content-addressed cache that the agent mounts read-only on the import
//! path. Code in a sandbox never reaches a package index.
//!
//! Python: pure wheels (`py3-none-any`); Node: npm tarballs
//! (`<name>-<version>.tgz`, unscoped); both from a local index directory
//! (`DEPENDENCY_INDEX_DIR`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};
use shared::ErrorCode;
use shared::server::ApiError;

/// `{"python": {"six": ">=1.16,<2", "attrs": ""}}`: a package name and the
/// versions allowed ("" = any).
pub type AllowlistFile = BTreeMap<String, BTreeMap<String, String>>;

/// Allowlist, index and cache.
#[derive(Debug, Clone, Default)]
pub struct Dependencies {
    allow: AllowlistFile,
    index: Option<PathBuf>,
    cache: PathBuf,
}

/// PEP 503 normalisation: lowercase, runs of `-_.` become `-`.
pub fn normalize(name: &str) -> String {
    let mut out = String::new();
    let mut sep = false;
    for c in name.trim().chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

fn version_key(v: &str) -> Vec<u64> {
    v.split('.')
        .map(|p| {
            p.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .unwrap_or(0)
        })
        .collect()
}

fn cmp_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut x, mut y) = (version_key(a), version_key(b));
    let n = x.len().max(y.len());
    x.resize(n, 0);
    y.resize(n, 0);
    x.cmp(&y)
}

/// Whether `version` satisfies comma-separated clauses (`>=1.2,<2,!=1.5`).
pub fn satisfies(version: &str, spec: &str) -> bool {
    use std::cmp::Ordering::*;
    spec.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .all(|clause| {
            let (op, v) = ["==", "!=", ">=", "<=", ">", "<"]
                .iter()
                .find_map(|op| clause.strip_prefix(op).map(|v| (*op, v.trim())))
                .unwrap_or(("==", clause));
            let o = cmp_versions(version, v);
            match op {
                "==" => o == Equal,
                "!=" => o != Equal,
                ">=" => o != Less,
                "<=" => o != Greater,
                ">" => o == Greater,
                _ => o == Less,
            }
        })
}

/// A requested package: `name` or `name==version`.
fn parse_request(req: &str) -> Result<(String, Option<String>), ApiError> {
    let bad = || {
        ApiError::new(
            ErrorCode::InvalidArgument,
            format!("package {req:?} is not `name` or `name==version`"),
        )
    };
    let (name, pin) = match req.split_once("==") {
        Some((n, v)) => (n.trim(), Some(v.trim().to_owned())),
        None => (req.trim(), None),
    };
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(bad());
    }
    if pin
        .as_deref()
        .is_some_and(|v| v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.'))
    {
        return Err(bad());
    }
    Ok((normalize(name), pin))
}

impl Dependencies {
    pub fn new(allow: AllowlistFile, index: Option<PathBuf>, cache: PathBuf) -> Self {
        Dependencies {
            allow,
            index,
            cache,
        }
    }

    /// Reads `DEPENDENCY_ALLOWLIST_PATH` (absent: nothing is allowed).
    pub fn load_allowlist(path: Option<&Path>) -> Result<AllowlistFile, String> {
        let Some(path) = path else {
            return Ok(AllowlistFile::new());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("DEPENDENCY_ALLOWLIST_PATH {}: {e}", path.display()))?;
        let raw: AllowlistFile = serde_json::from_str(&text)
            .map_err(|e| format!("DEPENDENCY_ALLOWLIST_PATH {}: {e}", path.display()))?;
        Ok(raw
            .into_iter()
            .map(|(runtime, pkgs)| {
                (
                    runtime,
                    pkgs.into_iter().map(|(n, v)| (normalize(&n), v)).collect(),
                )
            })
            .collect())
    }

    /// Checks every package against the runtime's allowlist. Each decision
    /// is audited; the first refusal is a 403 naming the package.
    pub fn check(
        &self,
        tenant: &str,
        runtime: &str,
        packages: &[String],
    ) -> Result<Vec<(String, Option<String>)>, ApiError> {
        let mut out = Vec::new();
        for req in packages {
            let (name, pin) = parse_request(req)?;
            let allowed = self.allow.get(runtime).and_then(|m| m.get(&name));
            let ok = match (allowed, &pin) {
                (None, _) => false,
                (Some(spec), Some(v)) => satisfies(v, spec),
                (Some(_), None) => true,
            };
            tracing::info!(target: "audit", tenant, runtime, package = %req, decision = if ok { "allow" } else { "deny" },
                "dependency decision");
            if !ok {
                return Err(ApiError::new(
                    ErrorCode::DependencyNotAllowed,
                    format!("package {req:?} is not on the {runtime} allowlist"),
                ));
            }
            out.push((name, pin));
        }
        Ok(out)
    }

    /// Installs checked packages into a content-addressed directory (reused
    /// when the same wheels were installed before) and returns it.
    pub fn install(
        &self,
        runtime: &str,
        packages: &[(String, Option<String>)],
    ) -> Result<PathBuf, ApiError> {
        let unavailable = |m: String| ApiError::new(ErrorCode::DependencyUnavailable, m);
        let kind = match runtime {
            "python" => "py",
            "node" => "node",
            other => {
                return Err(unavailable(format!(
                    "runtime {other} has no package ecosystem"
                )));
            }
        };
        let index = self.index.as_ref().ok_or_else(|| {
            unavailable("no package index is configured (DEPENDENCY_INDEX_DIR)".into())
        })?;
        let mut wheels = Vec::new();
        for (name, pin) in packages {
            let spec = self
                .allow
                .get(runtime)
                .and_then(|m| m.get(name))
                .cloned()
                .unwrap_or_default();
            let found = if kind == "py" {
                best_wheel(index, name, pin.as_deref(), &spec)
            } else {
                best_tarball(index, name, pin.as_deref(), &spec)
            };
            let file = found.ok_or_else(|| {
                unavailable(format!("no allowed {runtime} package {name} in the index"))
            })?;
            let bytes = std::fs::read(&file)
                .map_err(|e| unavailable(format!("{}: {e}", file.display())))?;
            wheels.push((hex::encode(Sha256::digest(&bytes)), (name.clone(), bytes)));
        }
        wheels.sort_by(|a, b| a.0.cmp(&b.0));
        wheels.dedup_by(|a, b| a.0 == b.0);
        let set: String = hex::encode(Sha256::digest(
            wheels
                .iter()
                .map(|w| w.0.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        ));
        let dir = self.cache.join(format!("{kind}-{set}"));
        if dir.is_dir() {
            return Ok(dir);
        }
        let tmp = self.cache.join(format!(
            ".tmp-{set}-{}",
            hex::encode(rand::random::<[u8; 4]>())
        ));
        let result = (|| -> Result<(), String> {
            std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
            for (_, (name, bytes)) in &wheels {
                if kind == "py" {
                    extract_wheel(bytes, &tmp)?;
                } else {
                    extract_npm(bytes, &tmp.join("node_modules").join(name))?;
                }
            }
            make_readable(&tmp).map_err(|e| e.to_string())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("installing packages: {e}"),
            ));
        }
        // Another install of the same set may have won the race: keep one.
        if std::fs::rename(&tmp, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Ok(dir)
    }
}

/// The newest pure wheel of `name` allowed by `spec` (and `pin`).
fn best_wheel(index: &Path, name: &str, pin: Option<&str>, spec: &str) -> Option<PathBuf> {
    let mut best: Option<(String, PathBuf)> = None;
    for e in std::fs::read_dir(index).ok()?.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = file.strip_suffix(".whl") else {
            continue;
        };
        let parts: Vec<&str> = stem.split('-').collect();
        // name-version(-build)?-python-abi-platform
        if parts.len() < 5 || normalize(parts[0]) != name {
            continue;
        }
        let (version, abi, platform) = (parts[1], parts[parts.len() - 2], parts[parts.len() - 1]);
        if abi != "none" || platform != "any" {
            continue;
        }
        if pin.is_some_and(|p| cmp_versions(version, p) != std::cmp::Ordering::Equal)
            || !satisfies(version, spec)
        {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(v, _)| cmp_versions(version, v) == std::cmp::Ordering::Greater)
        {
            best = Some((version.to_owned(), e.path()));
        }
    }
    best.map(|(_, p)| p)
}

/// The newest npm tarball `<name>-<version>.tgz` allowed by `spec` (and `pin`).
fn best_tarball(index: &Path, name: &str, pin: Option<&str>, spec: &str) -> Option<PathBuf> {
    let mut best: Option<(String, PathBuf)> = None;
    for e in std::fs::read_dir(index).ok()?.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(stem) = file.strip_suffix(".tgz") else {
            continue;
        };
        let Some(version) = stem.strip_prefix(&format!("{name}-")) else {
            continue;
        };
        if !version.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        if pin.is_some_and(|p| cmp_versions(version, p) != std::cmp::Ordering::Equal)
            || !satisfies(version, spec)
        {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(v, _)| cmp_versions(version, v) == std::cmp::Ordering::Greater)
        {
            best = Some((version.to_owned(), e.path()));
        }
    }
    best.map(|(_, p)| p)
}

/// Unpacks an npm tarball (gzip tar, files under `package/`) into `dest`,
/// regular files and directories only, nothing outside `dest`.
fn extract_npm(bytes: &[u8], dest: &Path) -> Result<(), String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    std::fs::create_dir_all(dest).map_err(|e| e.to_string())?;
    for entry in archive
        .entries()
        .map_err(|e| format!("not an npm tarball: {e}"))?
    {
        let mut entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        let rel: PathBuf = path.components().skip(1).collect();
        if rel.as_os_str().is_empty() {
            continue;
        }
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!(
                "tarball entry {} leaves the install directory",
                path.display()
            ));
        }
        let target = dest.join(&rel);
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(&target).map_err(|e| e.to_string())?
            }
            tar::EntryType::Regular => {
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                let mut data = Vec::new();
                entry.read_to_end(&mut data).map_err(|e| e.to_string())?;
                std::fs::write(&target, data).map_err(|e| e.to_string())?;
            }
            // Links and devices are never installed.
            _ => {}
        }
    }
    Ok(())
}

/// Unpacks a wheel (a zip) into `dest`, refusing entries that would land
/// outside it.
fn extract_wheel(bytes: &[u8], dest: &Path) -> Result<(), String> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("not a wheel: {e}"))?;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| e.to_string())?;
        let rel = PathBuf::from(entry.name());
        if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(format!(
                "wheel entry {:?} leaves the install directory",
                entry.name()
            ));
        }
        let path = dest.join(&rel);
        if entry.is_dir() {
            std::fs::create_dir_all(&path).map_err(|e| e.to_string())?;
            continue;
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(|e| e.to_string())?;
        std::fs::write(&path, data).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// World-readable (the sandbox runs as uid 65534), never writable by it.
fn make_readable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.is_dir() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
            make_readable(&p)?;
        } else {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions() {
        assert_eq!(normalize("Foo_Bar.baz"), "foo-bar-baz");
        assert!(satisfies("1.16.0", ">=1.16,<2"));
        assert!(!satisfies("2.0", ">=1.16,<2"));
        assert!(satisfies("1.5", ""));
        assert!(!satisfies("1.5", "!=1.5"));
        assert!(satisfies("1.10", ">1.9"));
        assert!(parse_request("six==1.16.0").is_ok());
        for bad in ["", "six; rm -rf /", "six==", "../six", "six==1.0 && x"] {
            assert!(parse_request(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allowlist_decisions() {
        let mut allow = AllowlistFile::new();
        allow.insert(
            "python".into(),
            [("six".to_owned(), ">=1.16,<2".to_owned())].into(),
        );
        let d = Dependencies::new(allow, None, PathBuf::from("/nonexistent"));
        assert!(
            d.check("t", "python", &["six".into(), "Six==1.16.0".into()])
                .is_ok()
        );
        for (req, runtime) in [
            ("requests", "python"),
            ("six==2.0", "python"),
            ("six", "node"),
        ] {
            let e = d.check("t", runtime, &[req.into()]).unwrap_err();
            assert_eq!(e.code, ErrorCode::DependencyNotAllowed, "{req}");
            assert!(e.message.contains(req), "{}", e.message);
        }
    }

    #[test]
    fn zip_slip_is_refused() {
        let mut buf = std::io::Cursor::new(Vec::new());
        {
            let mut w = zip::ZipWriter::new(&mut buf);
            w.start_file("../evil.py", zip::write::SimpleFileOptions::default())
                .unwrap();
            std::io::Write::write_all(&mut w, b"x").unwrap();
            w.finish().unwrap();
        }
        let tmp = tempfile::tempdir().unwrap();
        assert!(
            extract_wheel(buf.get_ref(), &tmp.path().join("d"))
                .unwrap_err()
                .contains("leaves")
        );
        assert!(!tmp.path().join("evil.py").exists());
    }
}
