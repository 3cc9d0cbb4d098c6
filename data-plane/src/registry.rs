//! Where session records outlive the process: `memory` (nothing survives a
//! restart), `file` (one JSON file per session, written by atomic rename,
//! so a kill -9 at any moment leaves each record whole or absent) and `redis`
//! (one hash, shared by replicas). The agent token inside a record is sealed
//! with the KEK before it is written anywhere.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use shared::agent::EffectiveLimits;

/// A session record as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredSession {
    pub session_id: String,
    pub tenant: String,
    pub runtime: String,
    /// The agent endpoint that serves the session (its sandbox handle's);
    /// absent in records written before records carried it (then: the
    /// backend's default, the local agent). Bound into the sealed token's
    /// associated data, so a rewritten endpoint does not open the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The agent token sealed with the KEK (hex), if one was issued.
    pub sealed_token: Option<String>,
    pub limits: EffectiveLimits,
    pub isolation: String,
    pub warm: bool,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// The sandbox vanished (found so at a restart).
    #[serde(default)]
    pub lost: bool,
}

/// What persisting can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("session registry file: {0}")]
    Io(#[from] std::io::Error),
    #[error("session registry redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("session registry record: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("session registry key: {0}")]
    InvalidKey(String),
}

/// Refuses a file name or Redis field built from anything outside the id
/// alphabet (`/`, `..`, NUL, ...): the second line behind the typed ids.
fn checked(parts: &[&str]) -> Result<(), RegistryError> {
    shared::ids::storage_key(parts)
        .map(|_| ())
        .map_err(|e| RegistryError::InvalidKey(e.0))
}

/// A directory (and its parents) private to the data plane's user (0700).
async fn private_dir(dir: &std::path::Path) -> Result<(), RegistryError> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || crate::workspace::blobs::private_dir_all(&dir))
        .await
        .map_err(std::io::Error::other)??;
    Ok(())
}

/// The configured backend.
pub enum SessionRegistry {
    Memory,
    File {
        dir: PathBuf,
    },
    Redis {
        conn: redis::aio::ConnectionManager,
        key: String,
    },
}

impl SessionRegistry {
    pub fn file(dir: PathBuf) -> Result<Self, RegistryError> {
        crate::workspace::blobs::private_dir_all(&dir)?;
        Ok(SessionRegistry::File { dir })
    }

    pub async fn redis(url: &str, prefix: &str) -> Result<Self, RegistryError> {
        let client = redis::Client::open(url)?;
        let conn = redis::aio::ConnectionManager::new(client).await?;
        Ok(SessionRegistry::Redis {
            conn,
            key: format!("{prefix}sessions"),
        })
    }

