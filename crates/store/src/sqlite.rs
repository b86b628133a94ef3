//! Embedded SQLite backend.
//!
//! SQLite allows one writer at a time. Rather than letting several pooled connections race
//! for the write lock (and spin in the busy handler), all writes go through a pool with a
//! single connection, so in-process writers queue fairly; reads use a separate pool and run
//! concurrently thanks to WAL. Write transactions start with `BEGIN IMMEDIATE` so that a
//! second process (e.g. an admin CLI) can't make a read-then-write transaction fail halfway.
//!
//! The high-rate durable writes (archive appends, offline pushes) are group-committed by a
//! writer task (`crate::batch`, with `sqlite/batch.rs`), which also writes through the
//! single writer connection.
//!
//! The SQL both backends share (`$N` placeholders, portable SQL) is in `crate::sql_impls`,
//! expanded here; SQLite specifics (pragmas, checkpointing, `json_each`, `INDEXED BY`)
//! stay in this file.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Sqlite, Transaction};

use crate::batch::BatchWriter;
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

mod batch;
mod journal;
mod priority;

// `LAST_ARCHIVE_TS` looks at one fold's worth of the newest archive rows.
const _: () = assert!(journal::FOLD_MAX == 8192);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a connection waits for a lock held by another process before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent readers; WAL lets them proceed alongside the writer.
const READERS: u32 = 4;

type Tx = Transaction<'static, Sqlite>;

/// Rows deleted per transaction by [`Store::archive_prune`], so a big prune doesn't hold
/// the write lock (and stall group commits) for long.
const PRUNE_CHUNK: i64 = 5000;

pub struct SqliteStore {
    writer: SqlitePool,
    /// `None` for in-memory stores, whose database lives in the writer's single connection.
    reader: Option<SqlitePool>,
    /// Group-commit task for archive appends and offline pushes; it writes through
    /// `writer` like everything else, so all writes still take turns on one connection.
    batch: BatchWriter,
    /// The users' archive log (file databases only; see `sqlite/journal.rs`): appends
    /// are acknowledged once logged and folded into `archive` behind.
    journal: Option<journal::Journal>,
    /// The database file (file stores): where another process's archive log is.
    path: Option<std::path::PathBuf>,
    /// Background WAL checkpoints (file databases only).
    checkpointer: Option<Checkpointer>,
    /// Outcome of the latest writes, for [`Store::writable`].
    health: Arc<WriteHealth>,
    /// Moves the writer and the fold between `SCHED_IDLE` and nice 5 (file databases
    /// where the process may; see `priority.rs`); stops when dropped.
    _governor: Option<priority::Governor>,
}

/// Runs `PRAGMA wal_checkpoint(PASSIVE)` on a connection of its own every
/// [`CHECKPOINT_EVERY`], so the pages are copied back and fsynced off the writer's path:
/// a group commit never waits for a checkpoint (SQLite's auto-checkpoint runs inside the
/// COMMIT that crosses the threshold, stalling every message of that batch).
struct Checkpointer {
    stop: tokio::sync::watch::Sender<bool>,
    task: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Checkpointer {
    fn spawn(pool: SqlitePool) -> Self {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            // Logged when it starts and stops failing: on a full disk it fails 4 times a
            // second, and the commits that fail meanwhile are logged already.
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(CHECKPOINT_EVERY) => {}
                }
                match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .execute(&pool)
                    .await
                {
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(
                            error = %e,
                            "SQLite background checkpoint failed (logged again once it works)"
                        );
                    }
                    Ok(_) if failing => {
                        failing = false;
                        tracing::info!("SQLite background checkpoint works again");
                    }
                    _ => {}
                }
            }
            pool.close().await;
        });
        Checkpointer {
            stop,
            task: parking_lot::Mutex::new(Some(task)),
        }
    }

    async fn stop(&self) {
        let _ = self.stop.send(true);
        let task = self.task.lock().take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // A store dropped without `close` still stops its task.
        let _ = self.stop.send(true);
    }
}

/// How often the background checkpointer runs.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// SQLite's page cache for the writer connection (negative = KiB).
const WRITER_CACHE_KIB: i64 = -8 * 1024;
/// WAL pages after which a commit checkpoints itself (SQLite's default is 1,000): only a
/// backstop for when the background checkpointer falls behind.
const CHECKPOINT_PAGES: u32 = 32_000;
/// Bytes of the database file each connection maps (SQLite's default is 0).
const MMAP_BYTES: u64 = 256 << 20;

/// Connections whose worker threads are named `thread` (see [`lowered`]).
fn background(options: &SqliteConnectOptions, thread: &'static str) -> SqliteConnectOptions {
    options.clone().thread_name(move |_| thread.to_owned())
}

/// A pool whose connections' worker threads (named `thread` by [`background`]) yield the
/// core to the sessions: see `priority`.
fn lowered(pool: SqlitePoolOptions, thread: &'static str) -> SqlitePoolOptions {
    pool.after_connect(move |_, _| {
        Box::pin(async move {
            priority::lower_threads_named(thread, priority::yield_of(thread));
            Ok(())
        })
    })
}

impl SqliteStore {
    /// Open (creating the file and parent dir) and migrate. Fails with a clear error
    /// naming the path when it can't. `sync_full`: PRAGMA synchronous=FULL instead of NORMAL
    /// (NORMAL in WAL mode can lose the last commits on power loss, never corrupt).
    pub async fn open(path: &Path, sync_full: bool) -> Result<Self, StoreError> {
        let shown = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            crate::files::create_dir(dir).map_err(|e| {
                StoreError::Backend(format!(
                    "cannot create directory {} for SQLite database {shown}: {e}",
                    dir.display()
                ))
            })?;
        }
        // The file holds SCRAM keys and every archive: 0600 whatever the umask. SQLite
        // gives the WAL and SHM it creates the database file's mode; ones left by an
        // earlier run are tightened like the file.
        crate::files::private_file(path)
            .and_then(|()| {
                ["-wal", "-shm"].iter().try_for_each(|suffix| {
                    let mut side = path.as_os_str().to_owned();
                    side.push(suffix);
                    crate::files::tighten(Path::new(&side))
                })
            })
            .map_err(|e| {
                StoreError::Backend(format!("cannot make SQLite database {shown} private: {e}"))
            })?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(if sync_full {
                SqliteSynchronous::Full
            } else {
                SqliteSynchronous::Normal
            })
            .foreign_keys(true)
            .busy_timeout(BUSY_TIMEOUT)
            // Reads of hot index pages come from the mapping instead of a pread copy each.
            .pragma("mmap_size", MMAP_BYTES.to_string());
        let open_err = |e: sqlx::Error| {
            StoreError::Backend(format!("cannot open SQLite database {shown}: {e}"))
        };

