//! Wire types of the data plane's internal API (`/internal/v1/...` on
//! `DATA_PLANE_ADDR`). camelCase JSON, like the agent's. Only the control
//! plane calls it, with the service credential.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::{EffectiveLimits, Limits, StepMode};

/// A runtime of the registry, as `GET /internal/v1/runtimes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RuntimeInfo {
    pub name: String,
    /// Interpreter inside the sandbox (local backend).
    pub interpreter: String,
    /// Container image of the session pod (Kubernetes backend).
    pub image: String,
    /// Package ecosystem of its dependencies (`pypi`, `npm`, or none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecosystem: Option<String>,
    pub default_limits: EffectiveLimits,
    pub max_limits: EffectiveLimits,
}

/// `GET /internal/v1/runtimes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RuntimeList {
    pub runtimes: Vec<RuntimeInfo>,
}

/// Packages one session or job may ask for, at most (both planes refuse a
/// longer list with 400 `invalid_argument`, before anything is installed).
pub const MAX_PACKAGES: usize = 64;

/// `POST /internal/v1/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSession {
    /// Must equal the credential's tenant when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Runtime name (default `python`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Packages (`name` or `name==version`), checked against the runtime's
    /// allowlist and installed read-only before the session is handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<String>>,
    /// Names of secrets (`crate::secrets::check_names`) whose values the
    /// data plane resolves for the credential's tenant and hands to the
    /// interpreter's environment. Names only: values never cross this API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
}

/// A session as the data plane reports it: never its agent token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub session_id: String,
    pub tenant: String,
    pub runtime: String,
    pub limits: EffectiveLimits,
    pub isolation: String,
    pub warm: bool,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// `active`, or `lost` when its sandbox vanished (found at a restart).
    pub state: String,
}

/// `GET /internal/v1/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SessionViewList {
    pub sessions: Vec<SessionView>,
}

/// `POST /internal/v1/sessions/{id}/steps`: the agent's step request without
/// the session id (it is in the path); the step id is generated when absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<StepMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
}

/// Time the data plane allows a step beyond its own timeout (interrupt
/// grace, an interpreter restart) before it answers 503 itself; a caller's
/// bound on a step must be longer, so the coded answer arrives first.
pub const STEP_MARGIN_MS: u64 = 15_000;

/// `GET /healthz` and `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeStatus {
    /// `ok` (live) or `ready`.
    pub status: String,
    /// Runtimes offered (`/readyz` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtimes: Option<usize>,
}

/// Claims of the service credential the control plane presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub tenant: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// An artifact's metadata. Its bytes are encrypted at rest; this is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ArtifactInfo {
    pub artifact_id: String,
    pub tenant: String,
    pub name: String,
    /// The session it belongs to: deleted with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub size: u64,
    /// SHA-256 of the plaintext, hex (also the download's `ETag`, quoted).
    pub sha256: String,
    pub created_at_ms: u64,
    /// The job whose `output/` it came from, or the one the uploader named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The workflow it belongs to (named by the uploader).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// Free labels (`label=k=v` at upload), to list by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// What an artifact is attached to, given at upload and matched by the
/// list's filters. Every id is checked by the receiving plane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArtifactMeta {
    /// A session of the caller's tenant: the artifact is deleted with it.
    pub session_id: Option<String>,
    pub job_id: Option<String>,
    pub workflow_id: Option<String>,
    pub labels: BTreeMap<String, String>,
}

/// Labels per artifact, at most.
pub const MAX_ARTIFACT_LABELS: usize = 16;

