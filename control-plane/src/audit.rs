//! The append-only, hash-chained audit log (decision 15). Each event carries
//! the SHA-256 of the one before, so an edited, deleted or reordered row
//! breaks the chain at that row; the database refuses UPDATE and DELETE with
//! a trigger. Audit is fail-closed: a caller whose event cannot be written
//! gets `audit_unavailable` instead of proceeding unrecorded.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared::CodedError;
use shared::ErrorCode;
use utoipa::ToSchema;

use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::storage::{self, Db, StorageError, WriteTx, new_id, now_ms};

/// `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// An event about to be recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub tenant: String,
    pub actor: String,
    /// `job.submit`, `session.create`, `step.run`, `auth.failure`, ...
    pub action: String,
    /// `job/job_…`, `session/ses_…`, `policy/acme`, ...
    pub resource: String,
    /// `allowed`, `denied`, `succeeded`, `failed`, `refused`, ...
    pub outcome: String,
    pub bypass: bool,
    pub details: serde_json::Value,
}

impl AuditEvent {
    /// An event about `identity` doing `action` on `resource`.
    pub fn by(identity: &Identity, action: &str, resource: impl Into<String>) -> AuditEvent {
        AuditEvent {
            tenant: identity.tenant.to_string(),
            actor: identity.actor(),
            action: action.into(),
            resource: resource.into(),
            outcome: "succeeded".into(),
            bypass: identity.bypass,
            details: serde_json::Value::Object(Default::default()),
        }
    }

    pub fn outcome(mut self, outcome: &str) -> Self {
        self.outcome = outcome.into();
        self
    }

    pub fn details(mut self, details: serde_json::Value) -> Self {
        self.details = details;
        self
    }
}

/// A recorded event, as `GET /v1/audit` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditRecord {
    /// In `GET /v1/audit`: the event's position in its tenant's own log
    /// (1, 2, 3, ... without gaps, so other tenants' volume does not show);
    /// in the chain itself, the global position.
    pub seq: i64,
    pub id: String,
    pub ts_ms: i64,
    pub tenant: String,
    pub actor: String,
    pub action: String,
    pub resource: String,
    pub outcome: String,
    pub bypass: bool,
    pub request_id: Option<String>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    pub prev_hash: String,
    pub hash: String,
}

/// The answer of `/v1/audit/verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    /// True when every link holds.
    pub ok: bool,
    /// Events checked (up to and including the first broken one).
    pub checked: u64,
    /// `seq` of the last event checked (0 for an empty log).
    pub head_seq: i64,
    /// Hash of the last event checked. Saved outside the database as an
    /// anchor (`headSeq:head`), it lets a later verify catch a chain that
    /// was rewritten with recomputed hashes, or cut short.
    pub head: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_broken: Option<BrokenLink>,
}

/// Where and why the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrokenLink {
    pub seq: i64,
    /// The event's id; absent when the event itself is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub reason: String,
}

/// An event's hash saved earlier outside the database (a verify report's
/// `headSeq` and `head`): the chain must still hold that event unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    pub seq: i64,
    pub hash: String,
}

impl Anchor {
    /// Checks a `seq` and a 64-hex-digit SHA-256; the message names the
    /// fault.
    pub fn new(seq: i64, hash: &str) -> Result<Anchor, String> {
        if seq < 1 {
            return Err(format!("anchor seq must be at least 1, got {seq}"));
        }
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("anchor hash must be 64 hexadecimal digits (a SHA-256)".into());
        }
        Ok(Anchor {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }

    /// `SEQ:HASH`, as the CLI takes it.
    pub fn parse(text: &str) -> Result<Anchor, String> {
        let (seq, hash) = text
            .split_once(':')
            .ok_or_else(|| format!("anchor {text:?} is not SEQ:HASH"))?;
        let seq = seq
            .trim()
            .parse::<i64>()
            .map_err(|_| format!("anchor seq {seq:?} is not a number"))?;
        Anchor::new(seq, hash.trim())
    }
}

/// Filters of `GET /v1/audit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AuditQuery {
    pub action: Option<String>,
    pub resource: Option<String>,
    pub outcome: Option<String>,
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
    /// Only events with `seq` above this (the cursor of the previous page).
    pub after: Option<i64>,
    pub limit: Option<i64>,
}

