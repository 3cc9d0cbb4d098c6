//! The audit log's table, `audit_events`: append-only (a trigger refuses
//! UPDATE and DELETE), one global chain ordered by `seq`. The hash chain
//! itself (sealing, verifying) is `crate::audit`'s; this is its SQL.

use sqlx::Row;

use super::{Db, Dialect, StorageError, WriteTx, on_db, on_tx};
use crate::audit::{AuditQuery, AuditRecord};

/// Postgres advisory lock key that serializes appends across replicas.
const CHAIN_LOCK: i64 = 0x6175_6469_745f_6c6b; // "audit_lk"

/// An event as stored, with its `details` exactly as written (the hash
/// covers that text, not its parsed form).
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub record: AuditRecord,
    pub details: String,
}

/// Takes the chain for the rest of the transaction and returns its head,
/// the `seq` and `hash` of the last event (`None` for an empty log).
/// Postgres holds an advisory lock until the transaction ends, across
/// replicas; on SQLite the transaction's write lock (`BEGIN IMMEDIATE`)
/// already excludes every other writer.
pub async fn lock_head(tx: &mut WriteTx) -> Result<Option<(i64, String)>, StorageError> {
    if tx.dialect() == Dialect::Postgres {
        on_tx!(tx, c => sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CHAIN_LOCK)
            .execute(&mut **c)
            .await.map(|_| ()))?;
    }
    let head: Option<(i64, String)> = on_tx!(tx, c => sqlx::query_as(
        "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
        .fetch_optional(&mut **c)
        .await)?;
    Ok(head)
}

/// Inserts a sealed event (after [`lock_head`] in the same transaction).
pub async fn insert(tx: &mut WriteTx, record: &AuditRecord) -> Result<(), StorageError> {
    let details = record.details.to_string();
    on_tx!(tx, c => sqlx::query(
        "INSERT INTO audit_events (seq, id, ts_ms, tenant, actor, action, resource, outcome, \
         bypass, request_id, details, prev_hash, hash) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)")
        .bind(record.seq)
        .bind(&record.id)
        .bind(record.ts_ms)
        .bind(&record.tenant)
        .bind(&record.actor)
        .bind(&record.action)
        .bind(&record.resource)
        .bind(&record.outcome)
        .bind(i64::from(record.bypass))
        .bind(&record.request_id)
        .bind(&details)
        .bind(&record.prev_hash)
        .bind(&record.hash)
        .execute(&mut **c)
        .await.map(|_| ()))?;
    Ok(())
}

fn event_from<R: Row>(row: &R) -> Result<StoredEvent, StorageError>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let details: String = row.try_get("details")?;
    let record = AuditRecord {
        seq: row.try_get("seq")?,
        id: row.try_get("id")?,
        ts_ms: row.try_get("ts_ms")?,
        tenant: row.try_get("tenant")?,
        actor: row.try_get("actor")?,
        action: row.try_get("action")?,
        resource: row.try_get("resource")?,
        outcome: row.try_get("outcome")?,
        bypass: row.try_get::<i64, _>("bypass")? != 0,
        request_id: row.try_get("request_id")?,
        // Parsed for display; the stored text is kept for verification.
        details: serde_json::from_str(&details)
            .unwrap_or_else(|_| serde_json::Value::String(details.clone())),
        prev_hash: row.try_get("prev_hash")?,
        hash: row.try_get("hash")?,
    };
    Ok(StoredEvent { record, details })
}

/// One tenant's events matching `q`, oldest first, at most `limit`. Each
/// `seq` is the event's position in the tenant's own log (1, 2, 3, ...),
/// and `q.after` is a cursor in that numbering: global positions would
/// show, by their gaps, how busy other tenants are.
pub async fn list_for_tenant(
    db: &Db,
    tenant: &str,
    q: &AuditQuery,
    limit: i64,
) -> Result<Vec<AuditRecord>, StorageError> {
    // Parameters are numbered in the order they appear (SQLite binds `$N`
    // by position of first use).
    let sql = "SELECT * FROM (SELECT e.*, ROW_NUMBER() OVER (ORDER BY e.seq) AS tenant_seq \
               FROM audit_events e WHERE e.tenant = $1) t WHERE 1 = 1 \
               AND ($2 IS NULL OR action = $2) \
               AND ($3 IS NULL OR resource = $3) \
               AND ($4 IS NULL OR outcome = $4) \
               AND ($5 IS NULL OR ts_ms >= $5) \
               AND ($6 IS NULL OR ts_ms < $6) \
               AND tenant_seq > $7 ORDER BY tenant_seq LIMIT $8";
    on_db!(db, p => {
        let rows = sqlx::query(sql)
            .bind(tenant)
            .bind(&q.action)
            .bind(&q.resource)
            .bind(&q.outcome)
            .bind(q.since_ms)
            .bind(q.until_ms)
            .bind(q.after.unwrap_or(0))
            .bind(limit)
            .fetch_all(p)
            .await?;
        rows.iter()
            .map(|r| {
                let mut record = event_from(r)?.record;
                record.seq = r.try_get("tenant_seq")?;
                Ok(record)
            })
            .collect()
    })
}

