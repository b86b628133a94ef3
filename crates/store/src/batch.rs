//! Group commit for the high-rate durable writes (archive appends to a user's or a
//! room's archive, offline pushes), shared by the backends through [`BatchBackend`].
//!
//! Callers send requests to one writer task over a channel. The task takes the first
//! request, then everything else already queued (up to [`MAX_BATCH`]), and applies them in
//! a single transaction, so one commit (one WAL sync) covers the whole batch. There is no
//! timer: while a batch commits, new requests pile up in the channel and form the next
//! batch, so batches grow with load and an idle server still commits a lone request
//! immediately.
//!
//! A request that fails (unknown account, full offline queue, …) is undone on its own —
//! by statement-level atomicity where the backend has it, or a SAVEPOINT — and reported to
//! its caller, and the rest of the batch still commits. Every caller is answered through
//! its oneshot only after the commit has returned, so a successful reply means the data is
//! durable. If the transaction itself fails, every caller gets the error, and the failed
//! transaction is rolled back when it is dropped (SQLite: if it already ended, the writer
//! pool replaces the connection, see `SqliteStore::open`'s `after_release`). Each
//! transaction's outcome goes to [`WriteHealth`] for readiness checks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::error::ErrorKind;
use tokio::sync::{mpsc, oneshot};

use crate::health::WriteHealth;
use crate::sql::{map_fk, ArchiveTable};
use crate::{now_micros, StoreError};

/// What a backend provides for group commit: a transaction and the two writes.
#[async_trait::async_trait]
pub(crate) trait BatchBackend: Send + Sync + 'static {
    type Tx: Send;
    /// Whether a constraint violation undoes just the failing statement and leaves the
    /// transaction usable (SQLite's ABORT resolution). PostgreSQL aborts the whole
    /// transaction instead, so there every request that may fail runs under a savepoint.
    const STATEMENT_SCOPED: bool;
    /// Archive rows per INSERT statement (within the backend's parameter limit).
    const ROWS_PER_INSERT: usize;

    async fn begin(&self) -> Result<Self::Tx, sqlx::Error>;
    async fn commit(tx: Self::Tx) -> Result<(), sqlx::Error>;
    /// Runs a statement without results (savepoints).
    async fn execute(tx: &mut Self::Tx, sql: &'static str) -> Result<(), sqlx::Error>;
    /// One INSERT of all `rows` into `table`, every one with timestamp `ts`.
    async fn insert_archive(
        tx: &mut Self::Tx,
        table: &ArchiveTable,
        rows: &[&ArchiveRow],
        ts: i64,
    ) -> Result<(), sqlx::Error>;
    /// Queues one offline message unless `user` already has `limit` queued: its seq, or
    /// `None` when the queue is full. The quota check must see earlier inserts of the same
    /// transaction; an unknown account must fail on its foreign key.
    async fn push_offline(
        tx: &mut Self::Tx,
        msg: &OfflineRow<'_>,
        now: i64,
    ) -> Result<Option<i64>, sqlx::Error>;
}

/// An offline push as the backend writes it.
pub(crate) struct OfflineRow<'a> {
    pub user: &'a str,
    pub stanza: &'a str,
    pub archive_id: Option<&'a str>,
    pub limit: i64,
    pub ord: i64,
}

/// Most requests committed in one transaction.
const MAX_BATCH: usize = 256;
/// Requests that may wait in the channel before senders wait too (back-pressure).
const QUEUE: usize = 4096;

/// One archive row, with its stanza-id already assigned. (`outgoing` is not stored in an
/// archive without that column.)
pub(crate) struct ArchiveRow {
    pub id: String,
    pub owner: String,
    pub with: String,
    pub stanza: String,
    pub outgoing: bool,
}

