//! PostgreSQL backend: the durable state shared by any number of natter nodes.
//!
//! One connection pool serves reads and writes; PostgreSQL runs them concurrently. Reads
//! that must see one snapshot (a roster with its version, an archive page with its
//! cursors) run in a `REPEATABLE READ READ ONLY` transaction. Read-then-write transactions
//! lock the row they depend on (`FOR UPDATE` on the account or PEP node), so writers of
//! the same account on different nodes take turns instead of interleaving.
//!
//! Archive appends and offline pushes are group-committed like SQLite's (`crate::batch`):
//! one transaction per batch, consecutive archive rows in one multi-row INSERT, each
//! request under a savepoint because a failed statement aborts a PostgreSQL transaction.
//!
//! Schema: `crates/store/migrations/postgres`, embedded and applied at open; the same
//! tables, keys and cascades as SQLite's, with BIGINT/BYTEA/BOOLEAN columns.

use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, Postgres, QueryBuilder, Transaction};

use crate::batch::{ArchiveRow as BatchRow, BatchBackend, BatchWriter, OfflineRow};
use crate::health::WriteHealth;
use crate::sql::{
    archive_rows, credentials_from_rows, db, is_unique_violation, limit_of, mam_prefs_from,
    roster_from_rows, row_to_item, tighter, to_archived, to_offline, to_pep_config, to_pep_items,
    to_u64, to_upload, to_uploads, to_version, upload_size, ArchiveRow, ArchiveTable, CredRow,
    DbResult, ItemRow, Position, UploadRow, LAST_ARCHIVE_TS, ROOM_ARCHIVE, UPLOAD_COLUMNS,
    USER_ARCHIVE,
};
use crate::{
    dedup_groups, domain_of, kv_check, now_micros, now_unix, AccountCredentials, AccountStore,
    ArchivePage, ArchiveQuery, ArchiveStore, ArchivedMessage, BlockStore, KvStore, Lifecycle,
    MamPrefs, NewArchiveEntry, OfflineMessage, OfflineStore, PepItem, PepNodeConfig, PepStore,
    ProfileStore, RoomStore, RosterItem, RosterStore, StoreError, Upload, UploadStore,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

type Tx = Transaction<'static, Postgres>;

/// Rows deleted per transaction by [`ArchiveStore::archive_prune`], so a big prune doesn't
/// hold locks (and stall group commits) for long.
const PRUNE_CHUNK: i64 = 5000;
/// How long opening, or any operation, waits for a connection before
/// failing: while PostgreSQL is down a message is refused (type wait)
/// after this, not held for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct PgStore {
    pool: PgPool,
    /// Group-commit task for archive appends and offline pushes.
    batch: BatchWriter,
    /// Outcome of the latest writes, for [`Lifecycle::writable`].
    health: Arc<WriteHealth>,
}

/// The URL with its password (if any) replaced, for error messages and logs.
pub fn redacted(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => url.to_owned(),
            },
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// `url` (`postgres://…/db?params`) naming database `name` instead.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, params) = match url.split_once('?') {
        Some((b, p)) => (b, Some(p)),
        None => (url, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(slash) => &base[..after_scheme + slash],
        None => base,
    };
    match params {
        Some(p) => format!("{base}/{name}?{p}"),
        None => format!("{base}/{name}"),
    }
}

/// Creates database `name` on the server `server_url` points at (any database there).
pub async fn create_database(server_url: &str, name: &str) -> Result<(), StoreError> {
    admin(server_url, &format!("CREATE DATABASE \"{name}\"")).await
}

/// Drops database `name` (if it exists), closing its remaining connections.
pub async fn drop_database(server_url: &str, name: &str) -> Result<(), StoreError> {
    admin(
        server_url,
        &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
    )
    .await
}

async fn admin(server_url: &str, sql: &str) -> Result<(), StoreError> {
    let shown = redacted(server_url);
    let mut conn = connect_options(server_url)?.connect().await.map_err(|e| {
        StoreError::Backend(format!("cannot connect to PostgreSQL at {shown}: {e}"))
    })?;
    let done = conn
        .execute(sql)
        .await
        .map(drop)
        .map_err(|e| StoreError::Backend(format!("PostgreSQL at {shown}: {sql}: {e}")));
    let _ = conn.close().await;
    done
}

fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Backend(format!("invalid PostgreSQL URL {}: {e}", redacted(url))))
}