/// Checks one `k=v` label: the key 1-63 bytes of `[A-Za-z0-9._/-]`, the
/// value at most 255 bytes without control characters.
pub fn parse_label(raw: &str) -> Result<(String, String), String> {
    let (k, v) = raw
        .split_once('=')
        .ok_or_else(|| format!("label {raw:?} is not k=v"))?;
    let key_ok = !k.is_empty()
        && k.len() <= 63
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
    if !key_ok {
        return Err(format!(
            "label key {k:?} must be 1-63 bytes of letters, digits, '.', '_', '/', '-'"
        ));
    }
    if v.len() > 255 || v.chars().any(char::is_control) {
        return Err(format!(
            "label {k:?}: the value must be at most 255 bytes without control characters"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

/// Filters of an artifact listing (all given must match) and its page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArtifactFilter {
    pub session_id: Option<String>,
    pub job_id: Option<String>,
    pub workflow_id: Option<String>,
    /// Every one must be among the artifact's labels.
    pub labels: BTreeMap<String, String>,
    /// Page size (the data plane caps it at [`MAX_ARTIFACT_PAGE`]).
    pub limit: Option<usize>,
    /// The `nextCursor` of the previous page.
    pub cursor: Option<String>,
}

impl ArtifactFilter {
    /// Whether `info` passes every filter (the cursor aside).
    pub fn matches(&self, info: &ArtifactInfo) -> bool {
        let eq = |want: &Option<String>, have: &Option<String>| {
            want.as_ref().is_none_or(|w| have.as_ref() == Some(w))
        };
        eq(&self.session_id, &info.session_id)
            && eq(&self.job_id, &info.job_id)
            && eq(&self.workflow_id, &info.workflow_id)
            && self
                .labels
                .iter()
                .all(|(k, v)| info.labels.get(k) == Some(v))
    }
}

/// Largest page of an artifact listing; the default is 100.
pub const MAX_ARTIFACT_PAGE: usize = 1000;

/// `GET /internal/v1/artifacts` (and `/v1/artifacts`): one page, ordered by id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ArtifactList {
    pub artifacts: Vec<ArtifactInfo>,
    /// Pass as `cursor` for the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// The query of an upload or a listing: `label` may repeat, every other
/// key at most once; unknown keys are refused.
#[derive(Debug, Default)]
pub struct ArtifactQuery {
    /// `name` (uploads).
    pub name: Option<String>,
    /// `sessionId`, `jobId`, `workflowId`, `label`.
    pub meta: ArtifactMeta,
    /// `limit` (listings).
    pub limit: Option<usize>,
    /// `cursor` (listings).
    pub cursor: Option<String>,
    /// `size` (uploads): the declared byte count.
    pub size: Option<u64>,
    /// `quotaBytes` (the control plane's uploads to the data plane): the
    /// tenant's quota on stored artifact bytes, from policy.
    pub quota_bytes: Option<u64>,
}

impl ArtifactQuery {
    /// Parses a raw query, accepting only the `allowed` keys; the message
    /// of an error names the bad parameter.
    pub fn parse(raw: Option<&str>, allowed: &[&str]) -> Result<ArtifactQuery, String> {
        parse_query(raw, allowed)
    }

    /// The filter of a listing.
    pub fn into_filter(self) -> ArtifactFilter {
        ArtifactFilter {
            session_id: self.meta.session_id,
            job_id: self.meta.job_id,
            workflow_id: self.meta.workflow_id,
            labels: self.meta.labels,
            limit: self.limit,
            cursor: self.cursor,
        }
    }
}

fn parse_query(raw: Option<&str>, allowed: &[&str]) -> Result<ArtifactQuery, String> {
    let pairs: Vec<(String, String)> =
        serde_urlencoded::from_str(raw.unwrap_or("")).map_err(|e| format!("query: {e}"))?;
    let mut q = ArtifactQuery::default();
    let mut labels = BTreeMap::new();
    for (k, v) in pairs {
        if !allowed.contains(&k.as_str()) {
            return Err(format!(
                "unknown query parameter {k:?} (expected one of {})",
                allowed.join(", ")
            ));
        }
        let once = |slot: &mut Option<String>, v: String| {
            if slot.replace(v).is_some() {
                Err(format!("query parameter {k:?} is given twice"))
            } else {
                Ok(())
            }
        };
        match k.as_str() {
            "name" => once(&mut q.name, v)?,
            "sessionId" => {
                crate::ids::SessionId::parse(v.as_str()).map_err(|e| format!("sessionId: {e}"))?;
                once(&mut q.meta.session_id, v)?
            }
            "jobId" => {
                crate::ids::JobId::parse(v.as_str()).map_err(|e| format!("jobId: {e}"))?;
                once(&mut q.meta.job_id, v)?
            }
            "workflowId" => {
                crate::ids::WorkflowId::parse(v.as_str())
                    .map_err(|e| format!("workflowId: {e}"))?;
                once(&mut q.meta.workflow_id, v)?
            }
            "cursor" => {
                crate::ids::ArtifactId::parse(v.as_str()).map_err(|e| format!("cursor: {e}"))?;
                once(&mut q.cursor, v)?
            }
            "size" => {
                let n: u64 = v
                    .parse()
                    .map_err(|_| "size must be a byte count".to_owned())?;
                if q.size.replace(n).is_some() {
                    return Err("query parameter \"size\" is given twice".into());
                }
            }
            "quotaBytes" => {
                let n: u64 = v
                    .parse()
                    .map_err(|_| "quotaBytes must be a byte count".to_owned())?;
                if q.quota_bytes.replace(n).is_some() {
                    return Err("query parameter \"quotaBytes\" is given twice".into());
                }
            }
            "limit" => {
                let n: usize = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| "limit must be a positive integer".to_owned())?;
                if q.limit.replace(n).is_some() {
                    return Err("query parameter \"limit\" is given twice".into());
                }
            }
            _ => {
                let (lk, lv) = parse_label(&v)?;
                if labels.insert(lk.clone(), lv).is_some() {
                    return Err(format!("label {lk:?} is given twice"));
                }
                if labels.len() > MAX_ARTIFACT_LABELS {
                    return Err(format!("at most {MAX_ARTIFACT_LABELS} labels"));
                }
            }
        }
    }
    q.meta.labels = labels;
    Ok(q)
}

/// What a `Range` header asks of an object of a known size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No range, an unparsable one, or several ranges: the whole body (200).
    Full,
    /// Bytes `start..=end` (206 with `Content-Range`).
    Part { start: u64, end: u64 },
    /// A single range outside the object (416 with `Content-Range: bytes */size`).
    Unsatisfiable,
}

impl RangeAsk {
    /// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n` against `size`. Several
    /// ranges (`bytes=0-1,5-6`) and anything malformed are answered with the
    /// full body, as RFC 9110 allows.
    pub fn parse(header: Option<&str>, size: u64) -> RangeAsk {
        let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
            return RangeAsk::Full;
        };
        if spec.contains(',') {
            return RangeAsk::Full;
        }
        let Some((a, b)) = spec.trim().split_once('-') else {
            return RangeAsk::Full;
        };
        let num = |t: &str| {
            if !t.is_empty() && t.bytes().all(|c| c.is_ascii_digit()) {
                t.parse::<u64>().ok()
            } else {
                None
            }
        };
        match (a.trim(), b.trim()) {
            ("", n) => match num(n) {
                Some(0) => RangeAsk::Unsatisfiable,
                Some(_) if size == 0 => RangeAsk::Unsatisfiable,
                Some(n) => RangeAsk::Part {
                    start: size.saturating_sub(n),
                    end: size - 1,
                },
                None => RangeAsk::Full,
            },
            (a, "") => match num(a) {
                Some(a) if a >= size => RangeAsk::Unsatisfiable,
                Some(a) => RangeAsk::Part {
                    start: a,
                    end: size - 1,
                },
                None => RangeAsk::Full,
            },
            (a, b) => match (num(a), num(b)) {
                (Some(a), Some(b)) if a > b => RangeAsk::Full,
                (Some(a), Some(_)) if a >= size => RangeAsk::Unsatisfiable,
                (Some(a), Some(b)) => RangeAsk::Part {
                    start: a,
                    end: b.min(size - 1),
                },
                _ => RangeAsk::Full,
            },
        }
    }
}

