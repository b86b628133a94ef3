//! Embedded SQLite backend.
//!
//! SQLite allows one writer at a time. Rather than letting several pooled connections race
//! for the write lock (and spin in the busy handler), all writes go through a pool with a
//! single connection, so in-process writers queue fairly; reads use a separate pool and run
//! concurrently thanks to WAL. Write transactions start with `BEGIN IMMEDIATE` so that a
//! second process (e.g. an admin CLI) can't make a read-then-write transaction fail halfway.
//!
//! The high-rate durable writes (archive appends, offline pushes) are group-committed by a
//! writer task (see `batch`), which also writes through the single writer connection.
//!
//! Queries use `$N` placeholders and portable SQL so the PostgreSQL backend can share them
//! where it wants; SQLite specifics (pragmas, checkpointing) stay in this file.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Connection, QueryBuilder, Sqlite, Transaction};

use crate::{
    dedup_groups, domain_of, now_micros, now_unix, AccountCredentials, ArchivePage, ArchiveQuery,
    ArchivedMessage, MamPrefs, NewArchiveEntry, OfflineMessage, PepItem, PepNodeConfig, RosterItem,
    Store, StoreError, StoredCredentials, Subscription, MAM_DEFAULT_MODES,
};

mod batch;
mod health;

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
    batch: batch::BatchWriter,
    /// Background WAL checkpoints (file databases only).
    checkpointer: Option<Checkpointer>,
    /// Outcome of the latest writes, for [`Store::writable`].
    health: Arc<health::WriteHealth>,
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

        let writer = SqlitePoolOptions::new()
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
                options
                    .clone()
                    .optimize_on_close(true, 400)
                    // The archive's index tails stay cached between group commits, and
                    // fewer checkpoints rewrite each hot page fewer times.
                    .pragma("cache_size", WRITER_CACHE_KIB.to_string())
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
        let checkpoints = match SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
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
        let health = Arc::new(health::WriteHealth::default());
        let batch = match Self::start_batch_writer(&writer, &health).await {
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
            checkpointer: Some(Checkpointer::spawn(checkpoints)),
            health,
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
        let health = Arc::new(health::WriteHealth::default());
        let batch = Self::start_batch_writer(&writer, &health).await?;
        Ok(SqliteStore {
            writer,
            reader: None,
            batch,
            checkpointer: None,
            health,
        })
    }

    async fn start_batch_writer(
        writer: &SqlitePool,
        health: &Arc<health::WriteHealth>,
    ) -> Result<batch::BatchWriter, StoreError> {
        // The writer keeps archive timestamps non-decreasing in seq order, so the newest
        // row holds the largest one.
        let last_ts: Option<i64> =
            sqlx::query_scalar("SELECT ts FROM archive ORDER BY seq DESC LIMIT 1")
                .fetch_optional(writer)
                .await?;
        Ok(batch::BatchWriter::spawn(
            writer.clone(),
            last_ts.unwrap_or(0),
            health.clone(),
        ))
    }

    /// Group-commit counters since open: (transactions, requests committed in them).
    pub fn group_commit_stats(&self) -> (u64, u64) {
        let s = &self.batch.stats;
        (
            s.batches.load(Ordering::Relaxed),
            s.requests.load(Ordering::Relaxed),
        )
    }

    fn read_pool(&self) -> &SqlitePool {
        self.reader.as_ref().unwrap_or(&self.writer)
    }

    async fn write_tx(&self) -> Result<Tx, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
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
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The account's roster version, or `None` if there is no such account.
    async fn version_in(tx: &mut Tx, user: &str) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT roster_version FROM accounts WHERE username = $1")
                .bind(user)
                .fetch_optional(&mut **tx)
                .await?;
        v.map(to_version).transpose()
    }

    async fn bump_version(tx: &mut Tx, user: &str) -> Result<u64, StoreError> {
        let v: i64 = sqlx::query_scalar(
            "UPDATE accounts SET roster_version = roster_version + 1 \
             WHERE username = $1 RETURNING roster_version",
        )
        .bind(user)
        .fetch_one(&mut **tx)
        .await?;
        to_version(v)
    }

    async fn item_in(
        tx: &mut Tx,
        user: &str,
        contact: &str,
    ) -> Result<Option<RosterItem>, StoreError> {
        let row: Option<ItemRow> = sqlx::query_as(
            "SELECT contact, name, subscription, ask, pending_in, approved \
             FROM roster_items WHERE username = $1 AND contact = $2",
        )
        .bind(user)
        .bind(contact)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let groups: Vec<String> = sqlx::query_scalar(
            "SELECT group_name FROM roster_groups \
             WHERE username = $1 AND contact = $2 ORDER BY position",
        )
        .bind(user)
        .bind(contact)
        .fetch_all(&mut **tx)
        .await?;
        let mut item = row_to_item(row)?;
        item.groups = groups;
        Ok(Some(item))
    }

    /// Turns the `<start/>`/`<end/>` filters into exclusive seq bounds `(lo, hi)`, or
    /// `None` if no message of `owner` falls in the time range.
    ///
    /// The batch writer keeps `ts` non-decreasing in seq order, so a time range is a seq
    /// range. Paging then walks `(owner, seq)` or `(owner, with_jid, seq)` and stops after
    /// one page, instead of collecting and sorting every message in the time range (think
    /// of a client syncing "everything since last month"). Each bound costs one lookup in
    /// `(owner, ts)`.
    async fn time_range(
        tx: &mut Tx,
        owner: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Option<(Option<i64>, Option<i64>)>, StoreError> {
        let mut lo = None;
        if let Some(start) = start {
            let first: Option<i64> = sqlx::query_scalar(
                "SELECT seq FROM archive WHERE owner = $1 AND ts >= $2 \
                 ORDER BY ts, seq LIMIT 1",
            )
            .bind(owner)
            .bind(start)
            .fetch_optional(&mut **tx)
            .await?;
            let Some(first) = first else { return Ok(None) };
            lo = Some(first - 1);
        }
        let mut hi = None;
        if let Some(end) = end {
            let last: Option<i64> = sqlx::query_scalar(
                "SELECT seq FROM archive WHERE owner = $1 AND ts <= $2 \
                 ORDER BY ts DESC, seq DESC LIMIT 1",
            )
            .bind(owner)
            .bind(end)
            .fetch_optional(&mut **tx)
            .await?;
            let Some(last) = last else { return Ok(None) };
            hi = Some(last + 1);
        }
        Ok(Some((lo, hi)))
    }

    async fn account_exists(tx: &mut Tx, user: &str) -> Result<bool, StoreError> {
        let found: Option<i64> = sqlx::query_scalar("SELECT 1 FROM accounts WHERE username = $1")
            .bind(user)
            .fetch_optional(&mut **tx)
            .await?;
        Ok(found.is_some())
    }
}