impl PgStore {
    /// Connects (at most `connections` at a time) and migrates. Fails with a clear error
    /// naming the server (password hidden) when it can't.
    pub async fn open(url: &str, connections: u32) -> Result<Self, StoreError> {
        let shown = redacted(url);
        let options = connect_options(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(connections.max(2))
            .acquire_timeout(CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| {
                StoreError::Backend(format!("cannot connect to PostgreSQL at {shown}: {e}"))
            })?;
        // Concurrent nodes starting together: sqlx takes an advisory lock while migrating.
        if let Err(e) = MIGRATOR.run(&pool).await {
            pool.close().await;
            return Err(StoreError::Migration(format!("PostgreSQL at {shown}: {e}")));
        }
        let last_ts: Option<i64> = sqlx::query_scalar(LAST_ARCHIVE_TS)
            .fetch_one(&pool)
            .await
            .db()?;
        let health = Arc::new(WriteHealth::default());
        let batch = BatchWriter::spawn(PgBatch(pool.clone()), last_ts.unwrap_or(0), health.clone());
        Ok(PgStore {
            pool,
            batch,
            health,
        })
    }

    /// Group-commit counters since open: (transactions, requests committed in them).
    /// Appends group-commit `rows` to archive `t`.
    async fn append_rows(
        &self,
        t: &'static ArchiveTable,
        rows: Vec<BatchRow>,
    ) -> Result<(), StoreError> {
        self.batch.archive(t, rows).await
    }

    /// Archive appends are in their table once acknowledged: nothing to wait for.
    async fn archive_barrier(&self, _t: &ArchiveTable) -> Result<(), StoreError> {
        Ok(())
    }

    /// Nothing to prepare before an account is deleted.
    async fn account_going(&self, _user: &str) -> Result<(), StoreError> {
        Ok(())
    }

    pub fn group_commit_stats(&self) -> (u64, u64) {
        let s = &self.batch.stats;
        (
            s.batches.load(Ordering::Relaxed),
            s.requests.load(Ordering::Relaxed),
        )
    }

    async fn write_tx(&self) -> Result<Tx, StoreError> {
        self.pool.begin().await.db()
    }

    /// A read transaction on one snapshot.
    async fn read_tx(&self) -> Result<Tx, StoreError> {
        self.pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .db()
    }

    /// By id list: the planner picks the `(owner, id)` index by itself.
    fn archive_by_ids(t: &ArchiveTable) -> String {
        format!(" FROM {}", t.table)
    }
    /// The node row stays locked until the publish commits, so concurrent publishers (on
    /// any node) take turns.
    const NODE_FOR_PUBLISH: &'static str =
        "SELECT max_items, item_expire FROM pep_nodes WHERE owner = $1 AND node = $2 FOR UPDATE";

    fn read_pool(&self) -> &PgPool {
        &self.pool
    }

    fn write_pool(&self) -> &PgPool {
        &self.pool
    }

    async fn delete_offline(&self, user: &str, seqs: &[u64]) -> Result<u64, StoreError> {
        let seqs: Vec<i64> = seqs.iter().filter_map(|&s| i64::try_from(s).ok()).collect();
        Ok(
            sqlx::query("DELETE FROM offline_messages WHERE username = $1 AND seq = ANY($2)")
                .bind(user)
                .bind(seqs)
                .execute(&self.pool)
                .await
                .db()?
                .rows_affected(),
        )
    }

    /// A real write of about `bytes` (the `write_probe` row rewritten), so it fails where
    /// writes fail: server unreachable, disk full, read-only standby.
    async fn probe_write(&self, bytes: usize) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO write_probe (id, at, pad) VALUES (1, $1, $2) \
             ON CONFLICT (id) DO UPDATE SET at = excluded.at, pad = excluded.pad",
        )
        .bind(now_micros())
        .bind(vec![0u8; bytes])
        .execute(&self.pool)
        .await
        .db()?;
        Ok(())
    }

    /// The account's roster version, or `None` if there is no such account. In a write
    /// transaction (`lock`) the account row stays locked until it ends, so writers of the
    /// same account (on any node) take turns.
    async fn version_in(tx: &mut Tx, user: &str, lock: bool) -> Result<Option<u64>, StoreError> {
        let sql = if lock {
            "SELECT roster_version FROM accounts WHERE username = $1 FOR UPDATE"
        } else {
            "SELECT roster_version FROM accounts WHERE username = $1"
        };
        let v: Option<i64> = sqlx::query_scalar(sql)
            .bind(user)
            .fetch_optional(&mut **tx)
            .await
            .db()?;
        v.map(to_version).transpose()
    }

    async fn account_exists(tx: &mut Tx, user: &str) -> Result<bool, StoreError> {
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM accounts WHERE username = $1)")
            .bind(user)
            .fetch_one(&mut **tx)
            .await
            .db()
    }
}

crate::sql_impls::sql_store!(PgStore, Postgres);