/// Whether an `If-None-Match` header names `etag` (a quoted SHA-256) or `*`.
pub fn etag_matches(if_none_match: Option<&str>, etag: &str) -> bool {
    if_none_match.is_some_and(|h| {
        h.split(',').any(|t| {
            let t = t.trim();
            let t = t.strip_prefix("W/").unwrap_or(t);
            t == "*" || t == etag
        })
    })
}

/// `POST /internal/v1/jobs`: a one-shot run in a fresh sandbox. The job id
/// makes it idempotent: a repeated id returns the first run's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunJob {
    pub job_id: String,
    /// Runtime name (default `python`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<StepMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<String>>,
    /// The tenant's quota on stored artifact bytes, as the control plane's
    /// policy sets it (the data plane's `TENANT_MAX_ARTIFACT_BYTES` when
    /// absent): output files past it are left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_quota_bytes: Option<u64>,
    /// Names of secrets, as in [`CreateSession::secrets`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
}

/// `error.type` of a cancelled job's result (`status: killed`), as
/// `POST /internal/v1/jobs/{id}/cancel` and every later run or get of that id
/// report it.
pub const JOB_CANCELLED: &str = "Cancelled";

/// The outcome of a job. Files the code wrote under `output/` in its
/// workspace are kept as artifacts (the sandbox itself is destroyed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobResult {
    pub job_id: String,
    pub status: crate::agent::StepStatus,
    pub stdout: String,
    pub stderr: String,
    pub result: Option<serde_json::Value>,
    pub error: Option<crate::agent::StepError>,
    pub duration_ms: u64,
    pub truncated: bool,
    pub artifacts: Vec<ArtifactInfo>,
    /// This answer is the saved result of an earlier run of the same job id.
    #[serde(default)]
    pub replayed: bool,
}

