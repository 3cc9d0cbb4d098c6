//! Validated ids. Every id a caller sends (session, job, step, artifact,
//! workflow, tenant) is parsed into one of these types at the edge of each
//! plane, and only the type travels inward: a path, storage key, SQL query or
//! URL to the next plane is never built from an unchecked string.
//!
//! The alphabet is deliberately small. Ids become file names, cgroup names,
//! Redis keys, S3 keys and Kubernetes label values, so they can never hold a
//! `/`, `\`, NUL, `%`, whitespace or a leading `.` (which rules out `.` and
//! `..` themselves). Percent-decoding happens before parsing, so `..%2F`,
//! `%2e%2e`, `%252e` (double encoding, which leaves a `%`) and `%00` are all
//! refused here.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why an id was refused; the message names the id's field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub String);

/// Checks a generic id: 1-128 of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn check_id(kind: &str, id: &str) -> Result<(), InvalidId> {
    if id.is_empty() || id.len() > 128 {
        return Err(InvalidId(format!("{kind} must be 1-128 characters")));
    }
    if id.starts_with('.') {
        return Err(InvalidId(format!("{kind} must not start with '.'")));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(InvalidId(format!(
            "{kind} may contain only letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// Checks a tenant name: 1-63 of lowercase letters, digits, `-` and `_`,
/// starting and ending with a letter or digit. It is a valid DNS label and
/// Kubernetes label value, and never `-`, `_`, `.` or anything path-like.
pub fn check_tenant(id: &str) -> Result<(), InvalidId> {
    let ok_len = !id.is_empty() && id.len() <= 63;
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let ok_chars = id.bytes().all(|b| alnum(b) || matches!(b, b'-' | b'_'));
    let ok_ends = id.bytes().next().is_some_and(alnum) && id.bytes().last().is_some_and(alnum);
    if ok_len && ok_chars && ok_ends {
        Ok(())
    } else {
        Err(InvalidId(
            "tenant must be 1-63 lowercase letters, digits, '-' or '_', starting and ending with a letter or digit".into(),
        ))
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// The field name used in error messages.
            pub const KIND: &'static str = $kind;

            /// Parses and validates an id.
            pub fn parse(s: impl Into<String>) -> Result<Self, InvalidId> {
                let s = s.into();
                let check: fn(&str) -> Result<(), InvalidId> = $check;
                check(&s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                Self::parse(s)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::parse(s).map_err(serde::de::Error::custom)
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                String::schema()
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}
    };
}

id_type!(
    /// A session id (client-chosen or generated).
    SessionId, "sessionId", |s| check_id("sessionId", s)
);
id_type!(
    /// A one-shot job id.
    JobId, "jobId", |s| check_id("jobId", s)
);
id_type!(
    /// A step id within a session.
    StepId, "stepId", |s| check_id("stepId", s)
);
id_type!(
    /// An artifact id (`art-<hex>` when generated by the data plane).
    ArtifactId, "artifactId", |s| check_id("artifactId", s)
);
id_type!(
    /// A workflow id.
    WorkflowId, "workflowId", |s| check_id("workflowId", s)
);
id_type!(
    /// A tenant name, taken from a verified token.
    TenantId, "tenant", check_tenant
);

/// Builds a `/`-joined storage key from validated parts, refusing any part
/// that could change the key's shape (`/`, `\`, `..`, NUL, anything outside
/// the id alphabet, empty). The second line behind the typed ids: even a part
/// that skipped parsing cannot escape its prefix.
pub fn storage_key(parts: &[&str]) -> Result<String, InvalidId> {
    for part in parts {
        let ok = !part.is_empty()
            && !part.starts_with('.')
            && part.len() <= 256
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            return Err(InvalidId(format!(
                "storage key part {part:?} is outside the id alphabet"
            )));
        }
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every traversal form a client could send, after the one
    /// percent-decoding the HTTP layer applies.
    pub const HOSTILE: &[&str] = &[
        "",
        ".",
        "..",
        "../other/art-1",
        "..\\other",
        "%2e%2e",
        "%2e%2e%2fother",
        "%252e%252e%252f",
        "a\0b",
        "/etc/passwd",
        "\\etc",
        "a/b",
        "a b",
        "ä",
        ".hidden",
        "x\r\ny",
    ];

    #[test]
    fn generic_ids() {
        assert!(SessionId::parse("session-1").is_ok());
        assert!(ArtifactId::parse("art-0123abcd").is_ok());
        assert!(JobId::parse("a.b_c-D9").is_ok());
        assert!(JobId::parse("x".repeat(128)).is_ok());
        assert!(JobId::parse("x".repeat(129)).is_err());
        for bad in HOSTILE {
            assert!(ArtifactId::parse(*bad).is_err(), "{bad:?}");
            assert!(SessionId::parse(*bad).is_err(), "{bad:?}");
            assert!(storage_key(&["meta", bad]).is_err(), "{bad:?}");
        }
        let e = StepId::parse("a/b").unwrap_err();
        assert!(e.0.contains("stepId"), "{e}");
    }

    #[test]
    fn tenants() {
        for ok in ["acme", "demo", "a", "t1", "tenant-a", "a_b", "0x"] {
            assert!(TenantId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "-",
            "_",
            "-a",
            "a-",
            "Acme",
            "a.b",
            "a b",
            "",
            &"a".repeat(64),
        ] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?}");
        }
        for bad in HOSTILE {
            assert!(TenantId::parse(*bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serde_validates() {
        assert!(serde_json::from_str::<ArtifactId>(r#""../x""#).is_err());
        let id: ArtifactId = serde_json::from_str(r#""art-1""#).unwrap();
        assert_eq!(serde_json::to_string(&id).unwrap(), r#""art-1""#);
    }

    #[test]
    fn storage_keys() {
        assert_eq!(
            storage_key(&["meta", "acme", "art-1.json"]).unwrap(),
            "meta/acme/art-1.json"
        );
    }
}