/// (contact, name, subscription, ask, pending_in, approved)
type ItemRow = (String, Option<String>, String, bool, bool, bool);

fn row_to_item(
    (jid, name, sub, ask, pending_in, approved): ItemRow,
) -> Result<RosterItem, StoreError> {
    let subscription = Subscription::from_str(&sub)
        .map_err(|e| StoreError::Backend(format!("corrupt roster item {jid}: {e}")))?;
    Ok(RosterItem {
        jid,
        name,
        subscription,
        ask,
        pending_in,
        approved,
        groups: Vec::new(),
    })
}

fn to_version(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Backend(format!("corrupt roster version {v}")))
}

/// A foreign-key violation means the owning account (or node) doesn't exist.
pub(crate) fn map_fk(e: sqlx::Error) -> StoreError {
    if e.as_database_error()
        .is_some_and(|d| d.is_foreign_key_violation())
    {
        StoreError::NotFound
    } else {
        e.into()
    }
}

fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Backend(format!("corrupt {what} {v}")))
}

/// `n` as an SQL LIMIT (saturating).
fn limit_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A random 128-bit stanza-id (XEP-0359), as 26 lowercase base32 characters.
fn new_stanza_id() -> String {
    // Time first, then 64 random bits, base32 in ASCII order: ids sort by creation
    // time, so a new row lands at the end of its owner's range of the (owner, id) index
    // (a random id dirtied a random index page per row, most of the archive's write
    // cost). Only the owner ever sees an id, and that owner already has the time.
    const ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";
    let micros = u64::try_from(now_micros()).unwrap_or(0);
    let v = (u128::from(micros) << 64) | u128::from(rand::random::<u64>());
    (0..26)
        .rev()
        .map(|i| char::from(ALPHABET[((v >> (5 * i)) & 31) as usize]))
        .collect()
}

/// (id, with_jid, ts, outgoing, stanza)
type ArchiveRow = (String, String, i64, bool, String);

fn to_archived(
    owner: &str,
    (id, with, ts_micros, outgoing, stanza): ArchiveRow,
) -> ArchivedMessage {
    ArchivedMessage {
        id,
        owner: owner.to_owned(),
        with,
        ts_micros,
        outgoing,
        stanza,
    }
}

/// `FROM archive WHERE …` for `owner`'s messages matching the `<with/>` and `ids` filters
/// with `lo < seq < hi`. (Time filters are turned into seq bounds beforehand, see
/// [`SqliteStore::time_range`].)
fn push_archive_from<'a>(
    qb: &mut QueryBuilder<'a, Sqlite>,
    owner: &'a str,
    q: &'a ArchiveQuery,
    lo: Option<i64>,
    hi: Option<i64>,
) {
    match q.ids.as_deref() {
        // A requested id list is short: look the ids up rather than walk a seq range,
        // whatever the planner would guess without statistics.
        Some([_, ..]) => qb.push(" FROM archive INDEXED BY archive_owner_id_idx"),
        _ => qb.push(" FROM archive"),
    };
    qb.push(" WHERE owner = ").push_bind(owner);
    if let Some(with) = &q.with {
        qb.push(" AND with_jid = ").push_bind(with.as_str());
    }
    match q.ids.as_deref() {
        None => {}
        Some([]) => {
            qb.push(" AND 1 = 0");
        }
        Some(ids) => {
            qb.push(" AND id IN (");
            let mut list = qb.separated(", ");
            for id in ids {
                list.push_bind(id.as_str());
            }
            qb.push(")");
        }
    }
    if let Some(lo) = lo {
        qb.push(" AND seq > ").push_bind(lo);
    }
    if let Some(hi) = hi {
        qb.push(" AND seq < ").push_bind(hi);
    }
}

