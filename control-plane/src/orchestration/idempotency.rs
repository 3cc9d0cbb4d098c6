//! Idempotency keys (Stripe, IETF draft): scoped per tenant, kept at least
//! `IDEMPOTENCY_TTL`. The same key and request -> the saved status and body
//! of the first response; the same key with another request -> 422; a key
//! whose first request is still being processed -> 409.

use sha2::{Digest, Sha256};
use shared::CodedError;
use shared::ErrorCode;

/// Longest key accepted.
pub const MAX_KEY_LEN: usize = 255;

/// Checks a client's key: 1-255 visible ASCII characters.
pub fn validate_key(key: &str) -> Result<(), CodedError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(CodedError::new(
            ErrorCode::InvalidArgument,
            format!("Idempotency-Key must be 1-{MAX_KEY_LEN} visible ASCII characters"),
        ));
    }
    Ok(())
}

/// The key of a request: the `Idempotency-Key` header or the body's
/// `requestId`; both given and different -> 400.
pub fn resolve_key(
    header: Option<&str>,
    body_request_id: Option<&str>,
) -> Result<Option<String>, CodedError> {
    let key = match (header, body_request_id) {
        (Some(h), Some(b)) if h != b => {
            return Err(CodedError::new(
                ErrorCode::InvalidArgument,
                "the Idempotency-Key header and requestId differ",
            ));
        }
        (Some(k), _) | (None, Some(k)) => Some(k),
        (None, None) => None,
    };
    if let Some(k) = key {
        validate_key(k)?;
    }
    Ok(key.map(str::to_owned))
}

/// Fingerprint of a request: SHA-256 of its canonical JSON (object keys
/// sorted), so formatting and key order do not make two requests differ.
pub fn fingerprint(request: &serde_json::Value) -> String {
    // serde_json's Value keeps object keys sorted (no preserve_order).
    let canonical = request.to_string();
    hex::encode(Sha256::digest(canonical.as_bytes()))
}

/// What an earlier use of a key means for this request.
#[derive(Debug, Clone, PartialEq)]
pub enum Prior {
    /// Replay this saved response.
    Replay { status: u16, body: String },
    /// Another request body used this key: 422.
    Mismatch,
    /// The first request has not finished: 409.
    InProgress,
}

impl Prior {
    /// Judges a stored key against this request's fingerprint.
    pub fn judge(
        stored_hash: &str,
        state: &str,
        status: Option<i64>,
        body: Option<String>,
        hash: &str,
    ) -> Prior {
        if stored_hash != hash {
            return Prior::Mismatch;
        }
        match (state, status, body) {
            ("completed", Some(status), Some(body)) => Prior::Replay {
                status: u16::try_from(status).unwrap_or(200),
                body,
            },
            _ => Prior::InProgress,
        }
    }

    /// The error of a non-replay.
    pub fn error(&self) -> Option<CodedError> {
        match self {
            Prior::Replay { .. } => None,
            Prior::Mismatch => Some(CodedError::new(
                ErrorCode::IdempotencyKeyReused,
                "this Idempotency-Key was used with a different request body",
            )),
            Prior::InProgress => Some(CodedError::new(
                ErrorCode::IdempotencyInProgress,
                "a request with this Idempotency-Key is still being processed; retry later",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn keys_are_checked() {
        assert!(resolve_key(Some("abc-123"), None).unwrap().is_some());
        assert!(resolve_key(None, Some("abc")).unwrap().is_some());
        assert!(resolve_key(Some("a"), Some("a")).is_ok());
        assert_eq!(
            resolve_key(Some("a"), Some("b")).unwrap_err().code,
            ErrorCode::InvalidArgument
        );
        for bad in ["", "has space", "é", &"x".repeat(256)] {
            assert!(resolve_key(Some(bad), None).is_err(), "{bad:?}");
        }
        assert_eq!(resolve_key(None, None).unwrap(), None);
    }

    #[test]
    fn fingerprint_ignores_key_order_not_values() {
        let a = fingerprint(&json!({"code": "1", "runtime": "python"}));
        let b: serde_json::Value =
            serde_json::from_str(r#"{ "runtime":"python","code":"1" }"#).unwrap();
        assert_eq!(a, fingerprint(&b));
        assert_ne!(a, fingerprint(&json!({"code": "2", "runtime": "python"})));
    }

    #[test]
    fn judgement() {
        let done = Prior::judge("h", "completed", Some(202), Some("{}".into()), "h");
        assert!(matches!(done, Prior::Replay { status: 202, .. }));
        assert_eq!(
            Prior::judge("h", "completed", Some(202), Some("{}".into()), "other")
                .error()
                .unwrap()
                .code,
            ErrorCode::IdempotencyKeyReused
        );
        assert_eq!(
            Prior::judge("h", "processing", None, None, "h")
                .error()
                .unwrap()
                .code,
            ErrorCode::IdempotencyInProgress
        );
    }
}
