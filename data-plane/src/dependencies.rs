//! The dependency allowlist (decision 4): a session's packages are checked
//! against a per-runtime allowlist, every decision is audited, and allowed
//! ones are installed here, outside the sandbox, from a package index into a
//! content-addressed cache that the agent mounts read-only on the import
//! path. Code in a sandbox never reaches a package index.
//!
//! Python: pure wheels (`py3-none-any`), names PEP 503-normalised, versions
//! and allowlist specifiers parsed as PEP 440 (`pep440_rs`). Node: npm
//! tarballs (`<name>-<version>.tgz`, unscoped), names compared exactly,
//! versions and ranges parsed as semver (`semver`); a tarball is installed
//! only when its own `package.json` carries the requested name and the
//! version its file name says. Pre-releases are installed only when pinned
//! exactly. Both from a local index directory (`DEPENDENCY_INDEX_DIR`).
//!
//! A request lists at most [`MAX_PACKAGES`] packages, each once; that is
//! refused before any file is read. Index files are hashed as a stream and
//! the digest is cached by path, size and mtime.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Seek};
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use shared::CodedError;
use shared::ErrorCode;
pub use shared::dataplane::MAX_PACKAGES;

/// `{"python": {"six": ">=1.16,<2", "attrs": ""}}`: a package name and the
/// versions allowed ("" = any).
pub type AllowlistFile = BTreeMap<String, BTreeMap<String, String>>;

/// Longest version pin in a request.
const MAX_PIN_LEN: usize = 64;
/// Largest `package.json` read from a tarball.
const MAX_PACKAGE_JSON: u64 = 1024 * 1024;

/// What identifies an index file's content without reading it again.
type FileStamp = (u64, Option<SystemTime>);

/// What is known of an index file (valid while its stamp holds).
#[derive(Debug, Clone)]
struct Known {
    stamp: FileStamp,
    digest: String,
    /// npm: whether its `package.json` matched its file name.
    verified: Option<bool>,
}

/// Allowlist, index and cache.
#[derive(Debug, Clone, Default)]
pub struct Dependencies {
    allow: AllowlistFile,
    index: Option<PathBuf>,
    cache: PathBuf,
    known: Arc<Mutex<HashMap<PathBuf, Known>>>,
}

/// The package ecosystem of a runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ecosystem {
    PyPi,
    Npm,
}

impl Ecosystem {
    fn of(runtime: &str) -> Option<Self> {
        match runtime {
            "python" => Some(Ecosystem::PyPi),
            "node" => Some(Ecosystem::Npm),
            _ => None,
        }
    }

    /// The name as the allowlist and the index compare it: PEP 503 for
    /// PyPI, verbatim for npm (`a.b` and `a-b` are two npm packages).
    fn name(self, name: &str) -> String {
        match self {
            Ecosystem::PyPi => normalize(name),
            Ecosystem::Npm => name.trim().to_owned(),
        }
    }
}

/// A parsed version of either ecosystem.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Version {
    Py(pep440_rs::Version),
    Npm(semver::Version),
}

impl Version {
    fn parse(eco: Ecosystem, v: &str) -> Option<Version> {
        match eco {
            Ecosystem::PyPi => pep440_rs::Version::from_str(v).ok().map(Version::Py),
            Ecosystem::Npm => semver::Version::parse(v).ok().map(Version::Npm),
        }
    }

    fn is_prerelease(&self) -> bool {
        match self {
            Version::Py(v) => v.any_prerelease(),
            Version::Npm(v) => !v.pre.is_empty(),
        }
    }
}

/// An allowlist entry's versions ("" = any).
#[derive(Debug, Clone)]
enum Spec {
    Any,
    Py(pep440_rs::VersionSpecifiers),
    Npm(semver::VersionReq),
}