/// The rest of an archive page query after the SELECT list: [`push_archive_from`], order
/// and limit. The limit is one more than the page size, to tell whether anything lies
/// beyond the page.
fn push_archive_page<'a>(
    qb: &mut QueryBuilder<'a, Sqlite>,
    owner: &'a str,
    q: &'a ArchiveQuery,
    lo: Option<i64>,
    hi: Option<i64>,
    backward: bool,
) {
    push_archive_from(qb, owner, q, lo, hi);
    qb.push(if backward {
        " ORDER BY seq DESC"
    } else {
        " ORDER BY seq"
    });
    qb.push(" LIMIT ")
        .push_bind(limit_of(q.max).saturating_add(1));
}

/// The tighter of two optional bounds (`pick` = max for lower, min for upper bounds).
fn tighter(a: Option<i64>, b: Option<i64>, pick: fn(i64, i64) -> i64) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, b) => a.or(b),
    }
}

/// Drops the oldest items of the node beyond `max_items`.
async fn trim_pep_items(
    tx: &mut Tx,
    owner: &str,
    node: &str,
    max_items: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "DELETE FROM pep_items WHERE owner = $1 AND node = $2 AND seq NOT IN ( \
             SELECT seq FROM pep_items WHERE owner = $1 AND node = $2 \
             ORDER BY seq DESC LIMIT $3)",
    )
    .bind(owner)
    .bind(node)
    .bind(max_items)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

