//! The archive journal: how a SQLite file store accepts users' archive appends durably
//! without paying for SQLite's B-tree writes on the message path.
//!
//! An append is one sequential `write` of checksummed records to a log file next to the
//! database (`<db>.archive-log.0` / `.1`), plus `fdatasync` with `store.sync = "full"`;
//! the caller is answered after that. A *folder* task inserts the logged rows into the
//! `archive` table behind it, in large transactions (every [`FOLD_EVERY`], or sooner
//! once [`FOLD_ROWS`] rows or [`FOLD_BYTES`] wait), so each index page a fold dirties is
//! written to the WAL once for many rows instead of once per group commit. The fold
//! records how far it got (`archive_journal`) in the same transaction as the rows, so a
//! restart replays exactly the records not yet folded: a record in the file survives
//! `kill -9` like a WAL commit does (both live in the page cache), and power loss under
//! `sync = "full"`.
//!
//! Reads of the user archive go through [`Journal::barrier`] first, which folds what was
//! acknowledged before the read, so a client always reads its own writes. Appends for
//! accounts that don't exist are refused before they are logged (an in-memory set of
//! owners known to exist saves the lookup); one deleted while its rows wait is dropped
//! at the fold, like the rest of its archive.
//!
//! One process owns the log (an `flock` on `<db>.archive-log.lock`): the server, or a
//! command run while it is down. Another process opening the database meanwhile, such
//! as `natter user add` next to a running server, gets no journal and appends through the
//! plain group commit, so it never replays or restarts the owner's log.
//!
//! Two files take turns: once the current one passes [`ROTATE_BYTES`] and everything
//! logged before it was opened has been folded, the other is truncated and continues
//! with the next generation. Room archives keep the plain group commit (`crate::batch`):
//! their writes need room rows that may vanish, and their rate is far lower.

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use sqlx::sqlite::SqlitePool;
use sqlx::QueryBuilder;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use super::priority;
use crate::batch::ArchiveRow;
use crate::health::WriteHealth;
use crate::sql::DbResult;
use crate::{now_micros, StoreError};

const MAGIC: &[u8; 8] = b"NATJRNL1";
/// Magic and generation.
const HEADER: u64 = 16;
/// Bytes after which the log moves to the other file (once that is folded).
const ROTATE_BYTES: u64 = 64 << 20;
/// Longest a logged row waits before it is folded (when nothing reads it sooner).
const FOLD_EVERY: Duration = Duration::from_millis(500);
/// Rows waiting that start a fold at once.
const FOLD_ROWS: usize = 4096;
/// Most rows folded in one transaction, so other writes never wait long. Also the most
/// by which `seq` and `ts` may disagree across owners (each fold is sorted by owner).
pub(crate) const FOLD_MAX: usize = 8192;
/// The row counts of the fold's statements (6 parameters a row, far under SQLite's limit
/// of 32766). A fold of any length splits into these, so the few statements stay
/// prepared on the writer connection (sqlx caches them by their text).
const PREPARED_SIZES: [usize; 5] = [256, 64, 16, 4, 1];
/// Bytes of rows waiting that start a fold at once (big stanzas fold sooner).
const FOLD_BYTES: usize = 2 << 20;
/// Bytes of rows waiting for the fold before appends wait for it (memory bound).
const MAX_PENDING_BYTES: usize = 16 << 20;
/// Requests logged in one write.
const MAX_BATCH: usize = 1024;
/// Owners remembered as existing (the set starts over when full).
const KNOWN_MAX: usize = 100_000;
/// How long a reader waits for the fold before it gets an error.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(30);

/// A logged row waiting for the fold, with the log position after it.
struct Pending {
    row: ArchiveRow,
    ts: i64,
    gen: u64,
    end: u64,
}

impl Pending {
    fn bytes(&self) -> usize {
        self.row.owner.len() + self.row.id.len() + self.row.with.len() + self.row.stanza.len() + 96
    }
}