impl Spec {
    fn parse(eco: Ecosystem, spec: &str) -> Result<Spec, String> {
        let spec = spec.trim();
        if spec.is_empty() || spec == "*" {
            return Ok(Spec::Any);
        }
        match eco {
            Ecosystem::PyPi => pep440_rs::VersionSpecifiers::from_str(spec)
                .map(Spec::Py)
                .map_err(|e| format!("{spec:?} is not a PEP 440 specifier: {e}")),
            Ecosystem::Npm => semver::VersionReq::parse(spec)
                .map(Spec::Npm)
                .map_err(|e| format!("{spec:?} is not a semver range: {e}")),
        }
    }

    fn contains(&self, v: &Version) -> bool {
        match (self, v) {
            (Spec::Any, _) => true,
            (Spec::Py(s), Version::Py(v)) => s.contains(v),
            (Spec::Npm(r), Version::Npm(v)) => r.matches(v),
            _ => false,
        }
    }
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

/// Whether `version` satisfies the allowlist spec of `runtime`'s ecosystem
/// (PEP 440 specifiers for python, a semver range for node). A version or
/// spec that does not parse strictly satisfies nothing.
pub fn satisfies(runtime: &str, version: &str, spec: &str) -> bool {
    let Some(eco) = Ecosystem::of(runtime) else {
        return false;
    };
    match (Version::parse(eco, version), Spec::parse(eco, spec)) {
        (Some(v), Ok(s)) => s.contains(&v),
        _ => false,
    }
}

/// A requested package, checked: its compared name and exact version pin.
#[derive(Debug, Clone)]
pub struct Checked {
    name: String,
    pin: Option<Version>,
}

fn invalid(m: String) -> CodedError {
    CodedError::new(ErrorCode::InvalidArgument, m)
}

/// A requested package: `name` or `name==version`, the version strict for
/// the ecosystem (no ecosystem: nothing is allowed anyway).
fn parse_request(
    eco: Option<Ecosystem>,
    req: &str,
) -> Result<(String, Option<Version>), CodedError> {
    let bad = || invalid(format!("package {req:?} is not `name` or `name==version`"));
    let (name, pin) = match req.split_once("==") {
        Some((n, v)) => (n.trim(), Some(v.trim())),
        None => (req.trim(), None),
    };
    if name.is_empty()
        || name.len() > 128
        || !name.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(bad());
    }
    if pin.is_some_and(|v| {
        v.is_empty()
            || v.len() > MAX_PIN_LEN
            || !v
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+-!".contains(c))
    }) {
        return Err(bad());
    }
    let Some(eco) = eco else {
        return Ok((name.to_owned(), None));
    };
    let pin = match pin {
        Some(v) => Some(Version::parse(eco, v).ok_or_else(|| {
            invalid(format!(
                "package {req:?}: {v:?} is not a {} version",
                match eco {
                    Ecosystem::PyPi => "PEP 440",
                    Ecosystem::Npm => "semver",
                }
            ))
        })?),
        None => None,
    };
    Ok((eco.name(name), pin))
}

impl Dependencies {
    pub fn new(allow: AllowlistFile, index: Option<PathBuf>, cache: PathBuf) -> Self {
        Dependencies {
            allow,
            index,
            cache,
            known: Arc::default(),
        }
    }

    /// Reads `DEPENDENCY_ALLOWLIST_PATH` (absent: nothing is allowed). Python
    /// names are PEP 503-normalised, npm names kept as written; every spec
    /// must parse strictly for its ecosystem.
    pub fn load_allowlist(path: Option<&Path>) -> Result<AllowlistFile, String> {
        let Some(path) = path else {
            return Ok(AllowlistFile::new());
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("DEPENDENCY_ALLOWLIST_PATH {}: {e}", path.display()))?;
        let raw: AllowlistFile = serde_json::from_str(&text)
            .map_err(|e| format!("DEPENDENCY_ALLOWLIST_PATH {}: {e}", path.display()))?;
        let mut out = AllowlistFile::new();
        for (runtime, pkgs) in raw {
            let eco = Ecosystem::of(&runtime);
            let mut m = BTreeMap::new();
            for (name, spec) in pkgs {
                if let Some(eco) = eco {
                    Spec::parse(eco, &spec).map_err(|e| {
                        format!(
                            "DEPENDENCY_ALLOWLIST_PATH {}: {runtime} {name}: {e}",
                            path.display()
                        )
                    })?;
                }
                let name = eco.map_or_else(|| name.clone(), |e| e.name(&name));
                m.insert(name, spec);
            }
            out.insert(runtime, m);
        }
        Ok(out)
    }

