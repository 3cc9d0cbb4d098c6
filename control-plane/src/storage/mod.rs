//! The metadata database: PostgreSQL in production, SQLite embedded. One
//! schema for both (migrations under `migrations/{postgres,sqlite}`, applied
//! at start). Queries are written once: [`on_db!`] and [`on_tx!`] expand the
//! same code for each database, and the few statements that differ pick by
//! [`Dialect`].
//!
//! This module is the only one that speaks SQL: one repository per domain
//! ([`audit`], [`jobs`] with the workers' claims and the idempotency keys,
//! [`sessions`], [`policy`]), each a set of functions with typed arguments
//! and rows. Domain code calls them and never sees sqlx; a change that must
//! commit with its audit event takes a [`WriteTx`] from [`Db::begin_write`]
//! and passes it to each repository call. Failures are [`StorageError`]s,
//! which know nothing of HTTP: the domain maps them to its coded errors
//! (`crate::errors`). `tests/layering.rs` keeps it that way.

pub mod audit;
pub mod jobs;
pub mod policy;
pub mod sessions;
pub mod workflows;

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::{DatabaseDriver, redact_url};

/// A pool of one of the two databases.
#[derive(Clone, Debug)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// The SQL dialect, for the statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// Runs the same code against whichever pool `$db` holds: `$pool` is bound
/// to a `&PgPool` or a `&SqlitePool`.
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::storage::Db::Postgres($pool) => $body,
            $crate::storage::Db::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use on_db;

/// Runs the same code inside whichever transaction `$tx` (a `&mut
/// WriteTx`) holds: `$conn` is bound to the `&mut sqlx::Transaction` of
/// either database (`&mut **$conn` is its executor).
macro_rules! on_tx {
    ($tx:expr, $conn:ident => $body:expr) => {
        match &mut $tx.inner {
            $crate::storage::TxInner::Postgres($conn) => $body,
            $crate::storage::TxInner::Sqlite($conn) => $body,
        }
    };
}
pub(crate) use on_tx;

/// Why the database could not do what was asked. It says nothing about
/// HTTP: the domain decides what each case means to its caller.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database's settings are wrong (URL, schema name, file).
    #[error("{0}")]
    Config(String),
    /// The database cannot be reached now (pool exhausted or closed,
    /// network, TLS): worth retrying later.
    #[error("database: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A stored row does not read back as what was written: altered at
    /// rest, or a bug.
    #[error("stored {what} is corrupt: {detail}")]
    Corrupt { what: String, detail: String },
    /// A value could not be encoded for storage (JSON text): a bug.
    #[error("{what} does not encode: {detail}")]
    Encode { what: String, detail: String },
    /// The database refused or failed a statement: a bug.
    #[error("database: {0}")]
    Query(#[source] sqlx::Error),
    /// The migrations could not be applied.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StorageError {
    fn from(e: sqlx::Error) -> StorageError {
        match e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => StorageError::Unavailable(e),
            other => StorageError::Query(other),
        }
    }
}

impl StorageError {
    /// A stored value of `what` that does not parse.
    pub(crate) fn corrupt(what: &str, detail: impl std::fmt::Display) -> StorageError {
        StorageError::Corrupt {
            what: what.to_owned(),
            detail: detail.to_string(),
        }
    }
}

/// `value` as the JSON text a column stores.
pub(crate) fn to_json<T: serde::Serialize + ?Sized>(
    what: &str,
    value: &T,
) -> Result<String, StorageError> {
    serde_json::to_string(value).map_err(|e| StorageError::Encode {
        what: what.to_owned(),
        detail: e.to_string(),
    })
}

/// A JSON text column read back as `T`.
pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    text: &str,
) -> Result<T, StorageError> {
    serde_json::from_str(text).map_err(|e| StorageError::corrupt(what, e))
}

/// An open write transaction on either database: `BEGIN IMMEDIATE` on
/// SQLite (the write lock is taken at once, so a later write cannot fail on
/// a stale snapshot), a plain `BEGIN` on Postgres. Repository functions
/// that take it run inside it; dropped without [`WriteTx::commit`], it
/// rolls back.
pub struct WriteTx {
    inner: TxInner,
}

/// The transaction of one database.
enum TxInner {
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
}