impl JobResult {
    /// Whether this is the outcome of a cancellation (not of the code).
    pub fn is_cancelled(&self) -> bool {
        self.status == crate::agent::StepStatus::Killed
            && self.error.as_ref().is_some_and(|e| e.kind == JOB_CANCELLED)
    }
}

/// The folder of the workspace whose files become a job's artifacts.
pub const JOB_OUTPUT_DIR: &str = "output";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{StepError, StepStatus};

    fn cancelled() -> JobResult {
        JobResult {
            job_id: "j".into(),
            status: StepStatus::Killed,
            stdout: "started\n".into(),
            stderr: String::new(),
            result: None,
            error: Some(StepError {
                kind: JOB_CANCELLED.into(),
                message: "the job was cancelled".into(),
                traceback: String::new(),
            }),
            duration_ms: 5,
            truncated: false,
            artifacts: Vec::new(),
            replayed: false,
        }
    }

    #[test]
    fn a_cancelled_job_result_is_pinned() {
        expect_test::expect![[r#"{"jobId":"j","status":"killed","stdout":"started\n","stderr":"","result":null,"error":{"type":"Cancelled","message":"the job was cancelled","traceback":""},"durationMs":5,"truncated":false,"artifacts":[],"replayed":false}"#]]
        .assert_eq(&serde_json::to_string(&cancelled()).unwrap());
        assert!(cancelled().is_cancelled());
    }

    #[test]
    fn only_a_cancellation_is_cancelled() {
        // Killed by the memory limit, or a step that raised `Cancelled`.
        let oom = JobResult {
            error: Some(StepError {
                kind: "MemoryError".into(),
                message: "out of memory".into(),
                traceback: String::new(),
            }),
            ..cancelled()
        };
        let raised = JobResult {
            status: StepStatus::Error,
            ..cancelled()
        };
        assert!(!oom.is_cancelled() && !raised.is_cancelled());
    }
}

#[cfg(test)]
mod artifact_tests {
    use super::*;

    #[test]
    fn ranges() {
        let p = |h: &str, size| RangeAsk::parse(Some(h), size);
        let part = |start, end| RangeAsk::Part { start, end };
        assert_eq!(RangeAsk::parse(None, 10), RangeAsk::Full);
        assert_eq!(p("bytes=0-4", 10), part(0, 4));
        assert_eq!(p("bytes=5-", 10), part(5, 9));
        assert_eq!(p("bytes=-3", 10), part(7, 9));
        assert_eq!(p("bytes=-30", 10), part(0, 9));
        assert_eq!(p("bytes=8-100", 10), part(8, 9));
        assert_eq!(p("bytes=10-", 10), RangeAsk::Unsatisfiable);
        assert_eq!(p("bytes=10-12", 10), RangeAsk::Unsatisfiable);
        assert_eq!(p("bytes=-0", 10), RangeAsk::Unsatisfiable);
        assert_eq!(p("bytes=0-0", 0), RangeAsk::Unsatisfiable);
        assert_eq!(p("bytes=-1", 0), RangeAsk::Unsatisfiable);
        assert_eq!(p("bytes=0-1,4-5", 10), RangeAsk::Full);
        assert_eq!(p("bytes=5-2", 10), RangeAsk::Full);
        assert_eq!(p("items=0-1", 10), RangeAsk::Full);
        assert_eq!(p("bytes=a-b", 10), RangeAsk::Full);
        assert_eq!(p("bytes=+1-2", 10), RangeAsk::Full);
    }

    #[test]
    fn labels_and_etags() {
        assert_eq!(
            parse_label("a=b").expect("a label"),
            ("a".into(), "b".into())
        );
        assert_eq!(
            parse_label("k=").expect("an empty value"),
            ("k".into(), String::new())
        );
        assert!(parse_label("novalue").is_err());
        assert!(parse_label("=v").is_err());
        assert!(parse_label("sp ace=v").is_err());
        assert!(parse_label("k=line\nbreak").is_err());
        assert!(etag_matches(Some("\"abc\""), "\"abc\""));
        assert!(etag_matches(Some("\"x\", W/\"abc\""), "\"abc\""));
        assert!(etag_matches(Some("*"), "\"abc\""));
        assert!(!etag_matches(Some("\"abd\""), "\"abc\""));
        assert!(!etag_matches(None, "\"abc\""));
    }
}