    /// The allowlist spec of `name`, if it is allowed at all.
    fn spec(&self, runtime: &str, name: &str) -> Option<Spec> {
        let eco = Ecosystem::of(runtime)?;
        let raw = self.allow.get(runtime)?.get(name)?;
        Spec::parse(eco, raw).ok()
    }

    /// Checks every package against the runtime's allowlist. A list longer
    /// than [`MAX_PACKAGES`], a malformed entry or a package listed twice is
    /// 400 `invalid_argument` before any decision; then each decision is
    /// audited and the first refusal is a 403 naming the package. Nothing
    /// here reads a file.
    pub fn check(
        &self,
        tenant: &str,
        runtime: &str,
        packages: &[String],
    ) -> Result<Vec<Checked>, CodedError> {
        if packages.len() > MAX_PACKAGES {
            return Err(invalid(format!(
                "{} packages requested; at most {MAX_PACKAGES} are allowed",
                packages.len()
            )));
        }
        let eco = Ecosystem::of(runtime);
        let mut parsed = Vec::with_capacity(packages.len());
        let mut seen = BTreeSet::new();
        for req in packages {
            let (name, pin) = parse_request(eco, req)?;
            if !seen.insert(name.clone()) {
                return Err(invalid(format!(
                    "package {name:?} is listed more than once"
                )));
            }
            parsed.push((req, name, pin));
        }
        let mut out = Vec::with_capacity(parsed.len());
        for (req, name, pin) in parsed {
            let spec = self.spec(runtime, &name);
            let ok = match (&spec, &pin) {
                (None, _) => false,
                (Some(spec), Some(v)) => spec.contains(v),
                (Some(_), None) => true,
            };
            tracing::info!(target: "audit", tenant, runtime, package = %req, decision = if ok { "allow" } else { "deny" },
                "dependency decision");
            if !ok {
                return Err(CodedError::new(
                    ErrorCode::DependencyNotAllowed,
                    format!("package {req:?} is not on the {runtime} allowlist"),
                ));
            }
            out.push(Checked { name, pin });
        }
        Ok(out)
    }

