//! Tenant policies (`tenant_policies`): every version a tenant stored,
//! numbered 1, 2, 3, ... per tenant, never changed once written.

use sqlx::Row;

use super::{Db, Dialect, StorageError, WriteTx, on_db, on_tx};
use crate::policy::TenantPolicy;

/// The tenant's latest version number, 0 when it has stored none.
pub async fn latest_version(db: &Db, tenant: &str) -> Result<i64, StorageError> {
    let latest: Option<i64> = on_db!(db, p => sqlx::query_scalar(
        "SELECT MAX(version) FROM tenant_policies WHERE tenant = $1")
        .bind(tenant)
        .fetch_one(p).await)?;
    Ok(latest.unwrap_or(0))
}

/// The number the tenant's next version gets. On Postgres the tenant's
/// versions are locked until the transaction ends, so two replicas cannot
/// both take the same number; SQLite's write lock does that already.
pub async fn next_version(tx: &mut WriteTx, tenant: &str) -> Result<i64, StorageError> {
    if tx.dialect() == Dialect::Postgres {
        on_tx!(tx, c => sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(format!("policy:{tenant}"))
            .execute(&mut **c).await.map(|_| ()))?;
    }
    let version: i64 = on_tx!(tx, c => sqlx::query_scalar(
        "SELECT COALESCE(MAX(version), 0) + 1 FROM tenant_policies WHERE tenant = $1")
        .bind(tenant)
        .fetch_one(&mut **c).await)?;
    Ok(version)
}

/// Stores a version (`last_fault` is not stored: it is this replica's).
pub async fn insert(tx: &mut WriteTx, policy: &TenantPolicy) -> Result<(), StorageError> {
    on_tx!(tx, c => sqlx::query(
        "INSERT INTO tenant_policies (tenant, version, rego, sha256, created_by, created_ms) \
         VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(&policy.tenant).bind(policy.version).bind(&policy.rego)
        .bind(&policy.sha256).bind(&policy.created_by).bind(policy.created_ms)
        .execute(&mut **c).await.map(|_| ()))?;
    Ok(())
}

/// The tenant's versions, newest first, at most `limit`.
pub async fn versions(
    db: &Db,
    tenant: &str,
    limit: i64,
) -> Result<Vec<TenantPolicy>, StorageError> {
    on_db!(db, p => {
        let rows = sqlx::query(
            "SELECT * FROM tenant_policies WHERE tenant = $1 ORDER BY version DESC LIMIT $2")
            .bind(tenant).bind(limit)
            .fetch_all(p).await?;
        rows.iter().map(|r| Ok(TenantPolicy {
            tenant: r.try_get("tenant")?,
            version: r.try_get("version")?,
            rego: r.try_get("rego")?,
            sha256: r.try_get("sha256")?,
            created_by: r.try_get("created_by")?,
            created_ms: r.try_get("created_ms")?,
            last_fault: None,
        })).collect()
    })
}