struct Shared {
    pending: Mutex<VecDeque<Pending>>,
    pending_bytes: AtomicUsize,
    /// Rows made pending since open, and rows folded since open (the barrier's measure).
    logged: AtomicU64,
    folded: watch::Sender<u64>,
    /// Start a fold now (a reader waits, or many rows do).
    wake: Notify,
    known: Mutex<HashSet<String>>,
    /// (write batches, requests in them), for the group-commit counters.
    batches: AtomicU64,
    requests: AtomicU64,
}

enum Request {
    Append {
        rows: Vec<ArchiveRow>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// One append request as the intake holds it: its rows and who waits for them.
type Waiting = (Vec<ArchiveRow>, oneshot::Sender<Result<(), StoreError>>);
/// The log thread's answer to a write: the buffer back, and (generation, offset) of it.
type Written = (Vec<u8>, io::Result<(u64, u64)>);

enum FileCmd {
    /// Append `buf` to the current file; answers the buffer and where it was written.
    Write {
        buf: Vec<u8>,
        reply: oneshot::Sender<Written>,
    },
    /// Continue in the other file with the next generation.
    Rotate(oneshot::Sender<io::Result<()>>),
}

pub(crate) struct Journal {
    /// Held (`flock`) while this process owns the log; see [`Journal::open`].
    _owner: File,
    tx: mpsc::Sender<Request>,
    shared: Arc<Shared>,
    stop_folder: watch::Sender<bool>,
    /// Answered (or dropped) when the fold thread ends.
    folder_done: Mutex<Option<oneshot::Receiver<()>>>,
}

fn closed() -> StoreError {
    StoreError::Backend("store is closed".into())
}

fn log_path(db: &Path, gen: u64) -> PathBuf {
    let mut p = db.as_os_str().to_owned();
    p.push(format!(".archive-log.{}", gen % 2));
    PathBuf::from(p)
}

fn io_err(what: &str, path: &Path, e: io::Error) -> StoreError {
    StoreError::Backend(format!("archive log {}: {what}: {e}", path.display()))
}

impl Journal {
    /// Replays what the last run logged but did not fold, then starts the journal.
    /// `last_ts`: the newest archive timestamp stored (timestamps never go back).
    pub async fn open(
        db_path: &Path,
        writer: SqlitePool,
        reader: SqlitePool,
        sync_full: bool,
        last_ts: i64,
        health: Arc<WriteHealth>,
    ) -> Result<Option<Self>, StoreError> {
        // One process owns the log: the server, or a command run while it is down. Another
        // process opening the same database meanwhile (`natter user add` next to a running
        // server) must neither replay nor restart the log under the owner's feet; it gets
        // no journal (`None`), and its appends use the plain group commit.
        let lock_path = {
            let mut p = db_path.as_os_str().to_owned();
            p.push(".archive-log.lock");
            PathBuf::from(p)
        };
        let owner = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| io_err("cannot open its lock file", &lock_path, e))?;
        match owner.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::info!(
                    "the archive log is owned by another process (a running server); \
                     this one appends to the archive directly"
                );
                return Ok(None);
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io_err("cannot lock it", &lock_path, e))
            }
        }
        let (gen, logs) = unfolded(db_path, &writer).await?;
        let sql = FoldSql::new();
        let mut last_ts = last_ts;
        let mut newest = gen;
        for (g, rows) in logs {
            newest = g;
            if !rows.is_empty() {
                tracing::info!(rows = rows.len(), log = %log_path(db_path, g).display(),
                    "replaying archive log");
            }
            for chunk in rows.chunks(FOLD_MAX) {
                last_ts = chunk.iter().map(|p| p.ts).fold(last_ts, i64::max);
                fold(&writer, &sql, chunk).await.db()?;
            }
        }
        // Start afresh with the next generation: first recorded, then the file, so a
        // crash in between leaves only files of older generations (ignored).
        let gen = newest + 1;
        sqlx::query("UPDATE archive_journal SET gen = $1, pos = $2")
            .bind(gen as i64)
            .bind(HEADER as i64)
            .execute(&writer)
            .await
            .db()?;
        let path = log_path(db_path, gen);
        let file =
            start_file(&path, gen, sync_full).map_err(|e| io_err("cannot create it", &path, e))?;

        let (folded, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            pending: Mutex::new(VecDeque::new()),
            pending_bytes: AtomicUsize::new(0),
            logged: AtomicU64::new(0),
            folded,
            wake: Notify::new(),
            known: Mutex::new(HashSet::new()),
            batches: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        let (files_tx, files_rx) = mpsc::channel(4);
        let log = LogFile {
            db_path: db_path.to_owned(),
            file,
            gen,
            len: HEADER,
            sync_full,
        };
        std::thread::Builder::new()
            .name("natter-archive-log".into())
            .spawn(move || log.run(files_rx))
            .map_err(|e| {
                StoreError::Backend(format!("cannot start the archive log thread: {e}"))
            })?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(intake(
            rx,
            files_tx,
            reader,
            shared.clone(),
            last_ts,
            health.clone(),
        ));
        let (stop_folder, stop) = watch::channel(false);
        let folder = spawn_folder(writer, shared.clone(), stop, health)?;
        Ok(Some(Journal {
            _owner: owner,
            tx,
            shared,
            stop_folder,
            folder_done: Mutex::new(Some(folder)),
        }))
    }

    /// Logs `rows` (all to the users' archive); returns once they are durable.
    pub async fn append(&self, rows: Vec<ArchiveRow>) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request::Append { rows, reply })
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Returns once every row acknowledged before the call is in the `archive` table.
    pub async fn barrier(&self) -> Result<(), StoreError> {
        let target = self.shared.logged.load(Ordering::Acquire);
        let mut folded = self.shared.folded.subscribe();
        if *folded.borrow() >= target {
            return Ok(());
        }
        self.shared.wake.notify_one();
        let reached = async { folded.wait_for(|f| *f >= target).await.map(drop) };
        match tokio::time::timeout(BARRIER_TIMEOUT, reached).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(closed()),
            Err(_) => Err(StoreError::Backend(
                "the archive log could not be folded into the database in time".into(),
            )),
        }
    }

    /// `user`'s account is about to go: appends for it must look it up again.
    pub fn forget(&self, user: &str) {
        self.shared.known.lock().remove(user);
    }

    /// (write batches, requests in them) since open.
    pub fn stats(&self) -> (u64, u64) {
        (
            self.shared.batches.load(Ordering::Relaxed),
            self.shared.requests.load(Ordering::Relaxed),
        )
    }

    /// Logs what is queued, refuses the rest, folds everything, then stops.
    pub async fn shutdown(&self) {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Request::Shutdown(reply)).await.is_ok() {
            let _ = done.await;
        }
        let _ = self.stop_folder.send(true);
        let folder = self.folder_done.lock().take();
        if let Some(f) = folder {
            let _ = f.await;
        }
    }
}

