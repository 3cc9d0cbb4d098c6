//! The data plane's secret source (issue 19 §4, decision 8): where the value
//! of a secret a session or job names comes from. Values are scoped by
//! tenant in every source, so a name resolves only to the caller's tenant's
//! value, whatever policy allowed:
//!
//! - `SECRETS_DIR` (development, local backend): the file
//!   `<SECRETS_DIR>/<tenant>/<NAME>` (one trailing newline is dropped).
//! - `RUNTIME_SECRETS_NAME` (the `k8s` backend): the key `<tenant>.<NAME>`
//!   of that Kubernetes Secret in `RUNTIME_NAMESPACE`, read through the API
//!   at each creation (`runtime::k8s::K8sBackend::read_secret`).
//!
//! A name without a value is 404 `secret_not_found` naming it, before any
//! sandbox exists. Values are held as [`SecretValue`] (zeroed on drop, `***`
//! in `Debug`) and leave this process only in the agent's create-session call.

use std::path::PathBuf;

use shared::ids::TenantId;
use shared::secrets::{MAX_SECRET_VALUE_BYTES, SecretEnv, SecretValue, check_names};
use shared::{CodedError, ErrorCode};

/// Where secret values come from.
#[derive(Debug, Clone, Default)]
pub enum SecretSource {
    /// None configured: every named secret is `secret_not_found`.
    #[default]
    None,
    /// `<dir>/<tenant>/<NAME>` files.
    Dir(PathBuf),
    /// The backend's Kubernetes Secret.
    K8s(crate::runtime::k8s::K8sBackend),
}

fn not_found(name: &str) -> CodedError {
    CodedError::new(
        ErrorCode::SecretNotFound,
        format!("secret {name:?} has no value for this tenant; nothing was started"),
    )
}

/// A value as read: bounded, UTF-8, one trailing newline dropped.
pub(crate) fn value_of(name: &str, mut raw: Vec<u8>) -> Result<SecretValue, CodedError> {
    let bad = |why: &str| {
        tracing::error!(secret = %name, "the secret source's value is unusable: {why}");
        CodedError::new(
            ErrorCode::SecretNotFound,
            format!(
                "secret {name:?} has no usable value for this tenant ({why}); nothing was started"
            ),
        )
    };
    if raw.ends_with(b"\n") {
        raw.pop();
        if raw.ends_with(b"\r") {
            raw.pop();
        }
    }
    let out = if raw.len() > MAX_SECRET_VALUE_BYTES {
        Err(bad(&format!("longer than {MAX_SECRET_VALUE_BYTES} bytes")))
    } else if raw.contains(&0) {
        Err(bad("it contains a NUL byte"))
    } else if raw.is_empty() {
        Err(bad("it is empty"))
    } else {
        match String::from_utf8(std::mem::take(&mut raw)) {
            Ok(s) => Ok(SecretValue::new(s)),
            Err(e) => {
                let mut bytes = e.into_bytes();
                zeroize::Zeroize::zeroize(&mut bytes);
                Err(bad("it is not UTF-8"))
            }
        }
    };
    zeroize::Zeroize::zeroize(&mut raw);
    out
}

impl SecretSource {
    /// Which source this is, for the start-up log.
    pub fn describe(&self) -> String {
        match self {
            SecretSource::None => "none".into(),
            SecretSource::Dir(d) => format!("dir {}", d.display()),
            SecretSource::K8s(_) => "kubernetes secret".into(),
        }
    }

    /// The values of `names` for `tenant`; 400 on a bad name, 404
    /// `secret_not_found` naming the first that has no value.
    pub async fn resolve(
        &self,
        tenant: &TenantId,
        names: &[String],
    ) -> Result<SecretEnv, CodedError> {
        check_names(names)
            .map_err(|m| CodedError::new(ErrorCode::InvalidArgument, format!("secrets: {m}")))?;
        let mut env = SecretEnv::new();
        for name in names {
            let value = match self {
                SecretSource::None => return Err(not_found(name)),
                SecretSource::Dir(dir) => {
                    // Both parts are validated (`TenantId`, `check_names`):
                    // no separator, no `..`, so the path stays under `dir`.
                    let path = dir.join(tenant.as_str()).join(name);
                    match tokio::fs::read(&path).await {
                        Ok(raw) => value_of(name, raw)?,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                            return Err(not_found(name));
                        }
                        Err(e) => {
                            tracing::error!(secret = %name, tenant = %tenant, error = %e, "SECRETS_DIR: reading a secret failed");
                            return Err(CodedError::new(
                                ErrorCode::SecretNotFound,
                                format!("secret {name:?} could not be read; nothing was started"),
                            ));
                        }
                    }
                }
                SecretSource::K8s(backend) => match backend.read_secret(tenant, name).await? {
                    Some(v) => v,
                    None => return Err(not_found(name)),
                },
            };
            env.insert(name.clone(), value);
        }
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant(t: &str) -> TenantId {
        TenantId::parse(t).unwrap()
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn a_dir_source_resolves_only_the_callers_tenants_values() {
        let dir = tempfile::tempdir().unwrap();
        for (t, name, value) in [
            ("acme", "DB_PASSWORD", "acme-value\n"),
            ("globex", "DB_PASSWORD", "globex-value"),
            ("globex", "ONLY_GLOBEX", "g2"),
        ] {
            std::fs::create_dir_all(dir.path().join(t)).unwrap();
            std::fs::write(dir.path().join(t).join(name), value).unwrap();
        }
        let src = SecretSource::Dir(dir.path().to_owned());
        let env = src
            .resolve(&tenant("acme"), &names(&["DB_PASSWORD"]))
            .await
            .unwrap();
        assert_eq!(env["DB_PASSWORD"].expose(), "acme-value");
        let env = src
            .resolve(&tenant("globex"), &names(&["DB_PASSWORD"]))
            .await
            .unwrap();
        assert_eq!(env["DB_PASSWORD"].expose(), "globex-value");
        // Another tenant's name is not found for acme, naming the name.
        let e = src
            .resolve(&tenant("acme"), &names(&["DB_PASSWORD", "ONLY_GLOBEX"]))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::SecretNotFound);
        assert!(e.message.contains("ONLY_GLOBEX"), "{e}");
        // A tenant without a folder, and no source at all.
        let e = src
            .resolve(&tenant("initech"), &names(&["DB_PASSWORD"]))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::SecretNotFound);
        let e = SecretSource::None
            .resolve(&tenant("acme"), &names(&["DB_PASSWORD"]))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::SecretNotFound);
        // Bad names never become a path.
        for bad in ["../globex/DB_PASSWORD", "db_password", "A/B", ""] {
            let e = src
                .resolve(&tenant("acme"), &names(&[bad]))
                .await
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn unusable_values_are_refused_without_echoing_them() {
        assert_eq!(value_of("A", b"v\r\n".to_vec()).unwrap().expose(), "v");
        for raw in [
            b"".to_vec(),
            b"\n".to_vec(),
            b"a\0b".to_vec(),
            vec![0xff, 0xfe],
            vec![b'x'; MAX_SECRET_VALUE_BYTES + 1],
        ] {
            let e = value_of("A", raw).unwrap_err();
            assert_eq!(e.code, ErrorCode::SecretNotFound);
            assert!(!e.message.contains("xxxx"), "{e}");
        }
    }
}