        let writer = lowered(SqlitePoolOptions::new(), priority::WRITER_THREAD)
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            // A failed COMMIT (full disk, I/O error) can end SQLite's transaction while
            // sqlx still counts it open: the rollback queued by the dropped transaction
            // then fails and every later BEGIN is refused ("begin_with at non-zero
            // transaction depth") until a restart. A connection returned still inside a
            // transaction is closed instead, and the pool opens a fresh one.
            .after_release(|conn, _| {
                Box::pin(async move {
                    // Committed: nothing to check (and no round trip on the hot path).
                    if !conn.is_in_transaction() {
                        return Ok(true);
                    }
                    // Dropped: the ping runs after the queued rollback.
                    conn.ping().await?;
                    let clean = !conn.is_in_transaction();
                    if !clean {
                        tracing::warn!(
                            "SQLite writer connection left inside a failed transaction; \
                             replacing it"
                        );
                    }
                    Ok(clean)
                })
            })
            .connect_with(
                background(&options, priority::WRITER_THREAD)
                    .optimize_on_close(true, 400)
                    // The archive's index tails stay cached between group commits, and
                    // fewer checkpoints rewrite each hot page fewer times.
                    .pragma("cache_size", WRITER_CACHE_KIB.to_string())
                    // Statement journals (every multi-row INSERT inside a batch has one,
                    // holding each page it changes) in memory rather than a temp file:
                    // a write syscall per page less.
                    .pragma("temp_store", "memory")
                    .pragma("wal_autocheckpoint", CHECKPOINT_PAGES.to_string()),
            )
            .await
            .map_err(open_err)?;
        // Migrate before readers exist so they never see a half-built schema.
        if let Err(e) = MIGRATOR.run(&writer).await {
            writer.close().await;
            return Err(StoreError::Migration(format!(
                "SQLite database {shown}: {e}"
            )));
        }
        let checkpoints = match lowered(SqlitePoolOptions::new(), priority::CHECKPOINT_THREAD)
            .max_connections(1)
            .connect_with(background(&options, priority::CHECKPOINT_THREAD))
            .await
        {
            Ok(p) => p,
            Err(e) => {
                writer.close().await;
                return Err(open_err(e));
            }
        };
        let reader = match SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(options)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                checkpoints.close().await;
                writer.close().await;
                return Err(open_err(e));
            }
        };
        let health = Arc::new(WriteHealth::default());
        let started = match Self::start_batch_writer(&writer, &health).await {
            Ok((batch, last_ts)) => journal::Journal::open(
                path,
                writer.clone(),
                reader.clone(),
                sync_full,
                last_ts,
                health.clone(),
            )
            .await
            .map(|j| (batch, j)),
            Err(e) => Err(e),
        };
        let (batch, journal) = match started {
            Ok(b) => b,
            Err(e) => {
                reader.close().await;
                checkpoints.close().await;
                writer.close().await;
                return Err(e);
            }
        };
        Ok(SqliteStore {
            writer,
            reader: Some(reader),
            batch,
            journal,
            path: Some(path.to_owned()),
            checkpointer: Some(Checkpointer::spawn(checkpoints)),
            health,
            _governor: priority::Governor::start(),
        })
    }

    /// A private in-memory database (for tests); gone when the store is closed or dropped.
    pub async fn open_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .shared_cache(false)
            .foreign_keys(true);
        // Exactly one connection that never expires: every connection to ":memory:" would
        // otherwise be a separate, empty database. (So unlike a file store's writer it
        // can't be replaced after a failed commit; it has no disk to fill.)
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Backend(format!("cannot open in-memory SQLite: {e}")))?;
        MIGRATOR
            .run(&writer)
            .await
            .map_err(|e| StoreError::Migration(format!("in-memory SQLite: {e}")))?;
        let health = Arc::new(WriteHealth::default());
        let (batch, _) = Self::start_batch_writer(&writer, &health).await?;
        Ok(SqliteStore {
            writer,
            reader: None,
            batch,
            journal: None,
            path: None,
            checkpointer: None,
            health,
            _governor: None,
        })
    }

    async fn start_batch_writer(
        writer: &SqlitePool,
        health: &Arc<WriteHealth>,
    ) -> Result<(BatchWriter, i64), StoreError> {
        // Across owners, new rows are out of time order by at most one fold of the
        // archive log, so the newest `FOLD_MAX` rows hold the largest timestamp (a
        // restored history may sit after them in seq order, but it lies in the past).
        let last_ts: Option<i64> = sqlx::query_scalar(LAST_ARCHIVE_TS)
            .fetch_one(writer)
            .await
            .db()?;
        let last_ts = last_ts.unwrap_or(0);
        Ok((
            BatchWriter::spawn(batch::SqliteBatch(writer.clone()), last_ts, health.clone()),
            last_ts,
        ))
    }

    /// Group-commit counters since open: (transactions or archive log writes, requests
    /// in them).
    pub fn group_commit_stats(&self) -> (u64, u64) {
        let s = &self.batch.stats;
        let (jb, jr) = self
            .journal
            .as_ref()
            .map_or((0, 0), journal::Journal::stats);
        (
            s.batches.load(Ordering::Relaxed) + jb,
            s.requests.load(Ordering::Relaxed) + jr,
        )
    }

    /// Appends group-commit `rows` to archive `t`: through the archive log for the users'
    /// archive of a file database, else one group commit.
    async fn append_rows(
        &self,
        t: &'static ArchiveTable,
        rows: Vec<crate::batch::ArchiveRow>,
    ) -> Result<(), StoreError> {
        match &self.journal {
            Some(j) if t.table == USER_ARCHIVE.table => j.append(rows).await,
            _ => self.batch.archive(t, rows).await,
        }
    }

    /// Before reading or changing archive `t`: what was acknowledged is in the table.
    async fn archive_barrier(&self, t: &ArchiveTable) -> Result<(), StoreError> {
        if t.table != USER_ARCHIVE.table {
            return Ok(());
        }
        match (&self.journal, &self.path) {
            (Some(j), _) => j.barrier().await,
            // Another process (the running server) owns the log.
            (None, Some(path)) => journal::fold_foreign(path, &self.writer).await,
            (None, None) => Ok(()),
        }
    }

    /// Before `user`'s account is deleted: its logged rows are folded (and deleted with
    /// it), later appends look the account up again.
    async fn account_going(&self, user: &str) -> Result<(), StoreError> {
        match &self.journal {
            Some(j) => {
                j.forget(user);
                j.barrier().await
            }
            None => self.archive_barrier(&USER_ARCHIVE).await,
        }
    }

    fn read_pool(&self) -> &SqlitePool {
        self.reader.as_ref().unwrap_or(&self.writer)
    }

    fn write_pool(&self) -> &SqlitePool {
        &self.writer
    }

    /// A read transaction (one snapshot, thanks to WAL).
    async fn read_tx(&self) -> Result<Tx, StoreError> {
        self.read_pool().begin().await.db()
    }

    /// A requested id list is short: look the ids up rather than walk a seq range,
    /// whatever the planner would guess without statistics.
    fn archive_by_ids(t: &ArchiveTable) -> String {
        format!(" FROM {} INDEXED BY {}", t.table, t.id_index)
    }
    /// Write transactions are serialized already (`BEGIN IMMEDIATE`): no lock to take.
    const NODE_FOR_PUBLISH: &'static str =
        "SELECT max_items, item_expire FROM pep_nodes WHERE owner = $1 AND node = $2";

    async fn delete_offline(&self, user: &str, seqs: &[u64]) -> Result<u64, StoreError> {
        // One statement for the whole list: the seqs travel as one JSON array.
        let list = format!(
            "[{}]",
            seqs.iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        Ok(sqlx::query(
            // By primary key (`+username`: not through the user's index, which would
            // walk the whole queue).
            "DELETE FROM offline_messages WHERE seq IN (SELECT value FROM json_each($2)) \
             AND +username = $1",
        )
        .bind(user)
        .bind(list)
        .execute(&self.writer)
        .await
        .db()?
        .rows_affected())
    }

    async fn write_tx(&self) -> Result<Tx, StoreError> {
        self.writer.begin_with("BEGIN IMMEDIATE").await.db()
    }

    /// A real write of about `bytes` (the `write_probe` row rewritten) through the writer
    /// like any other write, so it fails where they fail: no room for the WAL to grow,
    /// I/O errors, a read-only disk, a broken writer connection.
    async fn probe_write(&self, bytes: usize) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        sqlx::query(
            "INSERT INTO write_probe (id, at, pad) VALUES (1, $1, zeroblob($2)) \
             ON CONFLICT (id) DO UPDATE SET at = excluded.at, pad = excluded.pad",
        )
        .bind(now_micros())
        .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;
        Ok(())
    }

    /// The account's roster version, or `None` if there is no such account. (`_lock`:
    /// write transactions are serialized already.)
    async fn version_in(tx: &mut Tx, user: &str, _lock: bool) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT roster_version FROM accounts WHERE username = $1")
                .bind(user)
                .fetch_optional(&mut **tx)
                .await
                .db()?;
        v.map(to_version).transpose()
    }

    async fn account_exists(tx: &mut Tx, user: &str) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM accounts WHERE username = $1")
            .bind(user)
            .fetch_optional(&mut **tx)
            .await
            .db()?;
        Ok(found.is_some())
    }
}