enum Request {
    Archive {
        table: &'static ArchiveTable,
        rows: Vec<ArchiveRow>,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
    Offline {
        user: String,
        stanza: String,
        archive_id: Option<String>,
        limit: i64,
        ord: i64,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    /// Finish what was queued before, then stop.
    Shutdown(oneshot::Sender<()>),
}

enum Done {
    Archived,
    Queued(u64),
}

/// Counters for observing how well group commit batches.
#[derive(Default)]
pub(crate) struct Stats {
    pub batches: AtomicU64,
    pub requests: AtomicU64,
}

/// Handle to the writer task; dropping it (with the store) stops the task.
pub(crate) struct BatchWriter {
    tx: mpsc::Sender<Request>,
    pub stats: Arc<Stats>,
}

fn closed() -> StoreError {
    StoreError::Backend("store is closed".into())
}

impl BatchWriter {
    /// Starts the writer task on the current Tokio runtime. `last_ts`: the newest archive
    /// timestamp already stored, so timestamps never go backwards in archive order.
    pub fn spawn<B: BatchBackend>(backend: B, last_ts: i64, health: Arc<WriteHealth>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stats = Arc::new(Stats::default());
        tokio::spawn(run(backend, rx, last_ts, stats.clone(), health));
        BatchWriter { tx, stats }
    }

    /// Appends `rows` to `table` (one archive of the two: the same timestamps for both).
    pub async fn archive(
        &self,
        table: &'static ArchiveTable,
        rows: Vec<ArchiveRow>,
    ) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request::Archive { table, rows, reply })
            .await
            .map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    pub async fn offline(
        &self,
        user: &str,
        stanza: &str,
        archive_id: Option<&str>,
        limit: usize,
        ord: i64,
    ) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        let req = Request::Offline {
            user: user.to_owned(),
            stanza: stanza.to_owned(),
            archive_id: archive_id.map(str::to_owned),
            limit: i64::try_from(limit).unwrap_or(i64::MAX),
            ord,
            reply,
        };
        self.tx.send(req).await.map_err(|_| closed())?;
        answer.await.map_err(|_| closed())?
    }

    /// Commits everything queued so far, then stops the task. Later requests fail.
    pub async fn shutdown(&self) {
        let (reply, done) = oneshot::channel();
        if self.tx.send(Request::Shutdown(reply)).await.is_ok() {
            let _ = done.await;
        }
    }
}

async fn run<B: BatchBackend>(
    backend: B,
    mut rx: mpsc::Receiver<Request>,
    mut last_ts: i64,
    stats: Arc<Stats>,
    health: Arc<WriteHealth>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        let mut shutdown = None;
        match first {
            Request::Shutdown(reply) => shutdown = Some(reply),
            req => {
                batch.push(req);
                // Let tasks that are just about to send get into this batch.
                tokio::task::yield_now().await;
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(Request::Shutdown(reply)) => {
                            shutdown = Some(reply);
                            break;
                        }
                        Ok(req) => batch.push(req),
                        Err(_) => break,
                    }
                }
            }
        }
        if !batch.is_empty() {
            stats.batches.fetch_add(1, Ordering::Relaxed);
            stats
                .requests
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            commit(&backend, &mut batch, &mut last_ts, &health).await;
        }
        if let Some(reply) = shutdown {
            // Refuse new requests; whatever was queued after the shutdown fails.
            rx.close();
            while let Ok(req) = rx.try_recv() {
                fail(req, closed());
            }
            let _ = reply.send(());
            return;
        }
    }
}

fn fail(req: Request, e: StoreError) {
    match req {
        Request::Archive { reply, .. } => drop(reply.send(Err(e))),
        Request::Offline { reply, .. } => drop(reply.send(Err(e))),
        Request::Shutdown(reply) => drop(reply.send(())),
    }
}

/// Why applying one request failed.
enum Fail {
    /// The offline queue is full (nothing was written).
    Quota,
    Sql(sqlx::Error),
}

impl From<sqlx::Error> for Fail {
    fn from(e: sqlx::Error) -> Self {
        Fail::Sql(e)
    }
}

impl Fail {
    /// The error reported to the request's caller.
    fn into_store_error(self) -> StoreError {
        match self {
            Fail::Quota => StoreError::QuotaExceeded,
            Fail::Sql(e) => map_fk(e),
        }
    }