impl WriteTx {
    /// Which SQL dialect the transaction speaks.
    pub(crate) fn dialect(&self) -> Dialect {
        match self.inner {
            TxInner::Postgres(_) => Dialect::Postgres,
            TxInner::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// Makes every change of the transaction durable.
    pub async fn commit(self) -> Result<(), StorageError> {
        match self.inner {
            TxInner::Postgres(tx) => tx.commit().await?,
            TxInner::Sqlite(tx) => tx.commit().await?,
        }
        Ok(())
    }

    /// Undoes every change of the transaction.
    pub async fn rollback(self) -> Result<(), StorageError> {
        match self.inner {
            TxInner::Postgres(tx) => tx.rollback().await?,
            TxInner::Sqlite(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

impl Db {
    /// Connects and applies the migrations.
    pub async fn connect(
        driver: DatabaseDriver,
        url: &str,
        max_connections: u32,
    ) -> Result<Db, StorageError> {
        Self::connect_in_schema(driver, url, max_connections, None).await
    }

    /// As [`Db::connect`], with every Postgres connection confined to
    /// `schema` (created when missing). Tests isolate themselves with it.
    pub async fn connect_in_schema(
        driver: DatabaseDriver,
        url: &str,
        max_connections: u32,
        schema: Option<&str>,
    ) -> Result<Db, StorageError> {
        let db = match driver {
            DatabaseDriver::Postgres => {
                let mut opts = PgConnectOptions::from_str(url).map_err(|e| {
                    StorageError::Config(format!("DATABASE_URL {}: {e}", redact_url(url)))
                })?;
                if let Some(schema) = schema {
                    if !schema
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_')
                    {
                        return Err(StorageError::Config(format!("bad schema name {schema:?}")));
                    }
                    let admin = PgPoolOptions::new()
                        .max_connections(1)
                        .connect_with(opts.clone())
                        .await?;
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "CREATE SCHEMA IF NOT EXISTS {schema}"
                    )))
                    .execute(&admin)
                    .await?;
                    admin.close().await;
                    opts = opts.options([("search_path", schema)]);
                }
                let pool = PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(opts)
                    .await?;
                Db::Postgres(pool)
            }
            DatabaseDriver::Sqlite => {
                let opts = sqlite_options(url)?;
                private_files(opts.get_filename())?;
                let pool = SqlitePoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(opts)
                    .await?;
                Db::Sqlite(pool)
            }
        };
        db.migrate().await?;
        Ok(db)
    }

    async fn migrate(&self) -> Result<(), StorageError> {
        match self {
            Db::Postgres(p) => sqlx::migrate!("./migrations/postgres").run(p).await?,
            Db::Sqlite(p) => sqlx::migrate!("./migrations/sqlite").run(p).await?,
        }
        Ok(())
    }

    /// Which SQL dialect this database speaks.
    pub fn dialect(&self) -> Dialect {
        match self {
            Db::Postgres(_) => Dialect::Postgres,
            Db::Sqlite(_) => Dialect::Sqlite,
        }
    }

    /// Opens a write transaction (see [`WriteTx`]).
    pub async fn begin_write(&self) -> Result<WriteTx, StorageError> {
        let inner = match self {
            Db::Postgres(p) => TxInner::Postgres(p.begin().await?),
            Db::Sqlite(p) => TxInner::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
        };
        Ok(WriteTx { inner })
    }

    /// A cheap round trip, for `/readyz`.
    pub async fn ping(&self) -> Result<(), StorageError> {
        on_db!(self, p => sqlx::query("SELECT 1").execute(p).await.map(|_| ()))?;
        Ok(())
    }

    /// Closes every connection.
    pub async fn close(&self) {
        on_db!(self, p => p.close().await)
    }
}

/// The SQLite file holds every tenant's code, outputs and audit trail:
/// it is created 0600 (SQLite gives its `-wal` and `-shm` the database
/// file's mode), an existing one and its companions are made 0600, and a
/// missing directory is created 0700 (issue 15, section 6).
fn private_files(path: &std::path::Path) -> Result<(), StorageError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let name = path.to_string_lossy();
    if name.is_empty() || name.starts_with(':') || name.contains("mode=memory") {
        return Ok(());
    }
    let err = |e: std::io::Error| StorageError::Config(format!("DATABASE_URL {name}: {e}"));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(err)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let file = std::path::PathBuf::from(format!("{name}{suffix}"));
        if file.exists() {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
    }
    Ok(())
}

/// SQLite options from `file:NAME?...`, `sqlite:...` or `sqlite::memory:`:
/// WAL, a busy timeout, foreign keys on.
fn sqlite_options(url: &str) -> Result<SqliteConnectOptions, StorageError> {
    let normalized = match url.strip_prefix("file:") {
        Some(rest) => format!("sqlite:{rest}"),
        None => url.to_owned(),
    };
    let opts = SqliteConnectOptions::from_str(&normalized)
        .map_err(|e| StorageError::Config(format!("DATABASE_URL {url}: {e}")))?;
    Ok(opts
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A fresh random id with a type prefix (`job_…`, `ses_…`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", hex::encode(rand::random::<[u8; 12]>()))
}

#[cfg(test)]
pub mod testing {
    //! Databases for tests: a temporary SQLite file, or a fresh schema in
    //! the PostgreSQL on this machine (dropped by [`TestDb::cleanup`]).
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// `DATABASE_TEST_URL` or the machine's PostgreSQL.
    pub fn postgres_url() -> String {
        std::env::var("DATABASE_TEST_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    /// A database of one driver, isolated for one test.
    pub struct TestDb {
        pub db: Db,
        schema: Option<String>,
        _dir: Option<tempfile::TempDir>,
    }

    impl TestDb {
        pub async fn new(driver: DatabaseDriver) -> TestDb {
            match driver {
                DatabaseDriver::Sqlite => {
                    let dir = tempfile::Builder::new()
                        .prefix("cp-db-")
                        .tempdir_in("/tmp")
                        .unwrap();
                    let url = format!("file:{}/cp.db?mode=rwc", dir.path().display());
                    let db = Db::connect(driver, &url, 4).await.unwrap();
                    TestDb {
                        db,
                        schema: None,
                        _dir: Some(dir),
                    }
                }
                DatabaseDriver::Postgres => {
                    let schema = format!("cp_test_{}", hex::encode(rand::random::<[u8; 6]>()));
                    let db = Db::connect_in_schema(driver, &postgres_url(), 8, Some(&schema))
                        .await
                        .unwrap_or_else(|e| {
                            panic!(
                                "PostgreSQL is needed at {} ({e}); start it with \
                                 `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`",
                                postgres_url()
                            )
                        });
                    TestDb {
                        db,
                        schema: Some(schema),
                        _dir: None,
                    }
                }
            }
        }

        /// Drops the test's schema (Postgres) and closes the pool.
        pub async fn cleanup(self) {
            self.db.close().await;
            if let Some(schema) = self.schema {
                let admin = PgPool::connect(&postgres_url()).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE"
                )))
                .execute(&admin)
                .await
                .unwrap();
                admin.close().await;
            }
        }
    }
}

/// Runs `async fn $name(driver: DatabaseDriver)` on both databases, as two
/// tests: `$name::sqlite` (hermetic: a temporary file) and `$name::postgres`,
/// ignored outside the integration tier (`make test-integration`: PostgreSQL
/// on 127.0.0.1:5432, or `DATABASE_TEST_URL`; absent, it fails saying how to
/// start it).
#[cfg(test)]
#[macro_export]
macro_rules! both_databases {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn sqlite() {
                super::$name($crate::config::DatabaseDriver::Sqlite).await
            }

            #[tokio::test]
            #[ignore = "needs: PostgreSQL on 127.0.0.1:5432 (make test-integration)"]
            async fn postgres() {
                super::$name($crate::config::DatabaseDriver::Postgres).await
            }
        }
    )+};
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::testing::TestDb;
    use super::*;

    crate::both_databases!(both_databases_migrate_and_answer);
    async fn both_databases_migrate_and_answer(driver: DatabaseDriver) {
        let t = TestDb::new(driver).await;
        t.db.ping().await.unwrap();
        let n: i64 =
            on_db!(&t.db, p => sqlx::query_scalar("SELECT COUNT(*) FROM jobs").fetch_one(p).await)
                .unwrap();
        assert_eq!(n, 0);
        t.cleanup().await;
    }

    #[tokio::test]
    async fn the_sqlite_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("local");
        let url = format!("file:{}/cp.db?mode=rwc", dir.display());
        let db = Db::connect(DatabaseDriver::Sqlite, &url, 2).await.unwrap();
        db.ping().await.unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        for name in ["cp.db", "cp.db-wal", "cp.db-shm"] {
            assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
        }
        db.close().await;
    }

    #[test]
    fn seed_sqlite_url_is_accepted() {
        let o = sqlite_options("file:control-plane.db?cache=shared&mode=rwc").unwrap();
        assert!(o.get_filename().ends_with("control-plane.db"));
        assert!(sqlite_options("sqlite::memory:").is_ok());
    }
}