/// The audit log.
#[derive(Clone)]
pub struct AuditLog {
    db: Db,
    metrics: Arc<Metrics>,
    /// SQLite has one writer: appends are serialized in this process.
    local: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// The digest of one event: every field, length-prefixed, after the
/// previous hash.
fn event_hash(r: &AuditRecord, details: &str) -> String {
    let mut h = Sha256::new();
    let seq = r.seq.to_string();
    let ts = r.ts_ms.to_string();
    let bypass = if r.bypass { "1" } else { "0" };
    let request_id = r.request_id.as_deref().unwrap_or("");
    for field in [
        r.prev_hash.as_str(),
        &seq,
        &r.id,
        &ts,
        &r.tenant,
        &r.actor,
        &r.action,
        &r.resource,
        &r.outcome,
        bypass,
        request_id,
        details,
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

fn unavailable(e: CodedError) -> CodedError {
    CodedError::new(
        ErrorCode::AuditUnavailable,
        format!(
            "the audit event could not be written, so the request was refused: {}",
            e.message
        ),
    )
}

/// Appends `ev` inside the open transaction `tx`, so a domain change and
/// its audit event commit or roll back together: the chain's head is taken
/// (and held until the transaction ends), the event sealed after it and
/// inserted.
pub(crate) async fn append(tx: &mut WriteTx, ev: AuditEvent) -> Result<AuditRecord, StorageError> {
    let (seq, prev_hash) = match storage::audit::lock_head(tx).await? {
        Some((seq, hash)) => (seq + 1, hash),
        None => (1, GENESIS_HASH.to_owned()),
    };
    let record = seal(seq, prev_hash, ev);
    storage::audit::insert(tx, &record).await?;
    Ok(record)
}

/// Completes an event with its position in the chain and its hash.
#[doc(hidden)]
pub fn seal(seq: i64, prev_hash: String, ev: AuditEvent) -> AuditRecord {
    let mut record = AuditRecord {
        seq,
        id: new_id("evt"),
        ts_ms: now_ms(),
        tenant: ev.tenant,
        actor: ev.actor,
        action: ev.action,
        resource: ev.resource,
        outcome: ev.outcome,
        bypass: ev.bypass,
        request_id: shared::server::current_request_id(),
        details: ev.details,
        prev_hash,
        hash: String::new(),
    };
    let details = record.details.to_string();
    record.hash = event_hash(&record, &details);
    record
}

impl AuditLog {
    pub fn new(db: Db, metrics: Arc<Metrics>) -> AuditLog {
        AuditLog {
            db,
            metrics,
            local: Default::default(),
        }
    }

    /// Appends one event. On failure the caller must refuse its request
    /// (`audit_unavailable`); the failure is counted.
    pub async fn record(&self, ev: AuditEvent) -> Result<AuditRecord, CodedError> {
        let _serial = self.local.lock().await;
        let result = async {
            let mut tx = self.db.begin_write().await?;
            let record = append(&mut tx, ev).await?;
            tx.commit().await?;
            Ok::<_, StorageError>(record)
        }
        .await;
        result.map_err(|e| {
            self.metrics.audit_write_failures.inc();
            tracing::error!(error = %e, "audit write failed");
            unavailable(CodedError::from(e))
        })
    }

    /// One tenant's events, oldest first, after the cursor.
    pub async fn list(&self, tenant: &str, q: &AuditQuery) -> Result<Vec<AuditRecord>, CodedError> {
        let limit = q.limit.unwrap_or(100).clamp(1, 1000);
        Ok(storage::audit::list_for_tenant(&self.db, tenant, q, limit).await?)
    }

    /// A tenant's view of [`AuditLog::verify`]: the whole chain is walked
    /// (its integrity is global), but the answer names no other tenant's
    /// event and no global position: `checked` counts the tenant's own
    /// events, `headSeq`/`head` are empty, and a break is located only when
    /// it is at one of the tenant's events. The global walk is for the
    /// platform role.
    pub async fn verify_for_tenant(&self, tenant: &str) -> Result<VerifyReport, CodedError> {
        let global = self.verify_against(None).await?;
        let checked = storage::audit::count_for_tenant(&self.db, tenant, global.head_seq).await?;
        let first_broken = match global.first_broken {
            None => None,
            Some(b) => {
                let owner = match &b.id {
                    Some(id) => storage::audit::tenant_of(&self.db, id).await?,
                    None => None,
                };
                Some(if owner.as_deref() == Some(tenant) {
                    BrokenLink {
                        seq: 0,
                        id: b.id,
                        reason: b.reason,
                    }
                } else {
                    BrokenLink {
                        seq: 0,
                        id: None,
                        reason: "the chain is broken at an event that is not this tenant's; \
                                 a platform administrator can locate it"
                            .into(),
                    }
                })
            }
        };
        Ok(VerifyReport {
            ok: global.ok,
            checked: checked.max(0) as u64,
            head_seq: 0,
            head: String::new(),
            first_broken,
        })
    }

    /// Walks the whole chain from the first event and reports the first
    /// broken link: a changed field, a missing or reordered row.
    pub async fn verify(&self) -> Result<VerifyReport, CodedError> {
        self.verify_against(None).await
    }

    /// [`AuditLog::verify`], and the event at `anchor.seq` must still carry
    /// the anchored hash. The chain alone cannot show a rewrite by someone
    /// who recomputed every hash after an edit, or a cut tail; an anchor
    /// kept elsewhere can.
    pub async fn verify_against(
        &self,
        anchor: Option<&Anchor>,
    ) -> Result<VerifyReport, CodedError> {
        const PAGE: i64 = 1000;
        let mut expected_prev = GENESIS_HASH.to_owned();
        let mut expected_seq = 1i64;
        let mut checked = 0u64;
        loop {
            let page = storage::audit::chain_page(&self.db, expected_seq, PAGE).await?;
            let done = (page.len() as i64) < PAGE;
            for storage::audit::StoredEvent { record: r, details } in page {
                checked += 1;
                let broken = |reason: String| VerifyReport {
                    ok: false,
                    checked,
                    head_seq: expected_seq - 1,
                    head: expected_prev.clone(),
                    first_broken: Some(BrokenLink {
                        seq: r.seq,
                        id: Some(r.id.clone()),
                        reason,
                    }),
                };
                if r.seq != expected_seq {
                    return Ok(broken(format!(
                        "expected event #{expected_seq}, found #{}: events are missing",
                        r.seq
                    )));
                }
                if r.prev_hash != expected_prev {
                    return Ok(broken(
                        "prev_hash does not match the previous event's hash: an event before it was removed, replaced or reordered".into(),
                    ));
                }
                if event_hash(&r, &details) != r.hash {
                    return Ok(broken(
                        "the event's content does not match its hash: it was edited".into(),
                    ));
                }
                if let Some(a) = anchor
                    && a.seq == r.seq
                    && a.hash != r.hash
                {
                    return Ok(broken(
                        "the event's hash differs from the anchor saved earlier: the chain was \
                         rewritten at or before this event"
                            .into(),
                    ));
                }
                expected_prev = r.hash.clone();
                expected_seq += 1;
            }
            if done {
                let last = expected_seq - 1;
                let first_broken = anchor.filter(|a| a.seq > last).map(|a| BrokenLink {
                    seq: a.seq,
                    id: None,
                    reason: format!(
                        "the anchored event #{} is missing: the chain ends at #{last}, \
                         it was cut short",
                        a.seq
                    ),
                });
                return Ok(VerifyReport {
                    ok: first_broken.is_none(),
                    checked,
                    head_seq: last,
                    head: expected_prev,
                    first_broken,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::DatabaseDriver;
    use crate::storage::audit::tampering;
    use crate::storage::testing::TestDb;

    fn ev(tenant: &str, n: usize) -> AuditEvent {
        AuditEvent {
            tenant: tenant.into(),
            actor: "alice".into(),
            action: "job.submit".into(),
            resource: format!("job/{n}"),
            outcome: "succeeded".into(),
            bypass: false,
            details: serde_json::json!({"n": n}),
        }
    }

    async fn seeded(driver: DatabaseDriver) -> (TestDb, AuditLog) {
        let t = TestDb::new(driver).await;
        let log = AuditLog::new(t.db.clone(), Metrics::new());
        for n in 0..6 {
            log.record(ev(if n % 2 == 0 { "acme" } else { "globex" }, n))
                .await
                .unwrap();
        }
        (t, log)
    }

    /// What someone who knows the scheme does after an edit: recompute the
    /// event's hash so the chain holds again.
    async fn rehash(db: &Db, seq: i64) {
        let stored = tampering::event(db, seq).await;
        tampering::set_hash(db, seq, &event_hash(&stored.record, &stored.details)).await;
    }

    crate::both_databases!(an_anchor_catches_a_rehashed_rewrite_and_a_cut_tail);
    async fn an_anchor_catches_a_rehashed_rewrite_and_a_cut_tail(driver: DatabaseDriver) {
        // A rewrite of the last event with its hash recomputed.
        let (t, log) = seeded(driver).await;
        let before = log.verify().await.unwrap();
        assert_eq!((before.ok, before.head_seq), (true, 6), "{driver:?}");
        let anchor = Anchor::new(before.head_seq, &before.head).unwrap();
        assert!(log.verify_against(Some(&anchor)).await.unwrap().ok);
        tampering::set_outcome(&t.db, 6, "denied").await;
        rehash(&t.db, 6).await;
        let plain = log.verify().await.unwrap();
        assert!(plain.ok, "{driver:?}: the chain alone cannot see it");
        let anchored = log.verify_against(Some(&anchor)).await.unwrap();
        assert!(!anchored.ok, "{driver:?}: {anchored:?}");
        let broken = anchored.first_broken.unwrap();
        assert_eq!(broken.seq, 6);
        assert!(broken.reason.contains("anchor"), "{}", broken.reason);
        t.cleanup().await;

        // The tail cut off.
        let (t, log) = seeded(driver).await;
        let before = log.verify().await.unwrap();
        let anchor = Anchor::new(before.head_seq, &before.head).unwrap();
        tampering::delete(&t.db, 5, i64::MAX).await;
        let plain = log.verify().await.unwrap();
        assert_eq!((plain.ok, plain.head_seq), (true, 4), "{driver:?}");
        let anchored = log.verify_against(Some(&anchor)).await.unwrap();
        assert!(!anchored.ok, "{driver:?}: {anchored:?}");
        let broken = anchored.first_broken.unwrap();
        assert_eq!((broken.seq, broken.id), (6, None));
        assert!(broken.reason.contains("cut short"), "{}", broken.reason);
        t.cleanup().await;
    }

    #[test]
    fn anchors_are_checked() {
        let h = "a".repeat(64);
        assert_eq!(Anchor::parse(&format!("7:{h}")).unwrap().seq, 7);
        assert_eq!(
            Anchor::parse(&format!("7:{}", "A".repeat(64)))
                .unwrap()
                .hash,
            h
        );
        for bad in [
            "7",
            "x:aa",
            &format!("0:{h}"),
            "7:abc",
            &format!("7:{}", "g".repeat(64)),
        ] {
            assert!(Anchor::parse(bad).is_err(), "{bad}");
        }
    }

    crate::both_databases!(chain_verifies_and_lists_per_tenant);
    async fn chain_verifies_and_lists_per_tenant(driver: DatabaseDriver) {
        let (t, log) = seeded(driver).await;
        let report = log.verify().await.unwrap();
        assert!(report.ok, "{driver:?}: {report:?}");
        assert_eq!(report.checked, 6);
        let acme = log.list("acme", &AuditQuery::default()).await.unwrap();
        assert_eq!(acme.len(), 3);
        assert!(acme.iter().all(|r| r.tenant == "acme"));
        let page = log
            .list(
                "acme",
                &AuditQuery {
                    after: Some(acme[0].seq),
                    limit: Some(1),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].seq, acme[1].seq);
        // Numbered per tenant: no gaps where globex's events are.
        assert_eq!(acme.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        let filtered = log
            .list(
                "globex",
                &AuditQuery {
                    resource: Some("job/3".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(filtered.len(), 1);
        t.cleanup().await;
    }

    crate::both_databases!(edits_deletes_and_reorders_are_caught);
    async fn edits_deletes_and_reorders_are_caught(driver: DatabaseDriver) {
        for (what, seq) in [
            ("edit", 3),
            ("delete", 3),
            ("reorder", 4),
            ("edit details", 6),
        ] {
            let (t, log) = seeded(driver).await;
            match what {
                "edit" => tampering::set_outcome(&t.db, 3, "denied").await,
                "delete" => tampering::delete(&t.db, 2, 2).await,
                "reorder" => tampering::swap(&t.db, 4, 5).await,
                _ => tampering::set_details(&t.db, 6, "{\"n\":99}").await,
            }
            let report = log.verify().await.unwrap();
            assert!(!report.ok, "{driver:?} {what}: not caught");
            let broken = report.first_broken.unwrap();
            assert_eq!(broken.seq, seq, "{driver:?} {what}: {}", broken.reason);
            t.cleanup().await;
        }
    }

    crate::both_databases!(a_tenant_verify_reveals_no_other_tenant);
    /// Issue 15, section 6: a tenant's verify names none of another
    /// tenant's events and no global position.
    async fn a_tenant_verify_reveals_no_other_tenant(driver: DatabaseDriver) {
        let (t, log) = seeded(driver).await;
        let ok = log.verify_for_tenant("acme").await.unwrap();
        assert_eq!(
            (ok.ok, ok.checked, ok.head_seq, ok.head.as_str()),
            (true, 3, 0, "")
        );
        // Break a globex event (seq 4): acme learns that, not where.
        tampering::set_outcome(&t.db, 4, "denied").await;
        let globex_id = tampering::event(&t.db, 4).await.record.id;
        let report = log.verify_for_tenant("acme").await.unwrap();
        assert!(!report.ok);
        let text = serde_json::to_string(&report).unwrap();
        assert!(!text.contains(&globex_id), "{driver:?}: {text}");
        let broken = report.first_broken.unwrap();
        assert_eq!((broken.seq, broken.id), (0, None));
        // globex is told which of its events.
        let own = log.verify_for_tenant("globex").await.unwrap();
        assert_eq!(own.first_broken.unwrap().id, Some(globex_id));
        t.cleanup().await;
    }

    crate::both_databases!(concurrent_appends_keep_one_chain);
    async fn concurrent_appends_keep_one_chain(driver: DatabaseDriver) {
        let t = TestDb::new(driver).await;
        // Two logs on one database: two replicas.
        let a = AuditLog::new(t.db.clone(), Metrics::new());
        let b = AuditLog::new(t.db.clone(), Metrics::new());
        let mut tasks = Vec::new();
        for n in 0..40 {
            let log = if n % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move { log.record(ev("acme", n)).await }));
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        let report = a.verify().await.unwrap();
        assert!(report.ok, "{driver:?}: {report:?}");
        assert_eq!(report.checked, 40);
        t.cleanup().await;
    }

    #[tokio::test]
    async fn a_failed_write_is_refused_and_counted() {
        let t = TestDb::new(DatabaseDriver::Sqlite).await;
        let metrics = Metrics::new();
        let log = AuditLog::new(t.db.clone(), metrics.clone());
        t.db.close().await;
        let e = log.record(ev("acme", 1)).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::AuditUnavailable);
        assert_eq!(metrics.audit_write_failures.get(), 1);
    }
}
