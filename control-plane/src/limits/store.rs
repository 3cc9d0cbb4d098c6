//! Where the buckets live: in this process, or in Redis shared by every
//! replica. In Redis one Lua script takes a token atomically (EVALSHA, EVAL
//! when the server lost its script cache), on Redis's own clock (`TIME`),
//! so replicas with skewed clocks still share one bucket and nothing is
//! read, changed and written back from Rust.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::OnceCell;

use super::bucket::{LocalBuckets, Rate, Verdict};

/// The Redis twin of [`super::bucket::gcra`]. KEYS[1] holds the TAT in
/// microseconds of Redis time; ARGV: interval (µs), burst. Returns
/// `{allowed, remaining, retry_after_us, reset_us}`.
pub const BUCKET_LUA: &str = r"
local t = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = now
local stored = redis.call('GET', KEYS[1])
if stored then
  local v = tonumber(stored)
  if v and v > now then tat = v end
end
local new_tat = tat + t
local allow_at = new_tat - t * burst
if now < allow_at then
  return {0, 0, allow_at - now, tat - now}
end
local remaining = math.floor((now - allow_at) / t)
if remaining > burst then remaining = burst end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, remaining, 0, new_tat - now}
";

/// Why the shared store did not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("Redis failed moments ago; not asked again until {0} ms")]
    Backoff(u64),
    #[error("Redis answered something unexpected: {0}")]
    Protocol(String),
}

/// The configured store.
pub enum Store {
    Local(LocalBuckets),
    Redis(Box<RedisBuckets>),
}

/// Buckets in Redis. The connection is made on first use (so start-up does
/// not wait for Redis) and re-made by the connection manager after a drop;
/// after a failure Redis is not asked again for [`BACKOFF`], so an outage
/// costs requests nothing but a branch.
pub struct RedisBuckets {
    client: redis::Client,
    conn: OnceCell<redis::aio::ConnectionManager>,
    /// What `SCRIPT LOAD` named the script.
    sha: OnceCell<String>,
    timeout: Duration,
    down_until_ms: AtomicU64,
}

/// How long a failed Redis is left alone before it is asked again.
pub const BACKOFF: Duration = Duration::from_millis(500);

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl RedisBuckets {
    /// A store on `url` (nothing is connected yet).
    pub fn new(url: &str, timeout: Duration) -> Result<RedisBuckets, StoreError> {
        Ok(RedisBuckets {
            client: redis::Client::open(url)?,
            conn: OnceCell::new(),
            sha: OnceCell::new(),
            timeout,
            down_until_ms: AtomicU64::new(0),
        })
    }

    async fn conn(&self) -> Result<redis::aio::ConnectionManager, StoreError> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let conn = self
            .conn
            .get_or_try_init(|| {
                redis::aio::ConnectionManager::new_with_config(self.client.clone(), config)
            })
            .await?;
        Ok(conn.clone())
    }

    /// Runs `f` unless Redis failed within [`BACKOFF`]; a failure or a
    /// timeout starts the back-off.
    async fn guarded<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, StoreError>>,
    {
        let until = self.down_until_ms.load(Ordering::Relaxed);
        if wall_ms() < until {
            return Err(StoreError::Backoff(until));
        }
        let outcome = match tokio::time::timeout(self.timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        };
        if outcome.is_err() {
            self.down_until_ms
                .store(wall_ms() + BACKOFF.as_millis() as u64, Ordering::Relaxed);
        }
        outcome
    }

    /// Takes one token from `key`'s bucket.
    pub async fn take(&self, key: &str, rate: Rate) -> Result<Verdict, StoreError> {
        self.guarded(async {
            let mut conn = self.conn().await?;
            let sha = self
                .sha
                .get_or_try_init(|| {
                    let mut conn = conn.clone();
                    async move {
                        redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(BUCKET_LUA)
                            .query_async::<String>(&mut conn)
                            .await
                    }
                })
                .await?;
            let args = (rate.interval_us(), rate.burst);
            let answer: Result<Vec<i64>, redis::RedisError> = redis::cmd("EVALSHA")
                .arg(sha)
                .arg(1)
                .arg(key)
                .arg(args.0)
                .arg(args.1)
                .query_async(&mut conn)
                .await;
            let answer = match answer {
                // Redis restarted or its script cache was flushed: EVAL
                // runs the script and caches it again.
                Err(e) if e.code() == Some("NOSCRIPT") => {
                    redis::cmd("EVAL")
                        .arg(BUCKET_LUA)
                        .arg(1)
                        .arg(key)
                        .arg(args.0)
                        .arg(args.1)
                        .query_async(&mut conn)
                        .await?
                }
                other => other?,
            };
            match answer.as_slice() {
                [allowed, remaining, retry, reset] => Ok(Verdict {
                    allowed: *allowed == 1,
                    remaining: (*remaining).clamp(0, i64::from(u32::MAX)) as u32,
                    retry_after_us: (*retry).max(0) as u64,
                    reset_us: (*reset).max(0) as u64,
                }),
                other => Err(StoreError::Protocol(format!("{other:?}"))),
            }
        })
        .await
    }

    /// Sets `key` for `ttl` unless it exists; true when this call set it
    /// (one replica wins per window).
    pub async fn set_once(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.guarded(async {
            let mut conn = self.conn().await?;
            let set: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async(&mut conn)
                .await?;
            Ok(set.is_some())
        })
        .await
    }
}
