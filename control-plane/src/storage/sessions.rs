//! The control plane's record of sessions (`sessions`: who created each,
//! its runtime and default step timeout) and their step history (`steps`).
//! The data plane is the authority on the sandbox itself. Every statement
//! carries the tenant.

use sqlx::Row;

use super::{Db, StorageError, WriteTx, on_db, on_tx};
use crate::sessions::StepRecord;

/// A session the data plane has just created.
#[derive(Debug, Clone)]
pub struct NewSession<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub subject: &'a str,
    pub app: Option<&'a str>,
    pub agent: Option<&'a str>,
    pub runtime: &'a str,
    pub timeout_ms: i64,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// Records a session.
pub async fn insert(tx: &mut WriteTx, s: &NewSession<'_>) -> Result<(), StorageError> {
    on_tx!(tx, c => sqlx::query(
        "INSERT INTO sessions (id, tenant, subject, app, agent, runtime, timeout_ms, created_ms, expires_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)")
        .bind(s.id).bind(s.tenant).bind(s.subject)
        .bind(s.app).bind(s.agent).bind(s.runtime)
        .bind(s.timeout_ms).bind(s.created_ms).bind(s.expires_ms)
        .execute(&mut **c).await.map(|_| ()))?;
    Ok(())
}

/// Marks the tenant's session `id` deleted at `now` (its steps stay).
pub async fn mark_deleted(db: &Db, tenant: &str, id: &str, now: i64) -> Result<(), StorageError> {
    on_db!(db, p => sqlx::query(
        "UPDATE sessions SET deleted_ms = $1 WHERE tenant = $2 AND id = $3")
        .bind(now).bind(tenant).bind(id)
        .execute(p).await.map(|_| ()))?;
    Ok(())
}

/// The runtime and default step timeout (ms) of the tenant's live
/// (not deleted) session `id`.
pub async fn live_runtime(
    db: &Db,
    tenant: &str,
    id: &str,
) -> Result<Option<(String, i64)>, StorageError> {
    let row: Option<(String, i64)> = on_db!(db, p => sqlx::query_as(
        "SELECT runtime, timeout_ms FROM sessions WHERE tenant = $1 AND id = $2 AND deleted_ms IS NULL")
        .bind(tenant).bind(id)
        .fetch_optional(p).await)?;
    Ok(row)
}

/// How many sessions of the tenant are live at `now` (not deleted, not
/// past their expiry): the concurrent-sessions quota (`crate::limits`).
pub async fn count_live(db: &Db, tenant: &str, now: i64) -> Result<i64, StorageError> {
    let n: i64 = on_db!(db, p => sqlx::query_scalar(
        "SELECT COUNT(*) FROM sessions WHERE tenant = $1 AND deleted_ms IS NULL AND expires_ms > $2")
        .bind(tenant).bind(now)
        .fetch_one(p).await)?;
    Ok(n)
}

/// Whether the tenant ever had session `id` (deleted ones included).
pub async fn exists(db: &Db, tenant: &str, id: &str) -> Result<bool, StorageError> {
    let created: Option<i64> = on_db!(db, p => sqlx::query_scalar(
        "SELECT created_ms FROM sessions WHERE tenant = $1 AND id = $2")
        .bind(tenant).bind(id)
        .fetch_optional(p).await)?;
    Ok(created.is_some())
}

/// A step to add to a session's history.
#[derive(Debug, Clone)]
pub struct NewStep<'a> {
    pub id: &'a str,
    pub session_id: &'a str,
    pub tenant: &'a str,
    pub status: &'a str,
    pub duration_ms: i64,
    pub code: &'a str,
    /// JSON text.
    pub result: &'a str,
    pub created_ms: i64,
}

/// Appends a step to its session's history, numbered after the last one.
pub async fn insert_step(tx: &mut WriteTx, s: &NewStep<'_>) -> Result<(), StorageError> {
    on_tx!(tx, c => sqlx::query(
        "INSERT INTO steps (id, session_id, tenant, seq, status, duration_ms, code, result, created_ms) \
         VALUES ($1, $2, $3, (SELECT COALESCE(MAX(seq), 0) + 1 FROM steps WHERE tenant = $3 AND session_id = $2), \
         $4, $5, $6, $7, $8)")
        .bind(s.id).bind(s.session_id).bind(s.tenant)
        .bind(s.status).bind(s.duration_ms).bind(s.code).bind(s.result).bind(s.created_ms)
        .execute(&mut **c).await.map(|_| ()))?;
    Ok(())
}

/// The tenant's session's steps, in order.
pub async fn steps(
    db: &Db,
    tenant: &str,
    session_id: &str,
) -> Result<Vec<StepRecord>, StorageError> {
    on_db!(db, p => {
        let rows = sqlx::query(
            "SELECT * FROM steps WHERE tenant = $1 AND session_id = $2 ORDER BY seq")
            .bind(tenant).bind(session_id)
            .fetch_all(p).await?;
        rows.iter().map(|r| Ok(StepRecord {
            step_id: r.try_get("id")?,
            seq: r.try_get("seq")?,
            status: r.try_get("status")?,
            duration_ms: r.try_get("duration_ms")?,
            code: r.try_get("code")?,
            result: serde_json::from_str(&r.try_get::<String, _>("result")?)
                .unwrap_or_default(),
            created_at_ms: r.try_get("created_ms")?,
        })).collect()
    })
}