async fn put_credentials(
    tx: &mut Tx,
    user: &str,
    creds: &AccountCredentials,
) -> Result<(), StoreError> {
    for (hash, c) in [("sha1", &creds.sha1), ("sha256", &creds.sha256)] {
        sqlx::query(
            "INSERT INTO scram_credentials \
                 (username, hash, salt, iterations, stored_key, server_key) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (username, hash) DO UPDATE SET \
                 salt = excluded.salt, iterations = excluded.iterations, \
                 stored_key = excluded.stored_key, server_key = excluded.server_key",
        )
        .bind(user)
        .bind(hash)
        .bind(&c.salt)
        .bind(i64::from(c.iterations))
        .bind(&c.stored_key)
        .bind(&c.server_key)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn create_account(
        &self,
        user: &str,
        creds: &AccountCredentials,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        // Continue above the version a deleted namesake reached (see the tombstone table).
        let inserted = sqlx::query(
            "INSERT INTO accounts (username, domain, created_at, roster_version) \
             VALUES ($1, $2, $3, COALESCE( \
                 (SELECT roster_version + 1 FROM account_tombstones WHERE username = $1), 0))",
        )
        .bind(user)
        .bind(domain_of(user))
        .bind(now_unix())
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(e) if is_unique_violation(&e) => return Err(StoreError::Conflict),
            Err(e) => return Err(e.into()),
        }
        put_credentials(&mut tx, user, creds).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn credentials(&self, user: &str) -> Result<Option<AccountCredentials>, StoreError> {
        let rows: Vec<(String, Vec<u8>, i64, Vec<u8>, Vec<u8>)> = sqlx::query_as(
            "SELECT hash, salt, iterations, stored_key, server_key \
             FROM scram_credentials WHERE username = $1",
        )
        .bind(user)
        .fetch_all(self.read_pool())
        .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let (mut sha1, mut sha256) = (None, None);
        for (hash, salt, iterations, stored_key, server_key) in rows {
            let iterations = u32::try_from(iterations).map_err(|_| {
                StoreError::Backend(format!("corrupt iteration count for {user}: {iterations}"))
            })?;
            let c = StoredCredentials {
                salt,
                iterations,
                stored_key,
                server_key,
            };
            match hash.as_str() {
                "sha1" => sha1 = Some(c),
                "sha256" => sha256 = Some(c),
                _ => {} // a hash added by a newer schema; not ours to interpret
            }
        }
        match (sha1, sha256) {
            (Some(sha1), Some(sha256)) => Ok(Some(AccountCredentials { sha1, sha256 })),
            _ => Err(StoreError::Backend(format!(
                "incomplete credentials stored for {user}"
            ))),
        }
    }

    async fn set_credentials(
        &self,
        user: &str,
        creds: &AccountCredentials,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        if !Self::account_exists(&mut tx, user).await? {
            return Err(StoreError::NotFound);
        }
        put_credentials(&mut tx, user, creds).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_account(&self, user: &str) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let version = Self::version_in(&mut tx, user)
            .await?
            .ok_or(StoreError::NotFound)?;
        // Owned rows go via ON DELETE CASCADE.
        sqlx::query("DELETE FROM accounts WHERE username = $1")
            .bind(user)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO account_tombstones (username, deleted_at, roster_version) \
             VALUES ($1, $2, $3) \
             ON CONFLICT (username) DO UPDATE SET \
                 deleted_at = excluded.deleted_at, roster_version = excluded.roster_version",
        )
        .bind(user)
        .bind(now_unix())
        .bind(i64::try_from(version).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_accounts(&self, domain: Option<&str>) -> Result<Vec<String>, StoreError> {
        let q = match domain {
            Some(d) => sqlx::query_scalar(
                "SELECT username FROM accounts WHERE domain = $1 ORDER BY username",
            )
            .bind(d),
            None => sqlx::query_scalar("SELECT username FROM accounts ORDER BY username"),
        };
        Ok(q.fetch_all(self.read_pool()).await?)
    }

    async fn deleted_at(&self, user: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT deleted_at FROM account_tombstones WHERE username = $1")
                .bind(user)
                .fetch_optional(self.read_pool())
                .await?,
        )
    }

    async fn roster(&self, user: &str) -> Result<(u64, Vec<RosterItem>), StoreError> {
        // One read transaction so version and items come from the same snapshot.
        let mut tx = self.read_pool().begin().await?;
        let Some(version) = Self::version_in(&mut tx, user).await? else {
            return Ok((0, Vec::new()));
        };
        let rows: Vec<ItemRow> = sqlx::query_as(
            "SELECT contact, name, subscription, ask, pending_in, approved \
             FROM roster_items WHERE username = $1 ORDER BY contact",
        )
        .bind(user)
        .fetch_all(&mut *tx)
        .await?;
        let groups: Vec<(String, String)> = sqlx::query_as(
            "SELECT contact, group_name FROM roster_groups \
             WHERE username = $1 ORDER BY contact, position",
        )
        .bind(user)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;

        let mut items = rows
            .into_iter()
            .map(row_to_item)
            .collect::<Result<Vec<_>, _>>()?;
        let index: HashMap<String, usize> = items
            .iter()
            .enumerate()
            .map(|(i, it)| (it.jid.clone(), i))
            .collect();
        for (contact, group) in groups {
            if let Some(&i) = index.get(&contact) {
                items[i].groups.push(group);
            }
        }
        Ok((version, items))
    }

    async fn roster_item(
        &self,
        user: &str,
        contact: &str,
    ) -> Result<Option<RosterItem>, StoreError> {
        let mut tx = self.read_pool().begin().await?;
        let item = Self::item_in(&mut tx, user, contact).await?;
        tx.commit().await?;
        Ok(item)
    }

    async fn roster_version(&self, user: &str) -> Result<u64, StoreError> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT roster_version FROM accounts WHERE username = $1")
                .bind(user)
                .fetch_optional(self.read_pool())
                .await?;
        v.map_or(Ok(0), to_version)
    }

    async fn put_roster_item(&self, user: &str, item: &RosterItem) -> Result<u64, StoreError> {
        let groups = dedup_groups(&item.groups);
        let mut tx = self.write_tx().await?;
        let current = Self::version_in(&mut tx, user)
            .await?
            .ok_or(StoreError::NotFound)?;
        if let Some(old) = Self::item_in(&mut tx, user, &item.jid).await? {
            let unchanged = old.name == item.name
                && old.subscription == item.subscription
                && old.ask == item.ask
                && old.pending_in == item.pending_in
                && old.approved == item.approved
                && old.groups == groups;
            if unchanged {
                // Nothing to push to clients; don't invalidate their cached roster.
                return Ok(current);
            }
        }
        sqlx::query(
            "INSERT INTO roster_items \
                 (username, contact, name, subscription, ask, pending_in, approved) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (username, contact) DO UPDATE SET \
                 name = excluded.name, subscription = excluded.subscription, \
                 ask = excluded.ask, pending_in = excluded.pending_in, \
                 approved = excluded.approved",
        )
        .bind(user)
        .bind(&item.jid)
        .bind(&item.name)
        .bind(item.subscription.as_str())
        .bind(item.ask)
        .bind(item.pending_in)
        .bind(item.approved)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM roster_groups WHERE username = $1 AND contact = $2")
            .bind(user)
            .bind(&item.jid)
            .execute(&mut *tx)
            .await?;
        for (position, group) in groups.iter().enumerate() {
            sqlx::query(
                "INSERT INTO roster_groups (username, contact, group_name, position) \
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(user)
            .bind(&item.jid)
            .bind(group)
            .bind(i64::try_from(position).unwrap_or(i64::MAX))
            .execute(&mut *tx)
            .await?;
        }
        let version = Self::bump_version(&mut tx, user).await?;
        tx.commit().await?;
        Ok(version)
    }

    async fn remove_roster_item(&self, user: &str, contact: &str) -> Result<u64, StoreError> {
        let mut tx = self.write_tx().await?;
        // Groups go via ON DELETE CASCADE.
        let removed = sqlx::query("DELETE FROM roster_items WHERE username = $1 AND contact = $2")
            .bind(user)
            .bind(contact)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if removed == 0 {
            return Err(StoreError::NotFound);
        }
        let version = Self::bump_version(&mut tx, user).await?;
        tx.commit().await?;
        Ok(version)
    }

    async fn vcard(&self, user: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT xml FROM vcards WHERE username = $1")
                .bind(user)
                .fetch_optional(self.read_pool())
                .await?,
        )
    }

    async fn set_vcard(&self, user: &str, xml: &str) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        if !Self::account_exists(&mut tx, user).await? {
            return Err(StoreError::NotFound);
        }
        sqlx::query(
            "INSERT INTO vcards (username, xml, updated_at) VALUES ($1, $2, $3) \
             ON CONFLICT (username) DO UPDATE SET \
                 xml = excluded.xml, updated_at = excluded.updated_at",
        )
        .bind(user)
        .bind(xml)
        .bind(now_unix())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_last_activity(&self, user: &str, at: i64, status: &str) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        if !Self::account_exists(&mut tx, user).await? {
            return Err(StoreError::NotFound);
        }
        sqlx::query(
            "INSERT INTO last_activity (username, at, status) VALUES ($1, $2, $3) \
             ON CONFLICT (username) DO UPDATE SET at = excluded.at, status = excluded.status",
        )
        .bind(user)
        .bind(at)
        .bind(status)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn last_activity(&self, user: &str) -> Result<Option<(i64, String)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT at, status FROM last_activity WHERE username = $1")
                .bind(user)
                .fetch_optional(self.read_pool())
                .await?,
        )
    }

    async fn archive_append(&self, entries: &[NewArchiveEntry]) -> Result<Vec<String>, StoreError> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<batch::ArchiveRow> = entries
            .iter()
            .map(|e| batch::ArchiveRow {
                id: new_stanza_id(),
                owner: e.owner.clone(),
                with: e.with.clone(),
                stanza: e.stanza.clone(),
                outgoing: e.outgoing,
            })
            .collect();
        let ids = rows.iter().map(|r| r.id.clone()).collect();
        self.batch.archive(rows).await?;
        Ok(ids)
    }

    async fn archive_query(
        &self,
        owner: &str,
        q: &ArchiveQuery,
    ) -> Result<ArchivePage, StoreError> {
        // One read transaction: cursors, page and count come from the same snapshot.
        let mut tx = self.read_pool().begin().await?;
        let mut bounds = [None, None];
        for (slot, id) in bounds.iter_mut().zip([&q.after_id, &q.before_id]) {
            if let Some(id) = id {
                let seq: Option<i64> =
                    sqlx::query_scalar("SELECT seq FROM archive WHERE owner = $1 AND id = $2")
                        .bind(owner)
                        .bind(id)
                        .fetch_optional(&mut *tx)
                        .await?;
                *slot = Some(seq.ok_or(StoreError::NotFound)?);
            }
        }
        let [after, before] = bounds;
        let backward = before.is_some() || q.last_page;

        let Some((lo, hi)) = Self::time_range(&mut tx, owner, q.start_micros, q.end_micros).await?
        else {
            // Nothing archived in the time range.
            return Ok(ArchivePage {
                items: Vec::new(),
                complete: true,
                count: Some(0),
            });
        };
        let mut qb = QueryBuilder::new("SELECT id, with_jid, ts, outgoing, stanza");
        push_archive_page(
            &mut qb,
            owner,
            q,
            tighter(lo, after, i64::max),
            tighter(hi, before, i64::min),
            backward,
        );
        let mut rows: Vec<ArchiveRow> = qb.build_query_as().fetch_all(&mut *tx).await?;

        // RSM count: the filters without the paging cursors. Only when asked
        // for with max=0 (XEP-0059 §2.6): counting walks every matching row,
        // ~270 ms on a 10M archive, while a page costs under a millisecond.
        let count = if q.max == 0 {
            let mut cq = QueryBuilder::new("SELECT COUNT(*)");
            push_archive_from(&mut cq, owner, q, lo, hi);
            let n: i64 = cq.build_query_scalar().fetch_one(&mut *tx).await?;
            Some(to_u64(n, "archive count")?)
        } else {
            None
        };
        tx.commit().await?;

        let complete = rows.len() <= q.max;
        rows.truncate(q.max);
        if backward {
            rows.reverse();
        }
        Ok(ArchivePage {
            items: rows.into_iter().map(|r| to_archived(owner, r)).collect(),
            complete,
            count,
        })
    }

    async fn archive_get(
        &self,
        owner: &str,
        id: &str,
    ) -> Result<Option<ArchivedMessage>, StoreError> {
        let row: Option<ArchiveRow> = sqlx::query_as(
            "SELECT id, with_jid, ts, outgoing, stanza FROM archive \
             WHERE owner = $1 AND id = $2",
        )
        .bind(owner)
        .bind(id)
        .fetch_optional(self.read_pool())
        .await?;
        Ok(row.map(|r| to_archived(owner, r)))
    }

    async fn archive_import(&self, msgs: &[ArchivedMessage]) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let mut known: Vec<&str> = Vec::new();
        for m in msgs {
            if !known.contains(&m.owner.as_str()) {
                if !Self::account_exists(&mut tx, &m.owner).await? {
                    return Err(StoreError::NotFound);
                }
                known.push(&m.owner);
            }
            let r = sqlx::query(
                "INSERT INTO archive (owner, id, with_jid, ts, outgoing, stanza) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&m.owner)
            .bind(&m.id)
            .bind(&m.with)
            .bind(m.ts_micros)
            .bind(m.outgoing)
            .bind(&m.stanza)
            .execute(&mut *tx)
            .await;
            match r {
                Ok(_) => {}
                Err(e) if is_unique_violation(&e) => return Err(StoreError::Conflict),
                Err(e) => return Err(e.into()),
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn archive_prune(
        &self,
        owner: Option<&str>,
        older_than_micros: i64,
    ) -> Result<u64, StoreError> {
        // Across all owners there is no ts index; but ts never decreases in seq order, so
        // the rows to delete are those before the first row young enough to keep. Finding
        // it reads only the rows being deleted. (`ts < $2` stays in the DELETE as a guard.)
        let below: i64 = match owner {
            Some(_) => i64::MAX,
            None => sqlx::query_scalar::<_, i64>(
                "SELECT seq FROM archive WHERE ts >= $1 ORDER BY seq LIMIT 1",
            )
            .bind(older_than_micros)
            .fetch_optional(self.read_pool())
            .await?
            .unwrap_or(i64::MAX),
        };
        let mut total = 0u64;
        loop {
            let mut tx = self.write_tx().await?;
            let deleted = match owner {
                Some(owner) => sqlx::query(
                    "DELETE FROM archive WHERE seq IN (SELECT seq FROM archive \
                     WHERE owner = $1 AND ts < $2 LIMIT $3)",
                )
                .bind(owner),
                None => sqlx::query(
                    "DELETE FROM archive WHERE seq IN (SELECT seq FROM archive \
                     WHERE seq < $1 AND ts < $2 ORDER BY seq LIMIT $3)",
                )
                .bind(below),
            }
            .bind(older_than_micros)
            .bind(PRUNE_CHUNK)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            tx.commit().await?;
            total += deleted;
            if deleted < PRUNE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }

    async fn mam_prefs(&self, user: &str) -> Result<MamPrefs, StoreError> {
        let mut tx = self.read_pool().begin().await?;
        let default: Option<String> =
            sqlx::query_scalar("SELECT default_mode FROM mam_prefs WHERE username = $1")
                .bind(user)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(default) = default else {
            return Ok(MamPrefs::default());
        };
        let jids: Vec<(String, String)> = sqlx::query_as(
            "SELECT list, jid FROM mam_prefs_jids WHERE username = $1 ORDER BY list, jid",
        )
        .bind(user)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut prefs = MamPrefs {
            default,
            always: Vec::new(),
            never: Vec::new(),
        };
        for (list, jid) in jids {
            match list.as_str() {
                "always" => prefs.always.push(jid),
                _ => prefs.never.push(jid),
            }
        }
        Ok(prefs)
    }

    async fn set_mam_prefs(&self, user: &str, prefs: &MamPrefs) -> Result<(), StoreError> {
        if !MAM_DEFAULT_MODES.contains(&prefs.default.as_str()) {
            return Err(StoreError::Invalid(format!(
                "MAM default mode {:?}",
                prefs.default
            )));
        }
        let mut tx = self.write_tx().await?;
        if !Self::account_exists(&mut tx, user).await? {
            return Err(StoreError::NotFound);
        }
        sqlx::query(
            "INSERT INTO mam_prefs (username, default_mode) VALUES ($1, $2) \
             ON CONFLICT (username) DO UPDATE SET default_mode = excluded.default_mode",
        )
        .bind(user)
        .bind(&prefs.default)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM mam_prefs_jids WHERE username = $1")
            .bind(user)
            .execute(&mut *tx)
            .await?;
        for (list, jids) in [("always", &prefs.always), ("never", &prefs.never)] {
            for jid in jids {
                sqlx::query(
                    "INSERT INTO mam_prefs_jids (username, list, jid) VALUES ($1, $2, $3) \
                     ON CONFLICT DO NOTHING",
                )
                .bind(user)
                .bind(list)
                .bind(jid)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn offline_push(
        &self,
        user: &str,
        stanza: &str,
        archive_id: Option<&str>,
        limit: usize,
        ord: i64,
    ) -> Result<u64, StoreError> {
        self.batch
            .offline(user, stanza, archive_id, limit, ord)
            .await
    }

    async fn offline_fetch(
        &self,
        user: &str,
        max: usize,
    ) -> Result<Vec<OfflineMessage>, StoreError> {
        let rows: Vec<(i64, String, Option<String>, i64, i64)> = sqlx::query_as(
            "SELECT seq, stanza, archive_id, ts, ord FROM offline_messages \
             WHERE username = $1 ORDER BY ord, seq LIMIT $2",
        )
        .bind(user)
        .bind(limit_of(max))
        .fetch_all(self.read_pool())
        .await?;
        rows.into_iter()
            .map(|(seq, stanza, archive_id, ts_micros, ord)| {
                Ok(OfflineMessage {
                    seq: to_u64(seq, "offline seq")?,
                    stanza,
                    archive_id,
                    ts_micros,
                    ord,
                })
            })
            .collect()
    }

    async fn offline_delete(&self, user: &str, seqs: &[u64]) -> Result<u64, StoreError> {
        if seqs.is_empty() {
            return Ok(0);
        }
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
        .await?
        .rows_affected())
    }

    async fn offline_count(&self, user: &str) -> Result<u64, StoreError> {
        // Kept by triggers (migration 0003): no scan of the queue.
        let n: Option<i64> =
            sqlx::query_scalar("SELECT offline_queued FROM accounts WHERE username = $1")
                .bind(user)
                .fetch_optional(self.read_pool())
                .await?;
        to_u64(n.unwrap_or(0), "offline count")
    }

    async fn pep_node(&self, owner: &str, node: &str) -> Result<Option<PepNodeConfig>, StoreError> {
        let row: Option<(String, i64, String)> = sqlx::query_as(
            "SELECT access_model, max_items, publish_model FROM pep_nodes \
             WHERE owner = $1 AND node = $2",
        )
        .bind(owner)
        .bind(node)
        .fetch_optional(self.read_pool())
        .await?;
        row.map(|(access_model, max_items, publish_model)| {
            Ok(PepNodeConfig {
                access_model,
                max_items: u32::try_from(max_items)
                    .map_err(|_| StoreError::Backend(format!("corrupt max_items {max_items}")))?,
                publish_model,
            })
        })
        .transpose()
    }

    async fn pep_create_or_configure(
        &self,
        owner: &str,
        node: &str,
        cfg: &PepNodeConfig,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        if !Self::account_exists(&mut tx, owner).await? {
            return Err(StoreError::NotFound);
        }
        sqlx::query(
            "INSERT INTO pep_nodes (owner, node, access_model, publish_model, max_items) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (owner, node) DO UPDATE SET \
                 access_model = excluded.access_model, \
                 publish_model = excluded.publish_model, max_items = excluded.max_items",
        )
        .bind(owner)
        .bind(node)
        .bind(&cfg.access_model)
        .bind(&cfg.publish_model)
        .bind(i64::from(cfg.max_items))
        .execute(&mut *tx)
        .await?;
        trim_pep_items(&mut tx, owner, node, i64::from(cfg.max_items)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn pep_publish(
        &self,
        owner: &str,
        node: &str,
        item_id: &str,
        payload: &str,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let max_items: i64 =
            sqlx::query_scalar("SELECT max_items FROM pep_nodes WHERE owner = $1 AND node = $2")
                .bind(owner)
                .bind(node)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
        // Delete + insert (rather than update) so the item gets a new, highest seq.
        sqlx::query("DELETE FROM pep_items WHERE owner = $1 AND node = $2 AND item_id = $3")
            .bind(owner)
            .bind(node)
            .bind(item_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO pep_items (owner, node, item_id, payload, published) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(owner)
        .bind(node)
        .bind(item_id)
        .bind(payload)
        .bind(now_micros())
        .execute(&mut *tx)
        .await?;
        trim_pep_items(&mut tx, owner, node, max_items).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn pep_items(
        &self,
        owner: &str,
        node: &str,
        max: Option<usize>,
        ids: Option<&[String]>,
    ) -> Result<Vec<PepItem>, StoreError> {
        let mut qb = QueryBuilder::new("SELECT item_id, payload, published FROM pep_items");
        qb.push(" WHERE owner = ").push_bind(owner);
        qb.push(" AND node = ").push_bind(node);
        match ids {
            None => {}
            Some([]) => return Ok(Vec::new()),
            Some(ids) => {
                qb.push(" AND item_id IN (");
                let mut list = qb.separated(", ");
                for id in ids {
                    list.push_bind(id.as_str());
                }
                qb.push(")");
            }
        }
        qb.push(" ORDER BY seq DESC");
        if let Some(max) = max {
            qb.push(" LIMIT ").push_bind(limit_of(max));
        }
        let rows: Vec<(String, String, i64)> =
            qb.build_query_as().fetch_all(self.read_pool()).await?;
        Ok(rows
            .into_iter()
            .map(|(id, payload, published_micros)| PepItem {
                id,
                payload,
                published_micros,
            })
            .collect())
    }

    async fn pep_retract(
        &self,
        owner: &str,
        node: &str,
        item_id: &str,
    ) -> Result<bool, StoreError> {
        let n =
            sqlx::query("DELETE FROM pep_items WHERE owner = $1 AND node = $2 AND item_id = $3")
                .bind(owner)
                .bind(node)
                .bind(item_id)
                .execute(&self.writer)
                .await?
                .rows_affected();
        Ok(n > 0)
    }

    async fn pep_delete_node(&self, owner: &str, node: &str) -> Result<bool, StoreError> {
        // Items go via ON DELETE CASCADE.
        let n = sqlx::query("DELETE FROM pep_nodes WHERE owner = $1 AND node = $2")
            .bind(owner)
            .bind(node)
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    async fn pep_nodes(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT node FROM pep_nodes WHERE owner = $1 ORDER BY node")
                .bind(owner)
                .fetch_all(self.read_pool())
                .await?,
        )
    }

    async fn blocklist(&self, user: &str) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT jid FROM blocklist WHERE username = $1 ORDER BY jid")
                .bind(user)
                .fetch_all(self.read_pool())
                .await?,
        )
    }

    async fn block(&self, user: &str, jids: &[String]) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        if !Self::account_exists(&mut tx, user).await? {
            return Err(StoreError::NotFound);
        }
        for jid in jids {
            sqlx::query(
                "INSERT INTO blocklist (username, jid) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(user)
            .bind(jid)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn unblock(&self, user: &str, jids: Option<&[String]>) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        if !Self::account_exists(&mut tx, user).await? {
            return Err(StoreError::NotFound);
        }
        match jids {
            None => {
                sqlx::query("DELETE FROM blocklist WHERE username = $1")
                    .bind(user)
                    .execute(&mut *tx)
                    .await?;
            }
            Some(jids) => {
                for jid in jids {
                    sqlx::query("DELETE FROM blocklist WHERE username = $1 AND jid = $2")
                        .bind(user)
                        .bind(jid)
                        .execute(&mut *tx)
                        .await?;
                }
            }
        }
        tx.commit().await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let one: i64 = sqlx::query_scalar("SELECT 1")
            .fetch_one(self.read_pool())
            .await?;
        debug_assert_eq!(one, 1);
        Ok(())
    }

    async fn writable(&self) -> Result<(), StoreError> {
        // One probe at a time; checks that waited for it reuse its outcome.
        let _probing = self.health.probe.lock().await;
        let bytes = match self.health.due() {
            health::Due::No(recent) => return recent,
            health::Due::Probe(bytes) => bytes,
        };
        let probe = tokio::time::timeout(health::PROBE_TIMEOUT, self.probe_write(bytes))
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Backend(format!(
                    "a probe write did not finish within {} s",
                    health::PROBE_TIMEOUT.as_secs()
                )))
            });
        match probe {
            Ok(()) => self.health.record_ok(),
            Err(StoreError::Backend(e)) => self.health.record_err(&e),
            Err(e) => self.health.record_err(&e.to_string()),
        }
        // With how long writes have been failing.
        self.health.current()
    }

    async fn close(&self) {
        // Commit what is queued for group commit first; later requests fail.
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
    use crate::testsuite;

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
    async fn conformance_memory() {
        let store = SqliteStore::open_memory().await.unwrap();
        testsuite::conformance(&store).await;
        store.close().await;
    }

    fn creds(tag: u8) -> AccountCredentials {
        testsuite::credentials(tag)
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
        for q in &shapes {
            for (lo, hi) in [
                (None, None),
                (Some(5), None),
                (None, Some(5)),
                (Some(1), Some(9)),
            ] {
                for backward in [false, true] {
                    let mut qb = QueryBuilder::new("EXPLAIN QUERY PLAN SELECT stanza");
                    push_archive_page(&mut qb, "o@x", q, lo, hi, backward);
                    explain(qb.into_sql(), q.ids.is_some()).await;
                }
                let mut qb = QueryBuilder::new("EXPLAIN QUERY PLAN SELECT COUNT(*)");
                push_archive_from(&mut qb, "o@x", q, lo, hi);
                explain(qb.into_sql(), false).await;
            }
        }
        for sql in [
            "SELECT seq FROM archive WHERE owner = $1 AND ts >= $2 ORDER BY ts, seq LIMIT 1",
            "SELECT seq FROM archive WHERE owner = $1 AND ts <= $2 \
             ORDER BY ts DESC, seq DESC LIMIT 1",
            "SELECT seq FROM archive WHERE owner = $1 AND id = $2",
            "SELECT seq FROM archive WHERE owner = $1 AND ts < $2 LIMIT 5000",
            "SELECT seq FROM offline_messages WHERE username = $1 ORDER BY ord, seq LIMIT $2",
            "SELECT item_id FROM pep_items WHERE owner = $1 AND node = $2 ORDER BY seq DESC",
        ] {
            explain(format!("EXPLAIN QUERY PLAN {sql}"), false).await;
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
                publish_model: "publishers".into(),
            };
            store.pep_create_or_configure(u, "n", &cfg).await.unwrap();
            store.pep_publish(u, "n", "i", "<i/>").await.unwrap();
            store.block(u, &["spam@x".into()]).await.unwrap();
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
        ] {
            for (user, expected) in [("u@x.org", 0), ("keep@x.org", 1)] {
                let n: i64 = sqlx::query_scalar(&format!(
                    "SELECT COUNT(*) > 0 FROM {table} WHERE {column} = $1"
                ))
                .bind(user)
                .fetch_one(&store.writer)
                .await
                .unwrap();
                assert_eq!(n, expected, "{table} rows of {user}");
            }
        }
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
        let err = store
            .archive_append(std::slice::from_ref(&full))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("full"), "{err}");
        assert!(store.writable().await.is_err(), "writes fail, so not ready");
        // Space comes back (a replaced connection starts without the cap).
        let _ = sqlx::query("PRAGMA max_page_count = 1073741823")
            .execute(&store.writer)
            .await;
        let later = store.archive_append(&[full]).await.expect("writes heal");
        store.create_account("w@x.org", &creds(2)).await.unwrap();
        assert!(store.writable().await.is_ok());
        let all = archive_all(&store, "u@x.org").await;
        assert_eq!(
            all.iter().map(|m| m.id.clone()).collect::<Vec<_>>(),
            [kept, later].concat()
        );
        store.close().await;
    }
}
