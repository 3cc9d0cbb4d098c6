//! The deployment environment (`ENV`) and the guard for development-only flags.

/// True when `ENV` names production (`production` or `prod`, any case).
pub fn is_production(env: &str) -> bool {
    matches!(
        env.trim().to_ascii_lowercase().as_str(),
        "production" | "prod"
    )
}

/// Refuses a development-only flag in production, naming the variable.
pub fn refuse_in_production(env: &str, flag: &str, enabled: bool) -> Result<(), String> {
    if enabled && is_production(env) {
        return Err(format!(
            "{flag} must not be enabled when ENV={env}: refusing to start"
        ));
    }
    Ok(())
}

/// Stops start-up on a configuration error: one line on stderr naming what
/// is wrong, exit code 2 (as clap does for a bad flag), and no backtrace,
/// whatever `RUST_BACKTRACE` says. Backtraces stay for real bugs.
pub fn exit_on_config_error(binary: &str, message: impl std::fmt::Display) -> ! {
    eprintln!("{binary}: configuration error: {message}");
    std::process::exit(2)
}

/// Ends the process after `run` returned: `Ok` passes through; an error (a
/// port in use, an unreachable database, an unreadable key file) is one line
/// with its causes and exit code 1. Panics, the real bugs, keep their
/// backtraces.
pub fn exit_on_run_error<E: std::fmt::Display>(
    binary: &str,
    result: Result<(), E>,
) -> Result<(), E> {
    if let Err(e) = result {
        // `{:#}` prints anyhow's chain of causes on the one line.
        eprintln!("{binary}: {e:#}");
        std::process::exit(1)
    }
    Ok(())
}

/// Where development keys live when no credential is configured outside
/// production: the directory `make run-local` keeps them in.
pub const DEV_KEY_DIR: &str = ".local";

/// The development keys, one file each in [`DEV_KEY_DIR`]: the same files
/// `make run-local` uses, so a plane started alone joins the same stack.
pub mod dev_keys {
    /// Signs the service credential (the data plane's `AUTH_JWT_SECRET`, the
    /// control plane's `DATA_PLANE_JWT_SECRET`).
    pub const SERVICE: &str = "dev-jwt-secret";
    /// Signs callers' tokens (the control plane's `AUTH_JWT_SECRET`).
    pub const USER: &str = "dev-user-jwt-secret";
    /// The session agent's admin credential (`SESSION_AGENT_ADMIN_TOKEN`).
    pub const AGENT_ADMIN: &str = "dev-agent-admin-token";
}

/// Fills an unset credential with a development key outside production:
/// `dir/name`, created on first use (64 hex characters of 256 random bits,
/// mode 0600, directory 0700) and shared by every plane started from the
/// same directory. Says so loudly once, naming the variable and the file.
/// In production an unset credential stays unset, so validation refuses it.
pub fn dev_key_fallback(
    slot: &mut Option<String>,
    environment: &str,
    variable: &str,
    dir: &std::path::Path,
    name: &str,
) -> Result<(), String> {
    if is_production(environment) || slot.as_deref().is_some_and(|s| !s.is_empty()) {
        return Ok(());
    }
    let path = dir.join(name);
    let (key, created) = read_or_create_key(dir, &path).map_err(|e| {
        format!(
            "{variable} is not set and the development key {} could not be used: {e}",
            path.display()
        )
    })?;
    eprintln!(
        "WARNING: {variable} is not set: using the development key in {} ({}). \
         Never use it in production (ENV=production refuses to start without real keys).",
        path.display(),
        if created { "generated now" } else { "existing" },
    );
    *slot = Some(key);
    Ok(())
}

fn read_or_create_key(
    dir: &std::path::Path,
    path: &std::path::Path,
) -> std::io::Result<(String, bool)> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let read = |p: &std::path::Path| -> std::io::Result<String> {
        let key = std::fs::read_to_string(p)?.trim().to_owned();
        if key.len() < 32 {
            return Err(std::io::Error::other(
                "the file holds fewer than 32 characters",
            ));
        }
        Ok(key)
    };
    match read(path) {
        Ok(key) => return Ok((key, false)),
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        Err(_) => {}
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // Written whole under a temporary name, then linked into place: a plane
    // starting at the same moment reads either nothing or the whole key.
    let key = hex::encode(rand::random::<[u8; 32]>());
    let tmp = dir.join(format!(
        ".{}.{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("key"),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(key.as_bytes())?;
    f.sync_all()?;
    drop(f);
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok((key, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok((read(path)?, false)),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn production_names() {
        assert!(is_production("production"));
        assert!(is_production("PROD"));
        assert!(!is_production("dev"));
        assert!(refuse_in_production("production", "AUTHZ_BYPASS", true).is_err());
        assert!(refuse_in_production("production", "AUTHZ_BYPASS", false).is_ok());
        assert!(refuse_in_production("dev", "AUTHZ_BYPASS", true).is_ok());
    }

    #[test]
    fn dev_keys_are_private_shared_and_never_used_in_production() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("dev-keys-{}", std::process::id()));
        let dir = base.join(".local");
        let mut a = None;
        dev_key_fallback(&mut a, "dev", "AUTH_JWT_SECRET", &dir, dev_keys::SERVICE).unwrap();
        let key = a.clone().unwrap();
        assert_eq!(key.len(), 64);
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(dev_keys::SERVICE)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        // A second plane gets the same key.
        let mut b = None;
        dev_key_fallback(
            &mut b,
            "dev",
            "DATA_PLANE_JWT_SECRET",
            &dir,
            dev_keys::SERVICE,
        )
        .unwrap();
        assert_eq!(b.as_deref(), Some(key.as_str()));
        // A configured credential is kept; production never falls back.
        let mut c = Some("configured".to_owned());
        dev_key_fallback(&mut c, "dev", "X", &dir, dev_keys::SERVICE).unwrap();
        assert_eq!(c.as_deref(), Some("configured"));
        let mut d = None;
        dev_key_fallback(&mut d, "production", "X", &dir, dev_keys::USER).unwrap();
        assert_eq!(d, None);
        assert!(!dir.join(dev_keys::USER).exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