#[async_trait::async_trait]
impl Lifecycle for PgStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&self.pool)
            .await
            .db()?;
        debug_assert_eq!(one, 1);
        Ok(())
    }

    async fn writable(&self) -> Result<(), StoreError> {
        self.health.check(|bytes| self.probe_write(bytes)).await
    }

    async fn close(&self) {
        // Commit what is queued for group commit first; later requests fail.
        self.batch.shutdown().await;
        self.pool.close().await;
    }
}

/// PostgreSQL's side of group commit.
struct PgBatch(PgPool);

#[async_trait::async_trait]
impl BatchBackend for PgBatch {
    type Tx = Tx;
    // Any failed statement aborts the transaction.
    const STATEMENT_SCOPED: bool = false;
    // 6 parameters each, under PostgreSQL's limit of 65535 per statement.
    const ROWS_PER_INSERT: usize = 500;

    async fn begin(&self) -> Result<Tx, sqlx::Error> {
        self.0.begin().await
    }

    async fn commit(tx: Tx) -> Result<(), sqlx::Error> {
        tx.commit().await
    }

    async fn execute(tx: &mut Tx, sql: &'static str) -> Result<(), sqlx::Error> {
        sqlx::query(sql).execute(&mut **tx).await.map(drop)
    }

    async fn insert_archive(
        tx: &mut Tx,
        table: &ArchiveTable,
        rows: &[&BatchRow],
        ts: i64,
    ) -> Result<(), sqlx::Error> {
        insert_archive_rows(tx, table, rows, ts).await
    }

    async fn push_offline(
        tx: &mut Tx,
        msg: &OfflineRow<'_>,
        now: i64,
    ) -> Result<Option<i64>, sqlx::Error> {
        push_offline_row(tx, msg, now).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testsuite::{self, PgTestDb};

    #[tokio::test]
    async fn conformance() {
        let db = PgTestDb::create().await;
        let store = PgStore::open(&db.url, 8).await.expect("open");
        testsuite::conformance(&store).await;
        let (batches, requests) = store.group_commit_stats();
        assert!(batches > 0 && requests >= batches, "{batches} {requests}");
        store.writable().await.expect("writable");
        store.close().await;
        let late = [crate::NewArchiveEntry {
            owner: "a@b".into(),
            with: "c@d".into(),
            stanza: "<message/>".into(),
            outgoing: true,
        }];
        let closed = store.archive_append(&late).await;
        assert!(matches!(closed, Err(StoreError::Backend(_))), "{closed:?}");
        db.drop_now().await;
    }

    #[tokio::test]
    async fn reopen_keeps_data_and_migrations_are_idempotent() {
        let db = PgTestDb::create().await;
        let store = PgStore::open(&db.url, 4).await.expect("open");
        store
            .create_account("a@x", &testsuite::credentials(1))
            .await
            .unwrap();
        let ids = store
            .archive_append(&[crate::NewArchiveEntry {
                owner: "a@x".into(),
                with: "b@x".into(),
                stanza: "<message/>".into(),
                outgoing: false,
            }])
            .await
            .unwrap();
        store
            .offline_push("a@x", "<m/>", None, 10, 5)
            .await
            .unwrap();
        store.room_put("r@muc.x", "{}").await.unwrap();
        let room_ids = store
            .room_archive_append("r@muc.x", &[("a@x".into(), "<m/>".into())])
            .await
            .unwrap();
        store.close().await;
        let store = PgStore::open(&db.url, 4).await.expect("reopen");
        let m = store
            .room_archive_get("r@muc.x", &room_ids[0])
            .await
            .unwrap()
            .unwrap();
        assert_eq!((m.owner.as_str(), m.stanza.as_str()), ("r@muc.x", "<m/>"));
        assert_eq!(
            store
                .archive_get("a@x", &ids[0])
                .await
                .unwrap()
                .unwrap()
                .stanza,
            "<message/>"
        );
        assert_eq!(store.offline_count("a@x").await.unwrap(), 1);
        store.close().await;
        db.drop_now().await;
    }

    #[tokio::test]
    async fn unreachable_server_is_a_clear_error() {
        // Port 1 on loopback: nothing listens there.
        let r = PgStore::open("postgres://natter:secret@127.0.0.1:1/natter", 2).await;
        let Err(StoreError::Backend(e)) = r else {
            panic!("expected a backend error")
        };
        assert!(
            e.contains("cannot connect to PostgreSQL at postgres://natter:***@127.0.0.1:1/natter"),
            "{e}"
        );
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn urls() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "n"),
            "postgres://u@h:5432/n"
        );
        assert_eq!(
            with_database("postgres://u@h/postgres?sslmode=disable", "n"),
            "postgres://u@h/n?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "n"), "postgres://h/n");
        assert_eq!(redacted("postgres://u:p@h/d"), "postgres://u:***@h/d");
        assert_eq!(redacted("postgres://u@h/d"), "postgres://u@h/d");
    }
}
