//! SQLite's side of group commit ([`crate::batch`]): `BEGIN IMMEDIATE` on the single
//! writer connection, so batches take turns with every other write.

use sqlx::sqlite::SqlitePool;

use super::Tx;
use crate::batch::{ArchiveRow, BatchBackend, OfflineRow};
use crate::sql::{ArchiveTable, USER_ARCHIVE};

pub(super) struct SqliteBatch(pub SqlitePool);

#[async_trait::async_trait]
impl BatchBackend for SqliteBatch {
    type Tx = Tx;
    // A constraint violation undoes only its statement (SQLite's default ABORT).
    const STATEMENT_SCOPED: bool = true;
    // 6 parameters each, well under SQLite's limit of 32766.
    const ROWS_PER_INSERT: usize = 500;

    async fn begin(&self) -> Result<Tx, sqlx::Error> {
        self.0.begin_with("BEGIN IMMEDIATE").await
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
        rows: &[&ArchiveRow],
        ts: i64,
    ) -> Result<(), sqlx::Error> {
        // The user archive's owner is no foreign key (migration 0012, for the archive
        // log's fold): without the log, its rows are checked here, in the transaction.
        if table.table == USER_ARCHIVE.table {
            let mut owners: Vec<&str> = rows.iter().map(|r| r.owner.as_str()).collect();
            owners.sort_unstable();
            owners.dedup();
            if super::journal::accounts_among(tx, &owners).await?.len() < owners.len() {
                return Err(sqlx::Error::Database(Box::new(NoSuchOwner)));
            }
        }
        super::insert_archive_rows(tx, table, rows, ts).await
    }

    async fn push_offline(
        tx: &mut Tx,
        msg: &OfflineRow<'_>,
        now: i64,
    ) -> Result<Option<i64>, sqlx::Error> {
        super::push_offline_row(tx, msg, now).await
    }
}

/// A user-archive row whose owner has no account: reported as the foreign-key violation
/// the column used to raise, so group commit fails that request alone, as not found.
#[derive(Debug)]
struct NoSuchOwner;

impl std::fmt::Display for NoSuchOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(sqlx::error::DatabaseError::message(self))
    }
}

impl std::error::Error for NoSuchOwner {}

impl sqlx::error::DatabaseError for NoSuchOwner {
    fn message(&self) -> &str {
        "archive owner has no account"
    }
    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }
    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }
    fn kind(&self) -> sqlx::error::ErrorKind {
        sqlx::error::ErrorKind::ForeignKeyViolation
    }
}