crate::sql_impls::sql_store!(SqliteStore, Sqlite);

#[async_trait::async_trait]
impl Lifecycle for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        let one: i64 = sqlx::query_scalar("SELECT 1")
            .fetch_one(self.read_pool())
            .await
            .db()?;
        debug_assert_eq!(one, 1);
        Ok(())
    }

    async fn writable(&self) -> Result<(), StoreError> {
        self.health.check(|bytes| self.probe_write(bytes)).await
    }

    async fn close(&self) {
        // Log and fold what is queued, commit what is queued for group commit; later
        // requests fail.
        if let Some(j) = &self.journal {
            j.shutdown().await;
        }
        self.batch.shutdown().await;
        if let Some(c) = &self.checkpointer {
            c.stop().await;
        }
        if let Some(reader) = &self.reader {
            reader.close().await;
            // Fold the WAL back into the main file so the database is a single
            // self-contained file after shutdown (backups, copies).
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
                .execute(&self.writer)
                .await
            {
                tracing::warn!(error = %e, "SQLite WAL checkpoint at close failed");
            }
        }
        self.writer.close().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::time::Instant;

    use super::*;
    use crate::sql::new_stanza_id;
    use crate::{testsuite, Subscription};

    #[tokio::test]
    async fn conformance_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("natter.db"), false)
            .await
            .unwrap();
        testsuite::conformance(&store).await;
        store.close().await;
    }

    #[tokio::test]
    async fn built_without_memory_statistics() {
        // Set in .cargo/config.toml (LIBSQLITE3_FLAGS): see there.
        let store = SqliteStore::open_memory().await.unwrap();
        let options: Vec<String> = sqlx::query_scalar("PRAGMA compile_options")
            .fetch_all(&store.writer)
            .await
            .unwrap();
        assert!(
            options.iter().any(|o| o == "DEFAULT_MEMSTATUS=0"),
            "{options:?}"
        );
        store.close().await;
    }

    #[tokio::test]
    async fn conformance_memory() {
        let store = SqliteStore::open_memory().await.unwrap();
        testsuite::conformance(&store).await;
        store.close().await;
    }

    fn creds(tag: u8) -> AccountCredentials {
        testsuite::credentials(tag)
    }

    /// A database at `path` migrated up to, not including, migration `version` (the
    /// migrator's fields are sqlx's, semver-exempt; fine for tests pinned to sqlx 0.8).
    async fn schema_before(path: &Path, version: i64) -> SqlitePool {
        let before = sqlx::migrate::Migrator {
            migrations: MIGRATOR
                .migrations
                .iter()
                .filter(|m| m.version < version)
                .cloned()
                .collect(),
            ..sqlx::migrate::Migrator::DEFAULT
        };
        let pool = SqlitePool::connect_with(
            SqliteConnectOptions::new()
                .filename(path)
                .create_if_missing(true)
                .foreign_keys(true),
        )
        .await
        .unwrap();
        before.run(&pool).await.unwrap();
        pool
    }

    /// Migration 0012: the archive keeps its rows, ids, order and AUTOINCREMENT
    /// high-water mark when `owner` stops being a foreign key, and deleting an account
    /// still deletes its archive.
    #[tokio::test]
    async fn archive_owner_moves_from_foreign_key_to_trigger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.db");
        {
            let pool = schema_before(&path, 12).await;
            for u in ["a@x", "b@x"] {
                sqlx::query(
                    "INSERT INTO accounts (username, domain, created_at) VALUES ($1, 'x', 0)",
                )
                .bind(u)
                .execute(&pool)
                .await
                .unwrap();
            }
            for n in 1..=6i64 {
                sqlx::query(
                    "INSERT INTO archive (owner, id, with_jid, ts, outgoing, stanza) \
                     VALUES ($1, $2, 'w@x', $3, 1, '<message/>')",
                )
                .bind(if n % 2 == 0 { "a@x" } else { "b@x" })
                .bind(format!("id{n}"))
                .bind(n)
                .execute(&pool)
                .await
                .unwrap();
            }
            // The newest row gone: AUTOINCREMENT must not hand out its seq again.
            sqlx::query("DELETE FROM archive WHERE seq = 6")
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        let store = SqliteStore::open(&path, false).await.unwrap();
        let ids = |o: &'static str| {
            let store = &store;
            async move {
                let q = ArchiveQuery {
                    max: 100,
                    ..ArchiveQuery::default()
                };
                let items = store.archive_query(o, &q).await.unwrap().items;
                items.into_iter().map(|m| m.id).collect::<Vec<_>>()
            }
        };
        assert_eq!(ids("a@x").await, ["id2", "id4"]);
        assert_eq!(ids("b@x").await, ["id1", "id3", "id5"]);
        sqlx::query(
            "INSERT INTO archive (owner, id, with_jid, ts, outgoing, stanza) \
             VALUES ('a@x', 'id7', 'w@x', 7, 0, '<message/>')",
        )
        .execute(&store.writer)
        .await
        .unwrap();
        let seq: i64 = sqlx::query_scalar("SELECT seq FROM archive WHERE id = 'id7'")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        assert_eq!(seq, 7);
        store.delete_account("a@x").await.unwrap();
        let left: Vec<String> = sqlx::query_scalar("SELECT owner FROM archive")
            .fetch_all(&store.writer)
            .await
            .unwrap();
        assert_eq!(left, ["b@x"; 3]);
        store.close().await;
    }

    /// Migration 0007: node options natter packed into `publish_model` before move to
    /// their columns.
    #[tokio::test]
    async fn pep_node_options_move_to_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("natter.db");
        {
            // With nodes as natter wrote them before 0007.
            let pool = schema_before(&path, 7).await;
            sqlx::query(
                "INSERT INTO accounts (username, domain, created_at) VALUES ('a@x', 'x', 0)",
            )
            .execute(&pool)
            .await
            .unwrap();
            for (node, model) in [
                ("plain", "publishers"),
                (
                    "all",
                    "publishers;persist_items=0;send_last_published_item=never;\
                     notify_retract=0;notify_delete=0",
                ),
                ("on_sub", "publishers;send_last_published_item=on_sub"),
                ("no_delete", "open;notify_delete=0"),
            ] {
                sqlx::query(
                    "INSERT INTO pep_nodes (owner, node, access_model, publish_model, \
                     max_items) VALUES ('a@x', $1, 'open', $2, 3)",
                )
                .bind(node)
                .bind(model)
                .execute(&pool)
                .await
                .unwrap();
            }
            pool.close().await;
        }
        let store = SqliteStore::open(&path, false).await.unwrap();
        let node = |n: &'static str| {
            let store = &store;
            async move { store.pep_node("a@x", n).await.unwrap().unwrap() }
        };
        let base = PepNodeConfig {
            access_model: "open".into(),
            max_items: 3,
            ..PepNodeConfig::default()
        };
        assert_eq!(node("plain").await, base);
        assert_eq!(
            node("all").await,
            PepNodeConfig {
                persist_items: false,
                send_last_published_item: "never".into(),
                notify_retract: false,
                notify_delete: false,
                ..base.clone()
            }
        );
        assert_eq!(
            node("on_sub").await,
            PepNodeConfig {
                send_last_published_item: "on_sub".into(),
                ..base.clone()
            }
        );
        assert_eq!(
            node("no_delete").await,
            PepNodeConfig {
                publish_model: "open".into(),
                notify_delete: false,
                ..base.clone()
            }
        );
        store.close().await;
    }

    #[tokio::test]
    async fn survives_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        // Also checks that missing parent directories get created.
        let path = dir.path().join("nested/dir/natter.db");
        let store = SqliteStore::open(&path, true).await.unwrap();
        store.create_account("a@x.org", &creds(1)).await.unwrap();
        store.create_account("gone@x.org", &creds(3)).await.unwrap();
        let mut item = RosterItem::new("b@y.org");
        item.subscription = Subscription::Both;
        item.groups = vec!["Friends".into()];
        let v = store.put_roster_item("a@x.org", &item).await.unwrap();
        store
            .set_vcard("a@x.org", "<vCard xmlns='vcard-temp'/>")
            .await
            .unwrap();
        store
            .set_last_activity("a@x.org", 42, "away")
            .await
            .unwrap();
        store.delete_account("gone@x.org").await.unwrap();
        store.close().await;
        assert!(store.ping().await.is_err(), "closed store must not answer");

        // A clean close leaves no WAL content behind.
        let wal = path.with_file_name("natter.db-wal");
        assert!(std::fs::metadata(&wal).map_or(true, |m| m.len() == 0));

        let store = SqliteStore::open(&path, false).await.unwrap();
        assert_eq!(store.credentials("a@x.org").await.unwrap(), Some(creds(1)));
        assert_eq!(store.roster("a@x.org").await.unwrap(), (v, vec![item]));
        assert_eq!(
            store.vcard("a@x.org").await.unwrap().as_deref(),
            Some("<vCard xmlns='vcard-temp'/>")
        );
        assert_eq!(
            store.last_activity("a@x.org").await.unwrap(),
            Some((42, "away".into()))
        );
        assert!(store.deleted_at("gone@x.org").await.unwrap().is_some());
        assert_eq!(store.list_accounts(None).await.unwrap(), vec!["a@x.org"]);
        store.close().await;
    }

    #[test]
    fn stanza_ids_sort_by_creation_time() {
        let ids: Vec<String> = (0..50)
            .map(|_| {
                std::thread::sleep(std::time::Duration::from_micros(2));
                new_stanza_id()
            })
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
        assert!(ids.iter().all(|i| i.len() == 26 && i.is_ascii()));
    }

    #[tokio::test]
    async fn pragmas_applied() {
        let dir = tempfile::tempdir().unwrap();
        for (sync_full, expected) in [(false, 1i64), (true, 2)] {
            let path = dir.path().join(format!("p{sync_full}.db"));
            let store = SqliteStore::open(&path, sync_full).await.unwrap();
            for pool in [&store.writer, store.read_pool()] {
                let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                    .fetch_one(pool)
                    .await
                    .unwrap();
                assert_eq!(mode, "wal");
                let sync: i64 = sqlx::query_scalar("PRAGMA synchronous")
                    .fetch_one(pool)
                    .await
                    .unwrap();
                assert_eq!(sync, expected);
                let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
                    .fetch_one(pool)
                    .await
                    .unwrap();
                assert_eq!(fk, 1);
                let busy: i64 = sqlx::query_scalar("PRAGMA busy_timeout")
                    .fetch_one(pool)
                    .await
                    .unwrap();
                assert_eq!(busy, 5000);
            }
            store.close().await;
        }
    }

    #[tokio::test]
    async fn open_error_names_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let path = file.join("natter.db");
        let err = SqliteStore::open(&path, false).await.err().unwrap();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );

        // A file that isn't a database.
        let bogus = dir.path().join("bogus.db");
        std::fs::write(&bogus, vec![b'z'; 4096]).unwrap();
        let err = SqliteStore::open(&bogus, false).await.err().unwrap();
        assert!(
            err.to_string().contains(&bogus.display().to_string()),
            "{err}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writers_and_readers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("c.db"), false)
                .await
                .unwrap(),
        );
        store.create_account("u@x.org", &creds(1)).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..40 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    let item = RosterItem::new(format!("c{i}@y.org"));
                    store.put_roster_item("u@x.org", &item).await.map(Some)
                } else {
                    store.roster("u@x.org").await.map(|_| None)
                }
            }));
        }
        let mut versions = Vec::new();
        for t in tasks {
            if let Some(v) = t.await.unwrap().unwrap() {
                versions.push(v);
            }
        }
        versions.sort_unstable();
        assert_eq!(versions, (1..=20).collect::<Vec<u64>>());
        let (v, items) = store.roster("u@x.org").await.unwrap();
        assert_eq!((v, items.len()), (20, 20));
        store.close().await;
    }

    #[tokio::test]
    async fn database_from_newer_binary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.db");
        let store = SqliteStore::open(&path, false).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations \
                 (version, description, success, checksum, execution_time) \
             VALUES (9999, 'from the future', TRUE, X'00', 0)",
        )
        .execute(&store.writer)
        .await
        .unwrap();
        store.close().await;
        let err = SqliteStore::open(&path, false).await.err().unwrap();
        assert!(matches!(err, StoreError::Migration(_)), "{err}");
        assert!(err.to_string().contains("n.db"), "{err}");
    }

    /// Every archive query shape is answered from an index, in index order: no table scan,
    /// no sort, so a page costs about its size whatever the archive holds.
    #[tokio::test]
    async fn archive_queries_use_indexes() {
        let store = SqliteStore::open_memory().await.unwrap();
        // `sort_ok`: the rows come from an `ids` list, so sorting them is cheap.
        let explain = |sql: String, sort_ok: bool| {
            let store = &store;
            async move {
                let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(&sql)
                    .fetch_all(store.read_pool())
                    .await
                    .unwrap();
                let plan: Vec<String> = plan.into_iter().map(|p| p.3).collect();
                assert!(
                    plan.iter()
                        .all(|l| l.starts_with("SEARCH ") || (sort_ok && l.contains("TEMP B-TREE"))),
                    "{sql}\n{plan:?}"
                );
                plan
            }
        };
        let base = ArchiveQuery {
            max: 10,
            ..ArchiveQuery::default()
        };
        let shapes = [
            base.clone(),
            ArchiveQuery {
                with: Some("w@x".into()),
                ..base.clone()
            },
            ArchiveQuery {
                ids: Some(vec!["a".into(), "b".into()]),
                ..base.clone()
            },
            ArchiveQuery {
                with: Some("w@x".into()),
                ids: Some(vec!["a".into()]),
                ..base.clone()
            },
        ];
        for (t, q) in [&USER_ARCHIVE, &ROOM_ARCHIVE]
            .into_iter()
            .flat_map(|t| shapes.iter().map(move |q| (t, q)))
        {
            let at = |ts, seq| Some(Position { ts, seq });
            let (start, end) = Position::time_range(Some(1), Some(9));
            for (lo, hi) in [
                (None, None),
                (at(5, 5), None),
                (None, at(5, 5)),
                (at(1, 1), at(9, 9)),
                (start, end),
                (start, at(5, 5)),
            ] {
                for backward in [false, true] {
                    let mut qb = QueryBuilder::new("EXPLAIN QUERY PLAN SELECT stanza");
                    SqliteStore::push_archive_page(&mut qb, t, "o@x", q, lo, hi, backward);
                    explain(qb.into_sql(), q.ids.is_some()).await;
                }
                let mut qb = QueryBuilder::new("EXPLAIN QUERY PLAN SELECT COUNT(*)");
                SqliteStore::push_archive_from(&mut qb, t, "o@x", q, lo, hi);
                explain(qb.into_sql(), false).await;
            }
        }
        for sql in [
            "SELECT ts, seq FROM archive WHERE owner = $1 AND id = $2",
            "SELECT seq FROM archive WHERE owner = $1 AND ts < $2 LIMIT 5000",
            "SELECT seq FROM offline_messages WHERE username = $1 ORDER BY ord, seq LIMIT $2",
            "SELECT item_id FROM pep_items WHERE owner = $1 AND node = $2 ORDER BY seq DESC",
            "SELECT ts, seq FROM room_archive WHERE room = $1 AND id = $2",
            "SELECT jid FROM rooms WHERE service = $1 ORDER BY jid",
            "SELECT p.member, a.id FROM room_positions p JOIN room_archive a ON a.seq = p.seq \
             WHERE p.room = $1 AND p.kind = $2 ORDER BY p.member",
            "SELECT member FROM room_positions \
             WHERE room = $1 AND kind = $2 AND seq >= $3 ORDER BY member",
            "SELECT slot FROM uploads WHERE slot = $1",
            "DELETE FROM uploads WHERE slot = $1",
            "SELECT size FROM uploads WHERE owner = $1",
            "SELECT slot FROM uploads WHERE sha256 = $1 LIMIT 1",
        ] {
            explain(format!("EXPLAIN QUERY PLAN {sql}"), false).await;
        }
        // Uploads oldest first: in index order by `created`, sorting only the ties by slot
        // (SQLite words it RIGHT PART or LAST TERM of the ORDER BY, by version).
        for sql in [
            "SELECT slot FROM uploads WHERE owner = $1 ORDER BY created, slot",
            "SELECT slot FROM uploads WHERE created < $1 ORDER BY created, slot LIMIT $2",
        ] {
            let plan = explain(format!("EXPLAIN QUERY PLAN {sql}"), true).await;
            assert!(
                plan.iter().all(|l| l.starts_with("SEARCH ")
                    || l.contains("RIGHT PART OF ORDER BY")
                    || l.contains("LAST TERM OF ORDER BY")),
                "{sql}\n{plan:?}"
            );
        }
        // Deleting delivered offline messages finds each by its seq, whatever the queue
        // holds (the list itself is scanned).
        let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(
            "EXPLAIN QUERY PLAN DELETE FROM offline_messages \
             WHERE seq IN (SELECT value FROM json_each('[1,2]')) AND +username = 'u'",
        )
        .fetch_all(store.read_pool())
        .await
        .unwrap();
        assert!(
            plan.iter().any(|p| p.3.contains("INTEGER PRIMARY KEY")),
            "{plan:?}"
        );
        store.close().await;
    }

    fn msg(owner: &str, n: usize) -> NewArchiveEntry {
        NewArchiveEntry {
            owner: owner.into(),
            with: "peer@remote.net".into(),
            stanza: format!("<message><body>{n}</body></message>"),
            outgoing: n.is_multiple_of(2),
        }
    }

    /// The background checkpointer copies committed pages into the main file while the
    /// writer's own auto-checkpoint threshold is far away.
    #[tokio::test]
    async fn wal_is_checkpointed_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.db");
        let store = SqliteStore::open(&path, false).await.unwrap();
        store.create_account("u@x.org", &creds(1)).await.unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        let big: String = "x".repeat(4000);
        for n in 0..200 {
            let mut e = msg("u@x.org", n);
            e.stanza = format!("<message><body>{big}{n}</body></message>");
            store.archive_append(&[e]).await.unwrap();
        }
        // 200 rows of 4 KB: ~800 KB in the WAL, far below CHECKPOINT_PAGES.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = std::fs::metadata(&path).unwrap().len();
            if now > before + 500_000 {
                break;
            }
            assert!(Instant::now() < deadline, "main file still {now} bytes");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        store.close().await;
    }

    /// Group commit: many concurrent appends share commits. Prints a micro-measurement
    /// (not asserted: the machine is shared) next to one-commit-per-message appends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_commit_throughput() {
        const SEQUENTIAL: usize = 200;
        const CONCURRENT: usize = 2000;
        let dir = tempfile::tempdir().unwrap();
        for sync_full in [false, true] {
            let path = dir.path().join(format!("g{sync_full}.db"));
            let store = Arc::new(SqliteStore::open(&path, sync_full).await.unwrap());
            store.create_account("u@x.org", &creds(1)).await.unwrap();

            // Baseline: each append waits for the previous, so each is its own commit.
            let start = Instant::now();
            for n in 0..SEQUENTIAL {
                store.archive_append(&[msg("u@x.org", n)]).await.unwrap();
            }
            let sequential = SEQUENTIAL as f64 / start.elapsed().as_secs_f64();

            let (b0, r0) = store.group_commit_stats();
            let start = Instant::now();
            let tasks: Vec<_> = (0..CONCURRENT)
                .map(|n| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        store.archive_append(&[msg("u@x.org", n)]).await.unwrap()
                    })
                })
                .collect();
            let mut ids = Vec::new();
            for t in tasks {
                ids.extend(t.await.unwrap());
            }
            let elapsed = start.elapsed();
            let (b1, r1) = store.group_commit_stats();
            let (batches, requests) = (b1 - b0, r1 - r0);
            println!(
                "SQLite file, synchronous={}: sequential {sequential:.0} appends/s \
                 (one commit each); {CONCURRENT} concurrent appends in {elapsed:?} = {:.0} \
                 appends/s in {batches} commits (avg {:.1} per commit)",
                if sync_full { "FULL" } else { "NORMAL" },
                CONCURRENT as f64 / elapsed.as_secs_f64(),
                requests as f64 / batches as f64,
            );
            assert_eq!(requests, CONCURRENT as u64);
            assert!(batches < requests, "no request shared a commit");
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), CONCURRENT);
            let all = store
                .archive_query(
                    "u@x.org",
                    &ArchiveQuery {
                        max: 0,
                        ..ArchiveQuery::default()
                    },
                )
                .await
                .unwrap();
            assert_eq!(all.count, Some((SEQUENTIAL + CONCURRENT) as u64));
            store.close().await;
        }
    }

    /// Closing answers every pending request (committed or refused, never left hanging),
    /// and whatever was acknowledged is in the database afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn close_with_pending_group_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("close.db");
        let store = Arc::new(SqliteStore::open(&path, false).await.unwrap());
        store.create_account("u@x.org", &creds(1)).await.unwrap();
        let tasks: Vec<_> = (0..500)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    if n % 2 == 0 {
                        store.archive_append(&[msg("u@x.org", n)]).await.map(|_| ())
                    } else {
                        store
                            .offline_push("u@x.org", "<message/>", None, 1000, 1)
                            .await
                            .map(|_| ())
                    }
                })
            })
            .collect();
        tokio::task::yield_now().await;
        store.close().await;
        let mut acked = 0u64;
        for t in tasks {
            match tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("request left hanging by close")
                .unwrap()
            {
                Ok(()) => acked += 1,
                Err(StoreError::Backend(_)) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        let r = store.archive_append(&[msg("u@x.org", 0)]).await;
        assert!(matches!(r, Err(StoreError::Backend(_))), "{r:?}");
        let r = store.offline_push("u@x.org", "<m/>", None, 10, 1).await;
        assert!(matches!(r, Err(StoreError::Backend(_))), "{r:?}");

        let store = SqliteStore::open(&path, false).await.unwrap();
        let archived = store
            .archive_query(
                "u@x.org",
                &ArchiveQuery {
                    max: 0,
                    ..ArchiveQuery::default()
                },
            )
            .await
            .unwrap()
            .count
            .unwrap();
        let queued = store.offline_count("u@x.org").await.unwrap();
        assert_eq!(archived + queued, acked);
        store.close().await;
    }

    /// The queue length the triggers keep always equals the queue, through pushes, a full
    /// queue, deliveries and another account's deletion.
    #[tokio::test]
    async fn offline_queue_length_follows_the_queue() {
        let store = SqliteStore::open_memory().await.unwrap();
        for u in ["a@x.org", "b@x.org"] {
            store.create_account(u, &creds(1)).await.unwrap();
        }
        let check = |store: &SqliteStore| {
            let pool = store.writer.clone();
            async move {
                let wrong: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM accounts a WHERE offline_queued != \
                     (SELECT COUNT(*) FROM offline_messages o WHERE o.username = a.username)",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                assert_eq!(wrong, 0);
            }
        };
        for n in 0..7 {
            let r = store
                .offline_push("a@x.org", &format!("<m>{n}</m>"), None, 5, 1)
                .await;
            assert_eq!(r.is_err(), n >= 5, "push {n}: {r:?}");
        }
        store
            .offline_push("b@x.org", "<m/>", None, 5, 1)
            .await
            .unwrap();
        check(&store).await;
        assert_eq!(store.offline_count("a@x.org").await.unwrap(), 5);
        let first = store.offline_fetch("a@x.org", 2).await.unwrap();
        store
            .offline_delete("a@x.org", &[first[0].seq, first[1].seq])
            .await
            .unwrap();
        assert_eq!(store.offline_count("a@x.org").await.unwrap(), 3);
        store.delete_account("b@x.org").await.unwrap();
        check(&store).await;
        assert_eq!(store.offline_count("b@x.org").await.unwrap(), 0);
        store.close().await;
    }

    /// Whether `table` has rows whose `column` is `key`.
    async fn has_rows(store: &SqliteStore, table: &str, column: &str, key: &str) -> bool {
        sqlx::query_scalar(&format!(
            "SELECT COUNT(*) > 0 FROM {table} WHERE {column} = $1"
        ))
        .bind(key)
        .fetch_one(&store.writer)
        .await
        .unwrap()
    }

    /// No orphaned rows in any of the new tables after delete_account.
    #[tokio::test]
    async fn delete_account_leaves_no_rows() {
        let store = SqliteStore::open_memory().await.unwrap();
        for u in ["u@x.org", "keep@x.org"] {
            store.create_account(u, &creds(1)).await.unwrap();
            store.archive_append(&[msg(u, 1), msg(u, 2)]).await.unwrap();
            store
                .set_mam_prefs(
                    u,
                    &MamPrefs {
                        default: "roster".into(),
                        always: vec!["a@b".into()],
                        never: vec!["c@d".into()],
                    },
                )
                .await
                .unwrap();
            store.offline_push(u, "<m/>", None, 10, 1).await.unwrap();
            let cfg = PepNodeConfig {
                access_model: "open".into(),
                max_items: 10,
                ..PepNodeConfig::default()
            };
            store.pep_create_or_configure(u, "n", &cfg).await.unwrap();
            store.pep_publish(u, "n", "i", "<i/>").await.unwrap();
            store.block(u, &["spam@x".into()]).await.unwrap();
            let upload = Upload {
                slot: format!("slot-{u}"),
                owner: u.into(),
                sha256: "00".repeat(32),
                size: 1,
                content_type: "text/plain".into(),
                filename: "f.txt".into(),
                created: 1,
            };
            store.upload_put(&upload).await.unwrap();
        }
        store.delete_account("u@x.org").await.unwrap();
        for (table, column) in [
            ("archive", "owner"),
            ("mam_prefs", "username"),
            ("mam_prefs_jids", "username"),
            ("offline_messages", "username"),
            ("pep_nodes", "owner"),
            ("pep_items", "owner"),
            ("blocklist", "username"),
            ("uploads", "owner"),
        ] {
            for (user, expected) in [("u@x.org", false), ("keep@x.org", true)] {
                let n = has_rows(&store, table, column, user).await;
                assert_eq!(n, expected, "{table} rows of {user}");
            }
        }
        store.close().await;
    }

    /// Positions compare in archive order, not id order: "a" archived after "b" is
    /// further on. (Ids made within one microsecond sort randomly; written directly here
    /// to be sure of the order.) Deleting the room leaves no rows behind.
    #[tokio::test]
    async fn room_positions_follow_archive_order() {
        const ROOM: &str = "r@muc.x.org";
        let store = SqliteStore::open_memory().await.unwrap();
        for room in [ROOM, "keep@muc.x.org"] {
            store.room_put(room, "{}").await.unwrap();
            for id in ["b", "a"] {
                sqlx::query(
                    "INSERT INTO room_archive (room, id, with_jid, ts, stanza) \
                     VALUES ($1, $2, 'u@x.org', 1, '<m/>')",
                )
                .bind(room)
                .bind(id)
                .execute(&store.writer)
                .await
                .unwrap();
            }
            assert!(store
                .room_set_position(room, "m@x.org", "displayed", "a")
                .await
                .unwrap());
        }
        let q = ArchiveQuery {
            max: 10,
            ..ArchiveQuery::default()
        };
        let page = store.room_archive_query(ROOM, &q).await.unwrap();
        let ids: Vec<&str> = page.items.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids, ["b", "a"]);
        assert!(!store
            .room_set_position(ROOM, "m@x.org", "displayed", "b")
            .await
            .unwrap());
        assert_eq!(
            store.room_positions(ROOM, "displayed").await.unwrap(),
            [("m@x.org".to_owned(), "a".to_owned())]
        );
        assert_eq!(
            store
                .room_members_past(ROOM, "displayed", "b")
                .await
                .unwrap(),
            ["m@x.org"]
        );
        assert!(store
            .room_set_position(ROOM, "n@x.org", "displayed", "b")
            .await
            .unwrap());
        assert_eq!(
            store
                .room_members_past(ROOM, "displayed", "a")
                .await
                .unwrap(),
            ["m@x.org"]
        );

        assert!(store.room_delete(ROOM).await.unwrap());
        for table in ["rooms", "room_archive", "room_positions"] {
            let column = if table == "rooms" { "jid" } else { "room" };
            for (room, expected) in [(ROOM, false), ("keep@muc.x.org", true)] {
                let n = has_rows(&store, table, column, room).await;
                assert_eq!(n, expected, "{table} rows of {room}");
            }
        }
        store.close().await;
    }

    /// Timestamps never go back across a restart in either archive: the writer starts
    /// from the newest of both.
    #[tokio::test]
    async fn archive_timestamps_continue_after_room_archive() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rooms.db");
        let store = SqliteStore::open(&path, false).await.unwrap();
        store.create_account("u@x.org", &creds(1)).await.unwrap();
        store.room_put("r@muc.x.org", "{}").await.unwrap();
        let entry = [("u@x.org".to_owned(), "<m/>".to_owned())];
        store
            .room_archive_append("r@muc.x.org", &entry)
            .await
            .unwrap();
        // A clock that stepped back across the restart.
        sqlx::query("UPDATE room_archive SET ts = ts + 3600000000")
            .execute(&store.writer)
            .await
            .unwrap();
        let future: i64 = sqlx::query_scalar("SELECT ts FROM room_archive")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        store.close().await;

        let store = SqliteStore::open(&path, false).await.unwrap();
        let id = store.archive_append(&[msg("u@x.org", 1)]).await.unwrap();
        let m = store.archive_get("u@x.org", &id[0]).await.unwrap().unwrap();
        assert!(m.ts_micros >= future, "timestamp went back");
        let id = store
            .room_archive_append("r@muc.x.org", &entry)
            .await
            .unwrap();
        let m = store
            .room_archive_get("r@muc.x.org", &id[0])
            .await
            .unwrap()
            .unwrap();
        assert!(m.ts_micros >= future, "room timestamp went back");
        store.close().await;
    }

    /// Archive order, timestamps and queue seqs continue across a restart.
    #[tokio::test]
    async fn archive_and_queue_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.db");
        let store = SqliteStore::open(&path, false).await.unwrap();
        store.create_account("u@x.org", &creds(1)).await.unwrap();
        let first = store
            .archive_append(&[msg("u@x.org", 1), msg("u@x.org", 2)])
            .await
            .unwrap();
        let q1 = store
            .offline_push("u@x.org", "<one/>", Some(&first[0]), 10, 1)
            .await
            .unwrap();
        // Simulate a clock that stepped back across the restart: push the stored
        // timestamps into the future.
        sqlx::query("UPDATE archive SET ts = ts + 3600000000")
            .execute(&store.writer)
            .await
            .unwrap();
        store.offline_delete("u@x.org", &[q1]).await.unwrap();
        store.close().await;

        let store = SqliteStore::open(&path, false).await.unwrap();
        let more = store.archive_append(&[msg("u@x.org", 3)]).await.unwrap();
        let all = archive_all(&store, "u@x.org").await;
        assert_eq!(
            all.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
            [first, more].concat()
        );
        assert!(all[1].ts_micros <= all[2].ts_micros, "timestamp went back");
        let q2 = store
            .offline_push("u@x.org", "<two/>", None, 10, 1)
            .await
            .unwrap();
        assert!(q2 > q1, "queue seq reused after restart");
        store.close().await;
    }

    /// The first messages of `owner`'s archive, oldest first.
    async fn archive_all(store: &SqliteStore, owner: &str) -> Vec<ArchivedMessage> {
        let q = ArchiveQuery {
            max: 10,
            ..ArchiveQuery::default()
        };
        store.archive_query(owner, &q).await.unwrap().items
    }

    /// `archive.owner` is no foreign key (migration 0012): the fold drops a logged row
    /// whose account is gone by fold time, and deleting an account deletes its folded
    /// archive (a trigger). The writer keeps foreign keys on for everything else.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn archive_rows_never_outlive_their_account() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("a.db"), false)
            .await
            .unwrap();
        assert!(store.journal.is_some());
        let count = |owner: &'static str| {
            let store = &store;
            async move {
                sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM archive WHERE owner = $1")
                    .bind(owner)
                    .fetch_one(&store.writer)
                    .await
                    .unwrap()
            }
        };
        for (tag, u) in ["u@x.org", "v@x.org"].into_iter().enumerate() {
            store.create_account(u, &creds(tag as u8)).await.unwrap();
            for n in 0..20 {
                store.archive_append(&[msg(u, n)]).await.unwrap();
            }
        }
        // A read folds what was acknowledged before it.
        assert_eq!(archive_all(&store, "u@x.org").await.len(), 10);
        assert_eq!(count("v@x.org").await, 20);
        // Deleting an account takes its folded rows with it.
        store.delete_account("u@x.org").await.unwrap();
        assert_eq!(count("u@x.org").await, 0);
        assert_eq!(count("v@x.org").await, 20);
        // Rows logged for an account that is gone when they are folded are dropped
        // (the account is deleted behind the store's back, as a racing deletion would).
        store.archive_append(&[msg("v@x.org", 99)]).await.unwrap();
        sqlx::query("DELETE FROM accounts WHERE username = 'v@x.org'")
            .execute(&store.writer)
            .await
            .unwrap();
        store.journal.as_ref().unwrap().barrier().await.unwrap();
        assert_eq!(count("v@x.org").await, 0);
        let fk: i64 = sqlx::query_scalar("PRAGMA foreign_keys")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        assert_eq!(fk, 1);
        let orphan = sqlx::query(
            "INSERT INTO roster_items (username, contact, subscription) \
             VALUES ('nobody@x.org', 'w@x.org', 'none')",
        )
        .execute(&store.writer)
        .await;
        assert!(orphan.is_err(), "a roster row without an account was taken");
        store.close().await;
    }

    /// The fold inserts each batch owner by owner (every archive index starts with the
    /// owner): each owner's messages keep their order and time ranges, and a prune across
    /// all owners finds every row older than its cutoff although `seq` and `ts` disagree
    /// across owners within a fold.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn archive_fold_by_owner_keeps_each_owners_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("a.db"), false)
            .await
            .unwrap();
        // Arrival order c, b, a, c, b, a, ...: the fold's order (a, b, c) is another.
        let owners = ["c@x.org", "b@x.org", "a@x.org"];
        for (tag, o) in owners.iter().enumerate() {
            store.create_account(o, &creds(tag as u8)).await.unwrap();
        }
        let rows: Vec<NewArchiveEntry> = (0..60).map(|n| msg(owners[n % 3], n)).collect();
        for row in &rows {
            store
                .archive_append(std::slice::from_ref(row))
                .await
                .unwrap();
        }
        let all = |o: &'static str| {
            let q = ArchiveQuery {
                max: 100,
                ..ArchiveQuery::default()
            };
            let store = &store;
            async move { store.archive_query(o, &q).await.unwrap().items }
        };
        let mut stamps = Vec::new();
        for (i, o) in owners.iter().enumerate() {
            let items = all(o).await;
            let sent: Vec<&str> = rows
                .iter()
                .skip(i)
                .step_by(3)
                .map(|r| r.stanza.as_str())
                .collect();
            let got: Vec<&str> = items.iter().map(|m| m.stanza.as_str()).collect();
            assert_eq!(got, sent, "{o}'s archive out of order");
            assert!(items.windows(2).all(|w| w[0].ts_micros <= w[1].ts_micros));
            // A time range of one owner is still the right slice of its archive.
            let q = ArchiveQuery {
                start_micros: Some(items[5].ts_micros),
                end_micros: Some(items[9].ts_micros),
                max: 100,
                ..ArchiveQuery::default()
            };
            let ranged = store.archive_query(o, &q).await.unwrap().items;
            assert!(ranged.len() >= 5, "{o}: {} in range", ranged.len());
            assert!(ranged
                .iter()
                .all(|m| m.ts_micros >= items[5].ts_micros && m.ts_micros <= items[9].ts_micros));
            stamps.extend(items.iter().map(|m| m.ts_micros));
        }
        // The cutoff is the newest message of the owner folded first, so the rows older
        // than it of the owners folded after it come later in `seq`.
        let cutoff = all("a@x.org").await.last().unwrap().ts_micros;
        let older = stamps.iter().filter(|&&t| t < cutoff).count();
        assert!(older >= 50);
        assert_eq!(
            store.archive_prune(None, cutoff).await.unwrap(),
            older as u64
        );
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM archive")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        assert_eq!(left as usize, stamps.len() - older);
        store.close().await;
    }

    /// The archive log: what was acknowledged but not yet folded into the database when
    /// the process died is replayed at the next open, once, in order; a torn record at
    /// the log's end (a write cut short) is ignored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn archive_log_replays_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let copy = dir.path().join("copy");
        std::fs::create_dir_all(&copy).unwrap();
        let store = SqliteStore::open(&live.join("a.db"), false).await.unwrap();
        store.create_account("u@x.org", &creds(1)).await.unwrap();
        let mut acked = Vec::new();
        for n in 0..300 {
            acked.extend(store.archive_append(&[msg("u@x.org", n)]).await.unwrap());
        }
        // Another process opening the database meanwhile (a CLI command next to the
        // server) leaves the owner's log alone and appends directly.
        let other = SqliteStore::open(&live.join("a.db"), false).await.unwrap();
        assert!(
            other.journal.is_none(),
            "a second process took over the archive log"
        );
        other.create_account("v@x.org", &creds(2)).await.unwrap();
        let direct = other.archive_append(&[msg("v@x.org", 0)]).await.unwrap();
        other.close().await;
        for n in 300..310 {
            acked.extend(store.archive_append(&[msg("u@x.org", n)]).await.unwrap());
        }
        // A crash now: the database files as they are, then the logs (a fold in between
        // only moves the database ahead of the copied log position, never behind).
        for name in [
            "a.db",
            "a.db-wal",
            "a.db-shm",
            "a.db.archive-log.0",
            "a.db.archive-log.1",
        ] {
            if live.join(name).exists() {
                std::fs::copy(live.join(name), copy.join(name)).unwrap();
            }
        }
        store.close().await;
        let log = ["a.db.archive-log.0", "a.db.archive-log.1"]
            .iter()
            .map(|n| copy.join(n))
            .filter(|p| p.exists())
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        std::io::Write::write_all(&mut f, &[200, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);

        for _ in 0..2 {
            let store = SqliteStore::open(&copy.join("a.db"), false).await.unwrap();
            let q = ArchiveQuery {
                max: 1000,
                ..ArchiveQuery::default()
            };
            let page = store.archive_query("u@x.org", &q).await.unwrap();
            assert_eq!(
                page.items.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
                acked
            );
            let page = store.archive_query("v@x.org", &q).await.unwrap();
            assert_eq!(
                page.items.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
                direct
            );
            store.close().await;
        }
    }

    /// Issue 9 item 4: a write that fails because the database is full (SQLITE_FULL, here
    /// from `max_page_count`; on a real full disk from the WAL write) may end SQLite's
    /// transaction while sqlx still counts it open, after which every later write failed
    /// with "attempted to call begin_with at non-zero transaction depth" until a restart.
    #[tokio::test]
    async fn store_heals_after_database_full() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("full.db"), false)
            .await
            .unwrap();
        store.create_account("u@x.org", &creds(1)).await.unwrap();
        let kept = store.archive_append(&[msg("u@x.org", 0)]).await.unwrap();
        // Cap the file at its current size: the next page it needs fails with SQLITE_FULL.
        let pages: i64 = sqlx::query_scalar("PRAGMA page_count")
            .fetch_one(&store.writer)
            .await
            .unwrap();
        sqlx::query(&format!("PRAGMA max_page_count = {pages}"))
            .execute(&store.writer)
            .await
            .unwrap();
        let big = "x".repeat(64 * 1024);
        let full = NewArchiveEntry {
            owner: "u@x.org".into(),
            with: "v@x.org".into(),
            stanza: big.clone(),
            outgoing: true,
        };
        // An archive append is acknowledged once in the archive log; folding it into the
        // full database fails and is retried.
        let logged = store
            .archive_append(std::slice::from_ref(&full))
            .await
            .expect("the archive log takes it");
        // A group commit (offline queue) fails on the full database.
        let err = store
            .offline_push("u@x.org", &big, None, 100, 1)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        assert!(store.writable().await.is_err(), "writes fail, so not ready");
        // Space comes back (a replaced connection starts without the cap).
        let _ = sqlx::query("PRAGMA max_page_count = 1073741823")
            .execute(&store.writer)
            .await;
        store
            .offline_push("u@x.org", &big, None, 100, 1)
            .await
            .expect("writes heal");
        let later = store.archive_append(&[full]).await.expect("writes heal");
        store.create_account("w@x.org", &creds(2)).await.unwrap();
        assert!(store.writable().await.is_ok());
        let all = archive_all(&store, "u@x.org").await;
        assert_eq!(
            all.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
            [kept, logged, later].concat()
        );
        store.close().await;
    }
}
