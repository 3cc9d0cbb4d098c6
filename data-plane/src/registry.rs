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
        std::fs::create_dir_all(&dir)?;
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
    /// across restarts).
    pub async fn put_job(
        &self,
        tenant: &str,
        job_id: &str,
        result: &shared::dataplane::JobResult,
    ) -> Result<(), RegistryError> {
        let json = serde_json::to_vec(result)?;
        match self {
            SessionRegistry::Memory => Ok(()),
            SessionRegistry::File { dir } => {
                let jobs = dir.join("jobs").join(tenant);
                tokio::fs::create_dir_all(&jobs).await?;
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
                    f.write_all(&json).await?;
                    f.sync_all().await?;
                }
                tokio::fs::rename(&tmp, jobs.join(format!("{job_id}.json"))).await?;
                Ok(())
            }
            SessionRegistry::Redis { conn, key } => {
                let mut conn = conn.clone();
                let _: () = redis::cmd("HSET")
                    .arg(format!("{key}:jobs"))
                    .arg(format!("{tenant}/{job_id}"))
                    .arg(json)
                    .query_async(&mut conn)
                    .await?;
                Ok(())
            }
        }
    }

    /// A saved job result.
    pub async fn get_job(
        &self,
        tenant: &str,
        job_id: &str,
    ) -> Result<Option<shared::dataplane::JobResult>, RegistryError> {
        match self {
            SessionRegistry::Memory => Ok(None),
            SessionRegistry::File { dir } => {
                match tokio::fs::read(dir.join("jobs").join(tenant).join(format!("{job_id}.json")))
                    .await
                {
                    Ok(b) => Ok(Some(serde_json::from_slice(&b)?)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(e.into()),
                }
            }
            SessionRegistry::Redis { conn, key } => {
                let mut conn = conn.clone();
                let v: Option<String> = redis::cmd("HGET")
                    .arg(format!("{key}:jobs"))
                    .arg(format!("{tenant}/{job_id}"))
                    .query_async(&mut conn)
                    .await?;
                Ok(match v {
                    Some(v) => Some(serde_json::from_str(&v)?),
                    None => None,
                })
            }
        }
    }

    pub async fn remove(&self, session_id: &str) -> Result<(), RegistryError> {
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