/// Up to `limit` events of the whole chain from `from_seq` on, in order.
pub async fn chain_page(
    db: &Db,
    from_seq: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, StorageError> {
    on_db!(db, p => {
        let rows = sqlx::query("SELECT * FROM audit_events WHERE seq >= $1 ORDER BY seq LIMIT $2")
            .bind(from_seq)
            .bind(limit)
            .fetch_all(p)
            .await?;
        rows.iter().map(event_from).collect()
    })
}

/// How many of the tenant's events have a `seq` of at most `up_to_seq`.
pub async fn count_for_tenant(db: &Db, tenant: &str, up_to_seq: i64) -> Result<i64, StorageError> {
    let n: i64 = on_db!(db, p => sqlx::query_scalar(
        "SELECT COUNT(*) FROM audit_events WHERE tenant = $1 AND seq <= $2")
        .bind(tenant)
        .bind(up_to_seq)
        .fetch_one(p)
        .await)?;
    Ok(n)
}

/// The tenant of the event `id`, if there is one.
pub async fn tenant_of(db: &Db, id: &str) -> Result<Option<String>, StorageError> {
    let tenant: Option<String> = on_db!(db, p => sqlx::query_scalar(
        "SELECT tenant FROM audit_events WHERE id = $1")
        .bind(id)
        .fetch_optional(p)
        .await)?;
    Ok(tenant)
}

#[cfg(test)]
pub mod tampering {
    //! What a database administrator can do to the log with the append-only
    //! triggers out of the way: the edits `crate::audit`'s tests must catch.
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Runs `statements` with the triggers disabled (Postgres: replica
    /// mode on one connection; SQLite: the triggers dropped).
    async fn as_admin(db: &Db, statements: &[String]) {
        match db {
            Db::Postgres(p) => {
                let mut c = p.acquire().await.unwrap();
                sqlx::query("SET session_replication_role = replica")
                    .execute(&mut *c)
                    .await
                    .unwrap();
                for sql in statements {
                    sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                        .execute(&mut *c)
                        .await
                        .unwrap();
                }
                sqlx::query("SET session_replication_role = DEFAULT")
                    .execute(&mut *c)
                    .await
                    .unwrap();
            }
            Db::Sqlite(p) => {
                for trigger in ["audit_events_no_update", "audit_events_no_delete"] {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP TRIGGER IF EXISTS {trigger}"
                    )))
                    .execute(p)
                    .await
                    .unwrap();
                }
                for sql in statements {
                    sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                        .execute(p)
                        .await
                        .unwrap();
                }
            }
        }
    }

    fn quoted(text: &str) -> String {
        format!("'{}'", text.replace('\'', "''"))
    }

    /// Changes the outcome of event `seq`.
    pub async fn set_outcome(db: &Db, seq: i64, outcome: &str) {
        let sql = format!(
            "UPDATE audit_events SET outcome = {} WHERE seq = {seq}",
            quoted(outcome)
        );
        as_admin(db, &[sql]).await;
    }

    /// Replaces the stored details text of event `seq`.
    pub async fn set_details(db: &Db, seq: i64, details: &str) {
        let sql = format!(
            "UPDATE audit_events SET details = {} WHERE seq = {seq}",
            quoted(details)
        );
        as_admin(db, &[sql]).await;
    }

    /// Replaces the hash of event `seq`.
    pub async fn set_hash(db: &Db, seq: i64, hash: &str) {
        let sql = format!(
            "UPDATE audit_events SET hash = {} WHERE seq = {seq}",
            quoted(hash)
        );
        as_admin(db, &[sql]).await;
    }

    /// Deletes the events with `seq` in `from..=to`.
    pub async fn delete(db: &Db, from: i64, to: i64) {
        let sql = format!("DELETE FROM audit_events WHERE seq >= {from} AND seq <= {to}");
        as_admin(db, &[sql]).await;
    }

    /// Swaps the positions of events `a` and `b` by renumbering them.
    pub async fn swap(db: &Db, a: i64, b: i64) {
        as_admin(
            db,
            &[
                format!("UPDATE audit_events SET seq = -1 WHERE seq = {a}"),
                format!("UPDATE audit_events SET seq = {a} WHERE seq = {b}"),
                format!("UPDATE audit_events SET seq = {b} WHERE seq = -1"),
            ],
        )
        .await;
    }

    /// Event `seq` as stored.
    pub async fn event(db: &Db, seq: i64) -> StoredEvent {
        let page = chain_page(db, seq, 1).await.unwrap();
        let event = page.into_iter().next().unwrap();
        assert_eq!(event.record.seq, seq, "event {seq} is missing");
        event
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::audit::{AuditEvent, AuditLog};
    use crate::config::DatabaseDriver;
    use crate::metrics::Metrics;
    use crate::storage::testing::TestDb;

    crate::both_databases!(the_database_refuses_edits_and_deletes);
    async fn the_database_refuses_edits_and_deletes(driver: DatabaseDriver) {
        let t = TestDb::new(driver).await;
        let log = AuditLog::new(t.db.clone(), Metrics::new());
        for n in 0..3 {
            log.record(AuditEvent {
                tenant: "acme".into(),
                actor: "alice".into(),
                action: "job.submit".into(),
                resource: format!("job/{n}"),
                outcome: "succeeded".into(),
                bypass: false,
                details: serde_json::json!({"n": n}),
            })
            .await
            .unwrap();
        }
        for sql in [
            "UPDATE audit_events SET outcome = 'denied' WHERE seq = 2",
            "DELETE FROM audit_events WHERE seq = 3",
        ] {
            let r = on_db!(&t.db, p => sqlx::query(sql).execute(p).await.map(|_| ()));
            let e = r.unwrap_err().to_string();
            assert!(e.contains("append-only"), "{driver:?} {sql}: {e}");
        }
        t.cleanup().await;
    }
}