    /// Installs checked packages into a content-addressed directory (reused
    /// when the same files were installed before) and returns it. Files are
    /// hashed as a stream and extracted from disk, never held whole.
    pub fn install(&self, runtime: &str, packages: &[Checked]) -> Result<PathBuf, CodedError> {
        let unavailable = |m: String| CodedError::new(ErrorCode::DependencyUnavailable, m);
        let eco = Ecosystem::of(runtime)
            .ok_or_else(|| unavailable(format!("runtime {runtime} has no package ecosystem")))?;
        let kind = match eco {
            Ecosystem::PyPi => "py",
            Ecosystem::Npm => "node",
        };
        let index = self.index.as_ref().ok_or_else(|| {
            unavailable("no package index is configured (DEPENDENCY_INDEX_DIR)".into())
        })?;
        let listing: Vec<(String, PathBuf)> = std::fs::read_dir(index)
            .map_err(|e| unavailable(format!("the package index cannot be read: {e}")))?
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        let mut files = Vec::new();
        for p in packages {
            let spec = self.spec(runtime, &p.name).unwrap_or(Spec::Any);
            let candidates = match eco {
                Ecosystem::PyPi => wheel_candidates(&listing, &p.name),
                Ecosystem::Npm => tarball_candidates(&listing, &p.name),
            };
            let mut eligible: Vec<(Version, PathBuf)> = candidates
                .into_iter()
                .filter(|(v, _)| match &p.pin {
                    Some(pin) => v == pin,
                    None => !v.is_prerelease(),
                })
                .filter(|(v, _)| spec.contains(v))
                .collect();
            // Newest first; the first that checks out wins.
            eligible.sort_by(|a, b| b.0.cmp(&a.0));
            let mut chosen = None;
            for (v, path) in eligible {
                let known = self
                    .know(&path, |f| match (eco, &v) {
                        (Ecosystem::Npm, Version::Npm(v)) => Some(tarball_matches(f, &p.name, v)),
                        _ => None,
                    })
                    .map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
                if known.verified == Some(false) {
                    tracing::warn!(package = %p.name, file = %path.display(), "index tarball's package.json does not match its file name; skipped");
                    continue;
                }
                chosen = Some((known.digest, path));
                break;
            }
            let (digest, path) = chosen.ok_or_else(|| {
                unavailable(format!(
                    "no allowed {runtime} package {} in the index",
                    p.name
                ))
            })?;
            files.push((digest, (p.name.clone(), path)));
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        files.dedup_by(|a, b| a.0 == b.0);
        let set: String = hex::encode(Sha256::digest(
            files
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
            for (_, (name, path)) in &files {
                let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
                match eco {
                    Ecosystem::PyPi => extract_wheel(file, &tmp)?,
                    Ecosystem::Npm => extract_npm(
                        std::io::BufReader::new(file),
                        &tmp.join("node_modules").join(name),
                    )?,
                }
            }
            make_readable(&tmp).map_err(|e| e.to_string())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(CodedError::new(
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

    /// The digest (and npm verification) of an index file, from the cache
    /// while its size and mtime are unchanged, else streamed from disk.
    fn know(
        &self,
        path: &Path,
        verify: impl FnOnce(&Path) -> Option<bool>,
    ) -> std::io::Result<Known> {
        let meta = std::fs::metadata(path)?;
        let stamp = (meta.len(), meta.modified().ok());
        if let Some(k) = self
            .known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(path)
            && k.stamp == stamp
        {
            return Ok(k.clone());
        }
        let digest = hash_file(path)?;
        let known = Known {
            stamp,
            digest,
            verified: verify(path),
        };
        self.known
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(path.to_owned(), known.clone());
        Ok(known)
    }
}

/// SHA-256 of a file, read in 64 KiB pieces.
fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Pure wheels of `name` in the index, with strictly parsed versions.
fn wheel_candidates(listing: &[(String, PathBuf)], name: &str) -> Vec<(Version, PathBuf)> {
    let mut out = Vec::new();
    for (file, path) in listing {
        let Some(stem) = file.strip_suffix(".whl") else {
            continue;
        };
        let parts: Vec<&str> = stem.split('-').collect();
        // name-version(-build)?-python-abi-platform
        if !(5..=6).contains(&parts.len()) || normalize(parts[0]) != name {
            continue;
        }
        let (abi, platform) = (parts[parts.len() - 2], parts[parts.len() - 1]);
        if abi != "none" || platform != "any" {
            continue;
        }
        if let Some(v) = Version::parse(Ecosystem::PyPi, parts[1]) {
            out.push((v, path.clone()));
        }
    }
    out
}

/// Tarballs `<name>-<semver>.tgz` in the index. The file name alone is not
/// trusted (`foo-2-1.0.0.tgz` starts with `foo-`): the version must be
/// strict semver here and the tarball's `package.json` is checked before
/// install ([`tarball_matches`]).
fn tarball_candidates(listing: &[(String, PathBuf)], name: &str) -> Vec<(Version, PathBuf)> {
    let mut out = Vec::new();
    for (file, path) in listing {
        let Some(version) = file
            .strip_suffix(".tgz")
            .and_then(|s| s.strip_prefix(name))
            .and_then(|s| s.strip_prefix('-'))
        else {
            continue;
        };
        if let Some(v) = Version::parse(Ecosystem::Npm, version) {
            out.push((v, path.clone()));
        }
    }
    out
}

/// Whether the tarball's own `package/package.json` names `name` at
/// `version`. Streams the archive and reads at most [`MAX_PACKAGE_JSON`].
fn tarball_matches(path: &Path, name: &str, version: &semver::Version) -> bool {
    let read = || -> Result<bool, String> {
        let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let mut archive =
            tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)));
        for entry in archive.entries().map_err(|e| e.to_string())? {
            let entry = entry.map_err(|e| e.to_string())?;
            let p = entry.path().map_err(|e| e.to_string())?.into_owned();
            let rel: PathBuf = p.components().skip(1).collect();
            if rel != Path::new("package.json")
                || entry.header().entry_type() != tar::EntryType::Regular
            {
                continue;
            }
            let mut text = Vec::new();
            entry
                .take(MAX_PACKAGE_JSON + 1)
                .read_to_end(&mut text)
                .map_err(|e| e.to_string())?;
            if text.len() as u64 > MAX_PACKAGE_JSON {
                return Ok(false);
            }
            #[derive(serde::Deserialize)]
            struct Manifest {
                name: String,
                version: String,
            }
            let Ok(m) = serde_json::from_slice::<Manifest>(&text) else {
                return Ok(false);
            };
            return Ok(
                m.name == name && semver::Version::parse(&m.version).is_ok_and(|v| v == *version)
            );
        }
        Ok(false)
    };
    read().unwrap_or(false)
}

/// Unpacks an npm tarball (gzip tar, files under `package/`) into `dest`,
/// regular files and directories only, nothing outside `dest`.
fn extract_npm(reader: impl Read, dest: &Path) -> Result<(), String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(reader));
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
                let mut out = std::fs::File::create(&target).map_err(|e| e.to_string())?;
                std::io::copy(&mut entry, &mut out).map_err(|e| e.to_string())?;
            }
            // Links and devices are never installed.
            _ => {}
        }
    }
    Ok(())
}

