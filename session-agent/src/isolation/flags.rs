//! The runsc flags that weaken gVisor's isolation and are refused for tenant
//! sandboxes (../shared/design/SECURITY.md, gVisor `runsc/config/flags.go`).

/// Why a runsc flag was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("runsc flag {flag:?} weakens sandbox isolation and is refused: {reason}")]
pub struct RefusedFlag {
    pub flag: String,
    pub reason: &'static str,
}

/// Checks one runsc global flag (`--name=value`, `--name value` given as one
/// string, or `-name`). Accepts everything not on the deny list.
pub fn check_runsc_flag(flag: &str) -> Result<(), RefusedFlag> {
    let trimmed = flag.trim();
    let body = trimmed.trim_start_matches('-');
    let (name, value) = match body.split_once(['=', ' ']) {
        Some((n, v)) => (n.trim(), Some(v.trim())),
        None => (body, None),
    };
    let name = name.to_ascii_lowercase();
    let value = value.map(str::to_ascii_lowercase);
    let is_false = matches!(value.as_deref(), Some("false" | "0"));
    let refuse = |reason| {
        Err(RefusedFlag {
            flag: trimmed.to_owned(),
            reason,
        })
    };
    match name.as_str() {
        "network" if value.as_deref() != Some("none") => {
            refuse("sandboxes get no network but loopback (--network=none)")
        }
        "net-raw" if !is_false => refuse("raw sockets allow packet crafting"),
        "allow-flag-override" if !is_false => {
            refuse("lets container annotations override runsc flags")
        }
        "rootless" if !is_false => {
            refuse("rootless mode drops the gofer's and sentry's privilege separation")
        }
        "ignore-cgroups" if !is_false => refuse("without cgroups no memory or CPU limit applies"),
        "host-uds" if value.as_deref() != Some("none") => {
            refuse("host Unix sockets would be reachable from the sandbox")
        }
        "fsgofer-host-uds" if !is_false => {
            refuse("host Unix sockets would be reachable from the sandbox")
        }
        "debug" | "strace" if !is_false => {
            refuse("debug and strace output can leak sandbox data into host logs")
        }
        n if n.starts_with("debug-log") || n.starts_with("strace-") => {
            refuse("debug and strace output can leak sandbox data into host logs")
        }
        n if n.starts_with("profile") && !is_false => {
            refuse("profiling endpoints expose the sentry to the host")
        }
        n if n.starts_with("testonly") => refuse("TESTONLY flags disable security checks"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(flag: &str) {
        assert!(check_runsc_flag(flag).is_err(), "{flag} must be refused");
    }

    #[test]
    fn network_host() {
        refused("--network=host");
        refused("--network=sandbox");
        refused("-network host");
        assert!(check_runsc_flag("--network=none").is_ok());
    }

    #[test]
    fn net_raw() {
        refused("--net-raw");
        refused("--net-raw=true");
        assert!(check_runsc_flag("--net-raw=false").is_ok());
    }

    #[test]
    fn allow_flag_override() {
        refused("--allow-flag-override");
        refused("--allow-flag-override=true");
    }

    #[test]
    fn profile() {
        refused("--profile");
        refused("--profile-cpu=/tmp/x");
        refused("--profile-block=/tmp/x");
    }

    #[test]
    fn debug_and_strace() {
        refused("--debug");
        refused("--debug-log=/tmp/runsc/");
        refused("--strace");
        refused("--strace-syscalls=open");
    }

    #[test]
    fn host_uds() {
        refused("--host-uds=all");
        refused("--host-uds=open");
        refused("--fsgofer-host-uds");
        assert!(check_runsc_flag("--host-uds=none").is_ok());
    }

    #[test]
    fn rootless() {
        refused("--rootless");
        refused("--rootless=true");
    }

    #[test]
    fn ignore_cgroups() {
        refused("--ignore-cgroups");
    }

    #[test]
    fn testonly() {
        refused("--TESTONLY-unsafe-nonroot");
        refused("--testonly-test-name-env=X");
    }

    #[test]
    fn harmless_flags_pass() {
        for ok in [
            "--platform=ptrace",
            "--overlay",
            "--watchdog-action=panic",
            "--num-network-channels=1",
        ] {
            assert!(check_runsc_flag(ok).is_ok(), "{ok}");
        }
    }
}