    /// Whether the backend answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), RegistryError> {
        match self {
            SessionRegistry::Memory => Ok(()),
            SessionRegistry::File { dir } => {
                tokio::fs::metadata(dir).await?;
                Ok(())
            }
            SessionRegistry::Redis { conn, .. } => {
                let mut conn = conn.clone();
                let _: String = redis::cmd("PING").query_async(&mut conn).await?;
                Ok(())
            }
        }
    }

    /// Every stored record.
    pub async fn load(&self) -> Result<Vec<StoredSession>, RegistryError> {
        match self {
            SessionRegistry::Memory => Ok(Vec::new()),
            SessionRegistry::File { dir } => {
                let mut out = Vec::new();
                let mut entries = tokio::fs::read_dir(dir).await?;
                while let Some(e) = entries.next_entry().await? {
                    let name = e.file_name();
                    if !name.to_string_lossy().ends_with(".json") || e.path().is_dir() {
                        continue;
                    }
                    out.push(serde_json::from_slice(&tokio::fs::read(e.path()).await?)?);
                }
                Ok(out)
            }
            SessionRegistry::Redis { conn, key } => {
                let mut conn = conn.clone();
                let all: Vec<(String, String)> = redis::cmd("HGETALL")
                    .arg(key)
                    .query_async(&mut conn)
                    .await?;
                all.into_iter()
                    .map(|(_, v)| Ok(serde_json::from_str(&v)?))
                    .collect()
            }
        }
    }

    /// Writes (or replaces) a record durably before returning.
    pub async fn put(&self, rec: &StoredSession) -> Result<(), RegistryError> {
        checked(&[&rec.session_id, &rec.tenant])?;
        let json = serde_json::to_vec(rec)?;
        match self {
            SessionRegistry::Memory => Ok(()),
            SessionRegistry::File { dir } => {
                let tmp = dir.join(format!(".{}.tmp", rec.session_id));
                let path = dir.join(format!("{}.json", rec.session_id));
                {
                    use tokio::io::AsyncWriteExt;
                    let mut f = tokio::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)
                        .await?;
                    f.write_all(&json).await?;
                    f.sync_all().await?;
                }
                tokio::fs::rename(&tmp, &path).await?;
                Ok(())
            }
            SessionRegistry::Redis { conn, key } => {
                let mut conn = conn.clone();
                let _: () = redis::cmd("HSET")
                    .arg(key)
                    .arg(&rec.session_id)
                    .arg(json)
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            }
        }
    }

    /// Saves a finished job's result (jobs run once per tenant and id, also
    /// across restarts) for `lifetime` (Redis: the key expires; file: a
    /// result older than that is treated as absent and removed). `sealed`
    /// is opaque here: the job service seals it with the KEK, bound to the
    /// tenant and job id.
    pub async fn put_job(
        &self,
        tenant: &str,
        job_id: &str,
        sealed: &[u8],
        lifetime: std::time::Duration,
    ) -> Result<(), RegistryError> {
        checked(&[tenant, job_id])?;
        match self {
            SessionRegistry::Memory => Ok(()),
            SessionRegistry::File { dir } => {
                let jobs = dir.join("jobs").join(tenant);
                private_dir(&jobs).await?;
                let tmp = jobs.join(format!(".{job_id}.tmp"));
                {
                    use tokio::io::AsyncWriteExt;
                    let mut f = tokio::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)
                        .await?;
                    f.write_all(sealed).await?;
                    f.sync_all().await?;
                }
                tokio::fs::rename(&tmp, jobs.join(format!("{job_id}.sealed"))).await?;
                Ok(())
            }
            SessionRegistry::Redis { conn, key } => {
                let mut conn = conn.clone();
                let _: () = redis::cmd("SET")
                    .arg(format!("{key}:job:{tenant}/{job_id}"))
                    .arg(sealed)
                    .arg("PX")
                    .arg(lifetime.as_millis().max(1) as u64)
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            }
        }
    }

    /// A saved job result (as sealed), unless older than `lifetime`.
    pub async fn get_job(
        &self,
        tenant: &str,
        job_id: &str,
        lifetime: std::time::Duration,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        checked(&[tenant, job_id])?;
        match self {
            SessionRegistry::Memory => Ok(None),
            SessionRegistry::File { dir } => {
                let path = dir
                    .join("jobs")
                    .join(tenant)
                    .join(format!("{job_id}.sealed"));
                let expired = match tokio::fs::metadata(&path).await {
                    Ok(m) => m
                        .modified()
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age >= lifetime),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(e.into()),
                };
                if expired {
                    let _ = tokio::fs::remove_file(&path).await;
                    return Ok(None);
                }
                match tokio::fs::read(&path).await {
                    Ok(b) => Ok(Some(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            SessionRegistry::Redis { conn, key } => {
                let mut conn = conn.clone();
                let v: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(format!("{key}:job:{tenant}/{job_id}"))
                    .query_async(&mut conn)
                    .await?;
                Ok(v)
            }
        }
    }

    /// Claims (tenant, job id) for one run across replicas sharing this
    /// registry: Redis `SET NX PX` (true: the caller may run it; false:
    /// another replica holds it). Memory and file registries are not shared
    /// between replicas: always true (the in-process claim decides).
    pub async fn claim_job(
        &self,
        tenant: &str,
        job_id: &str,
        owner: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, RegistryError> {
        checked(&[tenant, job_id])?;
        match self {
            SessionRegistry::Memory | SessionRegistry::File { .. } => Ok(true),
            SessionRegistry::Redis { conn, key } => {
                let mut conn = conn.clone();
                let set: Option<String> = redis::cmd("SET")
                    .arg(format!("{key}:claim:{tenant}/{job_id}"))
                    .arg(owner)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl.as_millis().max(1) as u64)
                    .query_async(&mut conn)
                    .await?;
                Ok(set.is_some())
            }
        }
    }

    /// Gives up a claim taken with [`SessionRegistry::claim_job`], only if
    /// `owner` still holds it.
    pub async fn release_job(
        &self,
        tenant: &str,
        job_id: &str,
        owner: &str,
    ) -> Result<(), RegistryError> {
        checked(&[tenant, job_id])?;
        match self {
            SessionRegistry::Memory | SessionRegistry::File { .. } => Ok(()),
            SessionRegistry::Redis { conn, key } => {
                let mut conn = conn.clone();
                let _: i64 = redis::cmd("EVAL")
                    .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end")
                    .arg(1)
                    .arg(format!("{key}:claim:{tenant}/{job_id}"))
                    .arg(owner)
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            }
        }
    }

    pub async fn remove(&self, session_id: &str) -> Result<(), RegistryError> {
        checked(&[session_id])?;
        match self {
            SessionRegistry::Memory => Ok(()),
            SessionRegistry::File { dir } => {
                match tokio::fs::remove_file(dir.join(format!("{session_id}.json"))).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            SessionRegistry::Redis { conn, key } => {
                let mut conn = conn.clone();
                let _: () = redis::cmd("HDEL")
                    .arg(key)
                    .arg(session_id)
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn record(id: &str, tenant: &str) -> StoredSession {
        StoredSession {
            session_id: id.into(),
            tenant: tenant.into(),
            runtime: "python".into(),
            endpoint: None,
            sealed_token: None,
            limits: EffectiveLimits {
                memory_mb: 256,
                cpu_millicores: 1000,
                max_processes: 64,
                disk_mb: 64,
                timeout_ms: 1000,
                max_output_bytes: 1024,
            },
            isolation: "gvisor".into(),
            warm: false,
            created_ms: 1,
            expires_ms: 2,
            lost: false,
        }
    }

    #[tokio::test]
    async fn file_records_are_private_and_keys_stay_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("registry");
        let reg = SessionRegistry::file(dir.clone()).unwrap();
        reg.put(&record("ses-1", "acme")).await.unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ses-1.json")), 0o600);
        // A secret next to the registry that no key may reach.
        std::fs::write(tmp.path().join("victim.json"), b"{}").unwrap();
        for bad in ["../victim", "..", "a/b", "a\0b", "/etc/passwd", "a\\b", ""] {
            assert!(
                matches!(
                    reg.put(&record(bad, "acme")).await,
                    Err(RegistryError::InvalidKey(_))
                ),
                "{bad:?}"
            );
            assert!(
                matches!(reg.remove(bad).await, Err(RegistryError::InvalidKey(_))),
                "{bad:?}"
            );
            assert!(
                matches!(
                    reg.put(&record("ses-2", bad)).await,
                    Err(RegistryError::InvalidKey(_))
                ),
                "tenant {bad:?}"
            );
        }
        assert!(tmp.path().join("victim.json").exists());
        assert_eq!(reg.load().await.unwrap().len(), 1);
    }
}