/// Takes append requests in batches: checks their owners, logs them in one write, makes
/// them pending for the fold, answers them.
async fn intake(
    mut rx: mpsc::Receiver<Request>,
    files: mpsc::Sender<FileCmd>,
    reader: SqlitePool,
    shared: Arc<Shared>,
    mut last_ts: i64,
    health: Arc<WriteHealth>,
) {
    let mut batch: Vec<Waiting> = Vec::new();
    let mut buf = Vec::with_capacity(64 << 10);
    let mut folded = shared.folded.subscribe();
    // Rows logged when the current file was started: it may be replaced once they are
    // all folded.
    let mut file_start = 0u64;
    let mut file_len = HEADER;
    while let Some(first) = rx.recv().await {
        let mut shutdown = None;
        match first {
            Request::Shutdown(r) => shutdown = Some(r),
            Request::Append { rows, reply } => {
                batch.push((rows, reply));
                // Let tasks that are about to send join this write.
                tokio::task::yield_now().await;
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Request::Append { rows, reply }) => batch.push((rows, reply)),
                        Ok(Request::Shutdown(r)) => {
                            shutdown = Some(r);
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
        }
        if !batch.is_empty() {
            // Memory stays bounded when the fold falls behind: wait for it, and refuse
            // the batch when it does not move (the database refuses the fold).
            let caught_up = tokio::time::timeout(BARRIER_TIMEOUT, async {
                while shared.pending_bytes.load(Ordering::Acquire) > MAX_PENDING_BYTES {
                    shared.wake.notify_one();
                    if folded.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
            if caught_up.is_err() {
                let e = "the archive log is full: the database has not taken its rows";
                tracing::error!("{e}");
                for (_, reply) in batch.drain(..) {
                    let _ = reply.send(Err(StoreError::Backend(e.into())));
                }
            }
        }
        if !batch.is_empty() {
            if file_len > ROTATE_BYTES && *folded.borrow() >= file_start {
                let (reply, done) = oneshot::channel();
                let rotated = match files.send(FileCmd::Rotate(reply)).await {
                    Ok(()) => done
                        .await
                        .unwrap_or_else(|_| Err(io::ErrorKind::BrokenPipe.into())),
                    Err(_) => Err(io::ErrorKind::BrokenPipe.into()),
                };
                match rotated {
                    Ok(()) => {
                        file_start = shared.logged.load(Ordering::Acquire);
                        file_len = HEADER;
                    }
                    Err(e) => tracing::error!(error = %e, "archive log: cannot switch files"),
                }
            }
            shared.batches.fetch_add(1, Ordering::Relaxed);
            shared
                .requests
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            match log_batch(&mut batch, &files, &reader, &shared, &mut last_ts, &mut buf).await {
                // Successes are the fold's to record: a log that takes writes while the
                // database refuses the fold is not healthy.
                Ok(len) => {
                    if let Some(len) = len {
                        file_len = len;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "archive log write failed");
                    health.record_err(&e.to_string());
                    for (_, reply) in batch.drain(..) {
                        let _ = reply.send(Err(StoreError::Backend(e.to_string())));
                    }
                }
            }
        }
        if let Some(r) = shutdown {
            rx.close();
            while let Ok(req) = rx.try_recv() {
                match req {
                    Request::Append { reply, .. } => drop(reply.send(Err(closed()))),
                    Request::Shutdown(r) => drop(r.send(())),
                }
            }
            let _ = r.send(());
            return;
        }
    }
}

/// Logs `batch` (emptying it): requests for unknown accounts are refused alone, the rest
/// written in one go, made pending and answered. The log's length after the write, if
/// anything was written.
async fn log_batch(
    batch: &mut Vec<Waiting>,
    files: &mpsc::Sender<FileCmd>,
    reader: &SqlitePool,
    shared: &Shared,
    last_ts: &mut i64,
    buf: &mut Vec<u8>,
) -> Result<Option<u64>, StoreError> {
    let missing = unknown_owners(batch, reader, shared).await?;
    let ts = now_micros().max(*last_ts);
    buf.clear();
    let mut ends = Vec::new();
    let mut accepted = Vec::with_capacity(batch.len());
    for (rows, reply) in batch.drain(..) {
        if rows.iter().any(|r| missing.contains(&r.owner)) {
            let _ = reply.send(Err(StoreError::NotFound));
            continue;
        }
        for row in &rows {
            encode(buf, row, ts);
            ends.push(buf.len() as u64);
        }
        accepted.push((rows, reply));
    }
    if accepted.is_empty() {
        return Ok(None);
    }
    let written = async {
        let (reply, done) = oneshot::channel();
        let cmd = FileCmd::Write {
            buf: std::mem::take(buf),
            reply,
        };
        files.send(cmd).await.map_err(|_| closed())?;
        let (back, written) = done.await.map_err(|_| closed())?;
        *buf = back;
        written.map_err(|e| {
            StoreError::Backend(if e.kind() == io::ErrorKind::StorageFull {
                format!("archive log write: database or disk is full ({e})")
            } else {
                format!("archive log write: {e}")
            })
        })
    }
    .await;
    let (gen, start) = match written {
        Ok(at) => at,
        Err(e) => {
            // Answered by the caller, with the error.
            batch.extend(accepted);
            return Err(e);
        }
    };
    *last_ts = ts;
    let mut n = 0u64;
    let mut bytes = 0;
    {
        let mut pending = shared.pending.lock();
        let mut ends = ends.into_iter();
        for (rows, _) in &mut accepted {
            for row in rows.drain(..) {
                let end = start + ends.next().unwrap_or(0);
                let p = Pending { row, ts, gen, end };
                bytes += p.bytes();
                pending.push_back(p);
                n += 1;
            }
        }
    }
    let pending_bytes = shared.pending_bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
    let logged = shared.logged.fetch_add(n, Ordering::AcqRel) + n;
    let waiting = logged - *shared.folded.borrow();
    if waiting >= FOLD_ROWS as u64 || pending_bytes >= FOLD_BYTES {
        shared.wake.notify_one();
    }
    for (_, reply) in accepted {
        let _ = reply.send(Ok(()));
    }
    Ok(Some(start + buf.len() as u64))
}

/// Owners in `batch` without an account (looked up unless known to exist).
async fn unknown_owners(
    batch: &[Waiting],
    reader: &SqlitePool,
    shared: &Shared,
) -> Result<HashSet<String>, StoreError> {
    let mut ask: Vec<&str> = {
        let known = shared.known.lock();
        batch
            .iter()
            .flat_map(|(rows, _)| rows.iter().map(|r| r.owner.as_str()))
            .filter(|o| !known.contains(*o))
            .collect()
    };
    if ask.is_empty() {
        return Ok(HashSet::new());
    }
    ask.sort_unstable();
    ask.dedup();
    let mut conn = reader.acquire().await.db()?;
    let found = accounts_among(&mut conn, &ask).await.db()?;
    let missing = ask
        .iter()
        .filter(|o| !found.iter().any(|f| f == *o))
        .map(|o| o.to_string())
        .collect();
    let mut known = shared.known.lock();
    if known.len() + found.len() > KNOWN_MAX {
        known.clear();
    }
    known.extend(found);
    Ok(missing)
}

/// Which of `names` have an account.
pub(super) async fn accounts_among(
    conn: &mut sqlx::SqliteConnection,
    names: &[&str],
) -> Result<Vec<String>, sqlx::Error> {
    let mut found = Vec::with_capacity(names.len());
    for chunk in in_prepared_sizes(names) {
        let mut qb = QueryBuilder::new("SELECT username FROM accounts WHERE username IN (");
        let mut list = qb.separated(", ");
        for n in chunk {
            list.push_bind(*n);
        }
        qb.push(")");
        found.extend(
            qb.build_query_scalar::<String>()
                .fetch_all(&mut *conn)
                .await?,
        );
    }
    Ok(found)
}

/// Runs [`folder`] on a thread of its own, below the sessions' CPU priority (see
/// `priority`): building a fold's statements takes milliseconds of CPU, which on the
/// sessions' runtime would hold up every message meanwhile. The thread's own runtime
/// drives its timers; the writer pool and the channels work from any runtime.
fn spawn_folder(
    writer: SqlitePool,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    health: Arc<WriteHealth>,
) -> Result<oneshot::Receiver<()>, StoreError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| StoreError::Backend(format!("cannot start the archive fold: {e}")))?;
    let (done, ended) = oneshot::channel();
    std::thread::Builder::new()
        .name(priority::FOLD_THREAD.into())
        .spawn(move || {
            priority::lower_this_thread();
            runtime.block_on(async {
                folder(writer, shared, stop, health).await;
                // Lets the pool take back the writer connection (sqlx returns it from a
                // task spawned on this runtime) before the runtime goes.
                for _ in 0..4 {
                    tokio::task::yield_now().await;
                }
            });
            let _ = done.send(());
        })
        .map_err(|e| StoreError::Backend(format!("cannot start the archive fold thread: {e}")))?;
    Ok(ended)
}

/// Folds pending rows into the database: every [`FOLD_EVERY`] while some wait, at once
/// when woken; until stopped, then everything left.
async fn folder(
    writer: SqlitePool,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    health: Arc<WriteHealth>,
) {
    let sql = FoldSql::new();
    let mut stopping = false;
    loop {
        if !stopping {
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep(FOLD_EVERY) => {}
                _ = stop.changed() => stopping = true,
            }
        }
        loop {
            let rows: Vec<Pending> = {
                let mut pending = shared.pending.lock();
                let n = pending.len().min(FOLD_MAX);
                pending.drain(..n).collect()
            };
            if rows.is_empty() {
                break;
            }
            match fold(&writer, &sql, &rows).await {
                Ok(()) => {
                    health.record_ok();
                    let bytes: usize = rows.iter().map(Pending::bytes).sum();
                    shared.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
                    shared.folded.send_modify(|f| *f += rows.len() as u64);
                }
                Err(e) => {
                    // Kept (in order) for the next try; the log still has them too.
                    tracing::error!(error = %e, rows = rows.len(), "folding the archive log failed");
                    health.record_err(&e.to_string());
                    {
                        let mut pending = shared.pending.lock();
                        for p in rows.into_iter().rev() {
                            pending.push_front(p);
                        }
                    }
                    if stopping {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Inserts `rows` (in log order) and records the log position after the last one, in one
/// transaction. A row whose owner is gone is dropped with a warning.
///
/// No statement here can fail halfway (owners are checked first in the same write
/// transaction, a duplicate id ignored, and `archive.owner` is no foreign key: see
/// migration 0012), so SQLite keeps no statement journal for the multi-row INSERTs. Every
/// statement has one of the [`PREPARED_SIZES`], so the writer connection keeps them all
/// prepared rather than parsing a statement of a new length on every fold.
async fn fold(writer: &SqlitePool, sql: &FoldSql, rows: &[Pending]) -> Result<(), sqlx::Error> {
    let Some(last) = rows.last() else {
        return Ok(());
    };
    // Every archive index starts with the owner: inserting owner by owner walks each
    // index in key order through pages just touched, rather than one random descent per
    // row (about a third less CPU per row). The sort is stable, so one owner's rows keep
    // their log order, and with it `seq` and `ts` agree per owner; across owners they
    // may disagree within one fold (see `FOLD_MAX`).
    let mut by_owner: Vec<&Pending> = rows.iter().collect();
    by_owner.sort_by(|a, b| a.row.owner.cmp(&b.row.owner));
    let mut owners: Vec<&str> = by_owner.iter().map(|p| p.row.owner.as_str()).collect();
    owners.dedup();
    let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
    // Sorted for a binary search: cheaper per row than hashing each owner again.
    let mut found = accounts_among(&mut tx, &owners).await?;
    found.sort_unstable();
    let kept: Vec<&Pending> = by_owner
        .into_iter()
        .filter(|p| {
            let ok = found.binary_search(&p.row.owner).is_ok();
            if !ok {
                tracing::warn!(owner = %p.row.owner,
                    "archive log row dropped at fold (account deleted meanwhile)");
            }
            ok
        })
        .collect();
    for chunk in in_prepared_sizes(&kept) {
        // Text binds borrow the rows (a `&String` bind would copy each one).
        let mut q = sqlx::query(sql.insert(chunk.len()));
        for p in chunk {
            q = q
                .bind(p.row.owner.as_str())
                .bind(p.row.id.as_str())
                .bind(p.row.with.as_str())
                .bind(p.ts)
                .bind(p.row.outgoing)
                .bind(p.row.stanza.as_str());
        }
        q.execute(&mut *tx).await?;
    }
    sqlx::query("UPDATE archive_journal SET gen = $1, pos = $2")
        .bind(last.gen as i64)
        .bind(last.end as i64)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// The fold's INSERT for each of the [`PREPARED_SIZES`], written once, not on every fold.
struct FoldSql([String; PREPARED_SIZES.len()]);

impl FoldSql {
    fn new() -> Self {
        FoldSql(PREPARED_SIZES.map(|n| {
            let mut sql = String::from(
                "INSERT OR IGNORE INTO archive (owner, id, with_jid, ts, outgoing, stanza) VALUES ",
            );
            for i in 0..n {
                sql.push_str(if i == 0 {
                    "(?, ?, ?, ?, ?, ?)"
                } else {
                    ", (?, ?, ?, ?, ?, ?)"
                });
            }
            sql
        }))
    }

    /// The INSERT of `rows` rows, one of the [`PREPARED_SIZES`].
    fn insert(&self, rows: usize) -> &str {
        let i = PREPARED_SIZES.iter().position(|&n| n == rows);
        &self.0[i.expect("a fold chunk has one of PREPARED_SIZES rows")]
    }
}

/// `items` in consecutive slices whose lengths are all [`PREPARED_SIZES`], largest first.
fn in_prepared_sizes<T>(mut items: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        let n = *PREPARED_SIZES.iter().find(|&&n| n <= items.len())?;
        let (head, rest) = items.split_at(n);
        items = rest;
        Some(head)
    })
}

/// One record: payload length and CRC-32 (little-endian u32 each), then the payload:
/// ts (i64), outgoing (u8), owner, id, with, stanza (each a u32 length and UTF-8 bytes).
fn encode(buf: &mut Vec<u8>, row: &ArchiveRow, ts: i64) {
    let head = buf.len();
    buf.extend_from_slice(&[0; 8]);
    buf.extend_from_slice(&ts.to_le_bytes());
    buf.push(u8::from(row.outgoing));
    for s in [&row.owner, &row.id, &row.with, &row.stanza] {
        buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
        buf.extend_from_slice(s.as_bytes());
    }
    let payload = &buf[head + 8..];
    let len = (payload.len() as u32).to_le_bytes();
    let crc = crc32fast::hash(payload).to_le_bytes();
    buf[head..head + 4].copy_from_slice(&len);
    buf[head + 4..head + 8].copy_from_slice(&crc);
}

fn decode(payload: &[u8]) -> Option<(ArchiveRow, i64)> {
    let ts = i64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let outgoing = *payload.get(8)? != 0;
    let mut at = 9;
    let mut next = || -> Option<String> {
        let n = u32::from_le_bytes(payload.get(at..at + 4)?.try_into().ok()?) as usize;
        let s = std::str::from_utf8(payload.get(at + 4..at + 4 + n)?).ok()?;
        at += 4 + n;
        Some(s.to_owned())
    };
    let (owner, id, with, stanza) = (next()?, next()?, next()?, next()?);
    Some((
        ArchiveRow {
            id,
            owner,
            with,
            stanza,
            outgoing,
        },
        ts,
    ))
}

/// The complete records of log `path` from offset `from`, if the file holds generation
/// `gen` (`None`: no such file, or another generation). Stops at the first torn or
/// corrupt record: the tail of a write that did not finish.
fn read_log(path: &Path, gen: u64, from: u64) -> io::Result<Option<Vec<Pending>>> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut data = Vec::new();
    file.read_to_end(&mut data)?;
    if data.len() < HEADER as usize
        || &data[..8] != MAGIC
        || u64::from_le_bytes(data[8..16].try_into().unwrap_or_default()) != gen
    {
        return Ok(None);
    }
    let mut rows = Vec::new();
    let mut at = from as usize;
    while let Some(head) = data.get(at..at + 8) {
        let len = u32::from_le_bytes(head[..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().unwrap_or_default());
        let Some(payload) = data.get(at + 8..at + 8 + len) else {
            break;
        };
        if crc32fast::hash(payload) != crc {
            break;
        }
        let Some((row, ts)) = decode(payload) else {
            break;
        };
        at += 8 + len;
        rows.push(Pending {
            row,
            ts,
            gen,
            end: at as u64,
        });
    }
    Ok(Some(rows))
}

/// Empties `path` (0600) and writes the header of generation `gen`.
fn start_file(path: &Path, gen: u64, sync_full: bool) -> io::Result<File> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    crate::files::tighten(path)?;
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    let mut head = Vec::with_capacity(HEADER as usize);
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&gen.to_le_bytes());
    file.write_all(&head)?;
    if sync_full {
        file.sync_data()?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
    }
    Ok(file)
}

/// The log file, owned by a thread of its own so a write that waits for the disk never
/// holds up the async runtime.
struct LogFile {
    db_path: PathBuf,
    file: File,
    gen: u64,
    len: u64,
    sync_full: bool,
}

impl LogFile {
    fn run(mut self, mut rx: mpsc::Receiver<FileCmd>) {
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                FileCmd::Write { buf, reply } => {
                    let r = self.write(&buf);
                    let _ = reply.send((buf, r));
                }
                FileCmd::Rotate(reply) => {
                    let gen = self.gen + 1;
                    let path = log_path(&self.db_path, gen);
                    let r = start_file(&path, gen, self.sync_full).map(|f| {
                        self.file = f;
                        self.gen = gen;
                        self.len = HEADER;
                    });
                    let _ = reply.send(r);
                }
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<(u64, u64)> {
        let start = self.len;
        let r = self.file.write_all(buf).and_then(|()| {
            if self.sync_full {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        match r {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok((self.gen, start))
            }
            Err(e) => {
                // No torn record left behind for the next write to follow.
                let _ = self.file.set_len(start);
                let _ = self.file.seek(SeekFrom::Start(start));
                Err(e)
            }
        }
    }
}

/// For a process that does not own the log (see [`Journal::open`]): folds what the
/// owner's log holds now into the database itself, so this process reads everything the
/// owner acknowledged before. Safe next to the owner's own folds: a row folded twice is
/// ignored the second time (its `(owner, id)` is unique), and a log position set back by
/// a slower fold only means such rows are skipped again after a restart.
pub(crate) async fn fold_foreign(db_path: &Path, writer: &SqlitePool) -> Result<(), StoreError> {
    let (_, logs) = unfolded(db_path, writer).await?;
    let sql = FoldSql::new();
    for (_, rows) in logs {
        for chunk in rows.chunks(FOLD_MAX) {
            fold(writer, &sql, chunk).await.db()?;
        }
    }
    Ok(())
}

/// What the log holds beyond the position the database records: the recorded
/// generation, and the rows of each generation whose file exists (the recorded one from
/// its position, then the next one whole), in log order.
async fn unfolded(
    db_path: &Path,
    writer: &SqlitePool,
) -> Result<(u64, Vec<(u64, Vec<Pending>)>), StoreError> {
    let (gen, pos): (i64, i64) = sqlx::query_as("SELECT gen, pos FROM archive_journal")
        .fetch_one(writer)
        .await
        .db()?;
    let (gen, pos) = (gen as u64, pos as u64);
    let mut logs = Vec::new();
    for (g, from) in [(gen, pos.max(HEADER)), (gen + 1, HEADER)] {
        let path = log_path(db_path, g);
        match read_log(&path, g, from) {
            Ok(Some(rows)) => logs.push((g, rows)),
            Ok(None) => {}
            Err(e) => return Err(io_err("cannot read it", &path, e)),
        }
    }
    Ok((gen, logs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Any fold splits into statements of the prepared sizes only, in order, every row
    /// once; each statement has six parameters a row.
    #[test]
    fn folds_split_into_prepared_sizes() {
        let sql = FoldSql::new();
        for len in [0usize, 1, 3, 5, 63, 64, 65, 255, 256, 257, 1000, 4096, 8191] {
            let items: Vec<usize> = (0..len).collect();
            let chunks: Vec<&[usize]> = in_prepared_sizes(&items).collect();
            assert_eq!(chunks.concat(), items, "{len} rows");
            for c in &chunks {
                assert!(
                    PREPARED_SIZES.contains(&c.len()),
                    "{len}: a chunk of {}",
                    c.len()
                );
                assert_eq!(sql.insert(c.len()).matches('?').count(), 6 * c.len());
            }
            // Largest first: fewest statements.
            assert!(chunks.windows(2).all(|w| w[0].len() >= w[1].len()));
        }
    }
}