/// Unpacks a wheel (a zip) into `dest`, refusing entries that would land
/// outside it.
fn extract_wheel(reader: impl Read + Seek, dest: &Path) -> Result<(), String> {
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| format!("not a wheel: {e}"))?;
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
        let mut out = std::fs::File::create(&path).map_err(|e| e.to_string())?;
        std::io::copy(&mut entry, &mut out).map_err(|e| e.to_string())?;
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
    use std::io::Write;

    fn deps(allow: &[(&str, &str, &str)], index: Option<PathBuf>, cache: PathBuf) -> Dependencies {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let mut file = AllowlistFile::new();
        for (runtime, name, spec) in allow {
            file.entry((*runtime).to_owned())
                .or_default()
                .insert((*name).to_owned(), (*spec).to_owned());
        }
        std::fs::write(tmp.path(), serde_json::to_vec(&file).unwrap()).unwrap();
        let allow = Dependencies::load_allowlist(Some(tmp.path())).unwrap();
        Dependencies::new(allow, index, cache)
    }

    fn wheel(dir: &Path, name: &str, version: &str) {
        let file =
            std::fs::File::create(dir.join(format!("{name}-{version}-py3-none-any.whl"))).unwrap();
        let mut w = zip::ZipWriter::new(file);
        w.start_file(
            format!("{name}/__init__.py"),
            zip::write::SimpleFileOptions::default(),
        )
        .unwrap();
        w.write_all(format!("VERSION = {version:?}\n").as_bytes())
            .unwrap();
        w.finish().unwrap();
    }

    /// `<file>.tgz` whose package.json says `name` at `version`.
    fn tarball(dir: &Path, file: &str, name: &str, version: &str) {
        let out = std::fs::File::create(dir.join(format!("{file}.tgz"))).unwrap();
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            out,
            flate2::Compression::default(),
        ));
        let body = format!(r#"{{"name": "{name}", "version": "{version}"}}"#);
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "package/package.json", body.as_bytes())
            .unwrap();
        tar.into_inner().unwrap().finish().unwrap();
    }

    fn index() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let index = tmp.path().join("index");
        let cache = tmp.path().join("cache");
        std::fs::create_dir_all(&index).unwrap();
        std::fs::create_dir_all(&cache).unwrap();
        (tmp, index, cache)
    }

    #[test]
    fn names_and_versions() {
        assert_eq!(normalize("Foo_Bar.baz"), "foo-bar-baz");
        assert!(satisfies("python", "1.16.0", ">=1.16,<2"));
        assert!(!satisfies("python", "2.0", ">=1.16,<2"));
        assert!(satisfies("python", "1.5", ""));
        assert!(!satisfies("python", "1.5", "!=1.5"));
        assert!(satisfies("python", "1.10", ">1.9"));
        // PEP 440: a release candidate is not the release.
        assert!(!satisfies("python", "1.16.0rc1", "==1.16.0"));
        assert!(satisfies("node", "1.2.3", ">=1.0.0, <2.0.0"));
        assert!(!satisfies("node", "2.0.0-rc.1", ">=1.0.0, <2.0.0"));
        // Not strictly a version of the ecosystem: satisfies nothing.
        assert!(!satisfies("node", "2-1.0.0", ""));
        assert!(!satisfies("python", "1.x", ""));
        let py = Some(Ecosystem::PyPi);
        assert!(parse_request(py, "six==1.16.0").is_ok());
        for bad in [
            "",
            "six; rm -rf /",
            "six==",
            "../six",
            "six==1.0 && x",
            "six==not.a.version",
            "-six",
        ] {
            assert!(parse_request(py, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn allowlist_decisions() {
        let d = deps(
            &[("python", "six", ">=1.16,<2")],
            None,
            PathBuf::from("/nonexistent"),
        );
        assert!(
            d.check("t", "python", &["six".into()]).is_ok()
                && d.check("t", "python", &["Six==1.16.0".into()]).is_ok()
        );
        for (req, runtime) in [
            ("requests", "python"),
            ("six==2.0", "python"),
            ("six==1.16.0rc1", "python"),
            ("six", "node"),
        ] {
            let e = d.check("t", runtime, &[req.into()]).unwrap_err();
            assert_eq!(e.code, ErrorCode::DependencyNotAllowed, "{req}");
            assert!(e.message.contains(req), "{}", e.message);
        }
        // A bad spec in the allowlist file is a configuration error.
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), r#"{"node": {"x": "not a range"}}"#).unwrap();
        assert!(Dependencies::load_allowlist(Some(tmp.path())).is_err());
    }

    /// 1,500 copies of one allowed name (the attack) and a list over the cap
    /// are refused by the check, which reads no file: install never runs.
    #[test]
    fn duplicates_and_long_lists_are_refused_before_install() {
        let d = deps(
            &[("python", "six", "")],
            None,
            PathBuf::from("/nonexistent"),
        );
        let dups = vec!["six".to_owned(); 1500];
        let e = d.check("t", "python", &dups).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
        // Duplicates under normalisation too.
        let e = d
            .check("t", "python", &["six".into(), "Six==1.16".into()])
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
        assert!(e.message.contains("more than once"), "{}", e.message);
        let many: Vec<String> = (0..=MAX_PACKAGES).map(|i| format!("p{i}")).collect();
        let e = d.check("t", "python", &many).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
        assert!(e.message.contains("at most 64"), "{}", e.message);
    }

    /// `==1.16.0` must not install `1.16.0rc1` (the old comparison saw them
    /// as equal); unpinned, pre-releases are skipped.
    #[test]
    fn pins_are_exact_pep440() {
        let (_tmp, index, cache) = index();
        wheel(&index, "six", "1.16.0rc1");
        let d = deps(&[("python", "six", "")], Some(index.clone()), cache.clone());
        for req in ["six==1.16.0", "six"] {
            let checked = d.check("t", "python", &[req.into()]).unwrap();
            let e = d.install("python", &checked).unwrap_err();
            assert_eq!(
                e.code,
                ErrorCode::DependencyUnavailable,
                "{req}: {}",
                e.message
            );
        }
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
        wheel(&index, "six", "1.15.0");
        let checked = d.check("t", "python", &["six".into()]).unwrap();
        let dir = d.install("python", &checked).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("six/__init__.py")).unwrap(),
            "VERSION = \"1.15.0\"\n"
        );
        // Pinned exactly, the pre-release is what was asked for.
        let checked = d.check("t", "python", &["six==1.16.0rc1".into()]).unwrap();
        let dir = d.install("python", &checked).unwrap();
        assert!(
            std::fs::read_to_string(dir.join("six/__init__.py"))
                .unwrap()
                .contains("1.16.0rc1")
        );
    }

    /// Allowing npm `foo` must not install `foo-2` (file name prefix), nor a
    /// tarball whose package.json names another package; allowing `a.b`
    /// must not install `a-b` (no PyPI normalisation for npm).
    #[test]
    fn npm_names_are_exact_and_checked_in_the_tarball() {
        let (_tmp, index, cache) = index();
        tarball(&index, "foo-2-1.0.0", "foo-2", "1.0.0");
        tarball(&index, "a-b-1.0.0", "a-b", "1.0.0");
        let d = deps(
            &[("node", "foo", ""), ("node", "a.b", "")],
            Some(index.clone()),
            cache.clone(),
        );
        for req in ["foo", "a.b"] {
            let checked = d.check("t", "node", &[req.into()]).unwrap();
            let e = d.install("node", &checked).unwrap_err();
            assert_eq!(
                e.code,
                ErrorCode::DependencyUnavailable,
                "{req}: {}",
                e.message
            );
        }
        let e = d.check("t", "node", &["a-b".into()]).unwrap_err();
        assert_eq!(e.code, ErrorCode::DependencyNotAllowed, "{}", e.message);
        // A file named like `foo` whose package.json says `foo-2`.
        tarball(&index, "foo-1.0.0", "foo-2", "1.0.0");
        let checked = d.check("t", "node", &["foo".into()]).unwrap();
        let e = d.install("node", &checked).unwrap_err();
        assert_eq!(e.code, ErrorCode::DependencyUnavailable, "{}", e.message);
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);
        // The genuine one installs.
        tarball(&index, "foo-1.1.0", "foo", "1.1.0");
        tarball(&index, "a.b-1.0.0", "a.b", "1.0.0");
        let checked = d
            .check("t", "node", &["foo".into(), "a.b==1.0.0".into()])
            .unwrap();
        let dir = d.install("node", &checked).unwrap();
        assert!(
            std::fs::read_to_string(dir.join("node_modules/foo/package.json"))
                .unwrap()
                .contains("\"1.1.0\"")
        );
        assert!(dir.join("node_modules/a.b/package.json").is_file());
        assert!(!dir.join("node_modules/a-b").exists());
    }

    #[test]
    fn digests_are_cached_by_size_and_mtime() {
        let (_tmp, index, cache) = index();
        wheel(&index, "six", "1.0.0");
        let d = deps(&[("python", "six", "")], Some(index.clone()), cache);
        let path = index.join("six-1.0.0-py3-none-any.whl");
        let first = d.know(&path, |_| None).unwrap();
        assert_eq!(first.digest, hash_file(&path).unwrap());
        let again = d.know(&path, |_| panic!("verified twice")).unwrap();
        assert_eq!(again.digest, first.digest);
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
            extract_wheel(
                std::io::Cursor::new(buf.into_inner()),
                &tmp.path().join("d")
            )
            .unwrap_err()
            .contains("leaves")
        );
        assert!(!tmp.path().join("evil.py").exists());
    }
}