    /// Whether this failure concerns the request alone (quota, constraint violations),
    /// rather than the transaction (I/O errors, a full disk, a lost connection).
    fn is_request_scoped(&self) -> bool {
        match self {
            Fail::Quota => true,
            Fail::Sql(e) => constraint_violation(e),
        }
    }
}

/// A constraint violation: a fault of the request, not of the database.
fn constraint_violation(e: &sqlx::Error) -> bool {
    e.as_database_error().is_some_and(|d| {
        matches!(
            d.kind(),
            ErrorKind::ForeignKeyViolation
                | ErrorKind::UniqueViolation
                | ErrorKind::NotNullViolation
                | ErrorKind::CheckViolation
        )
    })
}

impl Request {
    /// Statements [`apply`] runs for this request.
    fn statements(&self, rows_per_insert: usize) -> usize {
        match self {
            Request::Archive { rows, .. } => rows.len().div_ceil(rows_per_insert),
            _ => 1,
        }
    }
}

/// Applies and commits `batch` (emptying it) and answers every request.
///
/// Where a constraint violation only undoes its statement (SQLite), a request of one
/// statement needs no savepoint; requests of several statements, and every request where
/// a failed statement aborts the transaction (PostgreSQL), get a SAVEPOINT so a failing
/// request is undone alone. Any other failure leaves the transaction in doubt and fails
/// the batch.
async fn commit<B: BatchBackend>(
    backend: &B,
    batch: &mut Vec<Request>,
    last_ts: &mut i64,
    health: &WriteHealth,
) {
    let mut outcomes: Vec<Result<Done, StoreError>> = Vec::with_capacity(batch.len());
    let committed: Result<(), sqlx::Error> = async {
        let mut tx = backend.begin().await?;
        let mut i = 0;
        while i < batch.len() {
            // Consecutive archive appends share one INSERT (one round trip instead of one
            // per request); if it fails, each is retried alone so only the failing
            // request fails.
            let run = archive_run(&batch[i..], B::ROWS_PER_INSERT);
            if run > 1 {
                let ts = now_micros().max(*last_ts);
                match insert_shared::<B>(&mut tx, &batch[i..i + run], ts).await {
                    Ok(()) => {
                        *last_ts = ts;
                        outcomes.extend((0..run).map(|_| Ok(Done::Archived)));
                        i += run;
                        continue;
                    }
                    Err(e) if constraint_violation(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            // One at a time: a lone request, a failed shared INSERT, or an offline push.
            let alone = run.max(1);
            for req in &batch[i..i + alone] {
                outcomes.push(apply_one::<B>(&mut tx, req, last_ts).await?);
            }
            i += alone;
        }
        B::commit(tx).await
    }
    .await;

    let failure = committed.err().map(|e| {
        tracing::error!(error = %e, requests = batch.len(), "group commit failed");
        e.to_string()
    });
    match &failure {
        None => health.record_ok(),
        Some(e) => health.record_err(e),
    }
    let mut outcomes = outcomes.into_iter();
    for req in batch.drain(..) {
        let outcome = match (&failure, outcomes.next()) {
            // Requests that failed on their own keep their specific error.
            (_, Some(Err(e))) => Err(e),
            (None, Some(Ok(done))) => Ok(done),
            (Some(msg), _) => Err(StoreError::Backend(msg.clone())),
            (None, None) => Err(StoreError::Backend("request not applied".into())),
        };
        match (req, outcome) {
            (Request::Archive { reply, .. }, r) => {
                let _ = reply.send(r.map(|_| ()));
            }
            (Request::Offline { reply, .. }, r) => {
                let _ = reply.send(r.and_then(|done| match done {
                    Done::Queued(seq) => Ok(seq),
                    Done::Archived => Err(StoreError::Backend("mismatched reply".into())),
                }));
            }
            (Request::Shutdown(reply), _) => {
                let _ = reply.send(());
            }
        }
    }
}

/// The shared INSERT of several archive requests (to the same table, see
/// [`archive_run`]); under a savepoint where a failed statement would abort the
/// transaction, so the requests can be retried alone.
async fn insert_shared<B: BatchBackend>(
    tx: &mut B::Tx,
    reqs: &[Request],
    ts: i64,
) -> Result<(), sqlx::Error> {
    let Some(Request::Archive { table, .. }) = reqs.first() else {
        return Ok(());
    };
    let rows: Vec<&ArchiveRow> = reqs
        .iter()
        .flat_map(|r| match r {
            Request::Archive { rows, .. } => rows.as_slice(),
            _ => &[],
        })
        .collect();
    if B::STATEMENT_SCOPED {
        return B::insert_archive(tx, table, &rows, ts).await;
    }
    B::execute(tx, "SAVEPOINT natter_batch_item").await?;
    match B::insert_archive(tx, table, &rows, ts).await {
        Ok(()) => B::execute(tx, "RELEASE natter_batch_item").await,
        Err(e) => {
            B::execute(tx, "ROLLBACK TO natter_batch_item").await?;
            B::execute(tx, "RELEASE natter_batch_item").await?;
            Err(e)
        }
    }
}

/// Applies one request on its own (under a SAVEPOINT when it needs one).
/// Err only when the transaction itself is in doubt.
async fn apply_one<B: BatchBackend>(
    tx: &mut B::Tx,
    req: &Request,
    last_ts: &mut i64,
) -> Result<Result<Done, StoreError>, sqlx::Error> {
    let guarded = !B::STATEMENT_SCOPED || req.statements(B::ROWS_PER_INSERT) > 1;
    if guarded {
        B::execute(tx, "SAVEPOINT natter_batch_item").await?;
    }
    // Archive timestamps never decrease, even if the clock steps back.
    let ts = now_micros().max(*last_ts);
    let outcome = match apply::<B>(tx, req, ts).await {
        Ok(done) => Ok(done),
        Err(fail) if guarded && fail.is_request_scoped() => {
            B::execute(tx, "ROLLBACK TO natter_batch_item").await?;
            Err(fail.into_store_error())
        }
        Err(fail) if fail.is_request_scoped() => Err(fail.into_store_error()),
        Err(Fail::Sql(e)) => return Err(e),
        Err(Fail::Quota) => unreachable!("quota is request-scoped"),
    };
    if guarded {
        B::execute(tx, "RELEASE natter_batch_item").await?;
    }
    if let Ok(Done::Archived) = outcome {
        *last_ts = ts;
    }
    Ok(outcome)
}

/// How many archive requests at the head of `reqs` fit one INSERT together (into the
/// same table).
fn archive_run(reqs: &[Request], rows_per_insert: usize) -> usize {
    let Some(Request::Archive { table: first, .. }) = reqs.first() else {
        return 0;
    };
    let mut rows = 0;
    reqs.iter()
        .take_while(|r| match r {
            Request::Archive { table, rows: r, .. }
                if table == first && rows + r.len() <= rows_per_insert =>
            {
                rows += r.len();
                true
            }
            _ => false,
        })
        .count()
}

async fn apply<B: BatchBackend>(tx: &mut B::Tx, req: &Request, ts: i64) -> Result<Done, Fail> {
    match req {
        Request::Archive { table, rows, .. } => {
            for chunk in rows.chunks(B::ROWS_PER_INSERT) {
                let chunk: Vec<&ArchiveRow> = chunk.iter().collect();
                B::insert_archive(tx, table, &chunk, ts).await?;
            }
            Ok(Done::Archived)
        }
        Request::Offline {
            user,
            stanza,
            archive_id,
            limit,
            ord,
            ..
        } => {
            let row = OfflineRow {
                user,
                stanza,
                archive_id: archive_id.as_deref(),
                limit: *limit,
                ord: *ord,
            };
            let seq = B::push_offline(tx, &row, now_micros())
                .await?
                .ok_or(Fail::Quota)?;
            u64::try_from(seq)
                .map(Done::Queued)
                .map_err(|_| Fail::Sql(sqlx::Error::Protocol(format!("corrupt offline seq {seq}"))))
        }
        Request::Shutdown(_) => Err(Fail::Sql(sqlx::Error::Protocol(
            "shutdown is not a write".into(),
        ))),
    }
}
