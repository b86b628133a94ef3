//! SQLite's side of group commit ([`crate::batch`]): `BEGIN IMMEDIATE` on the single
//! writer connection, so batches take turns with every other write.

use sqlx::sqlite::SqlitePool;

use super::Tx;
use crate::batch::{ArchiveRow, BatchBackend, OfflineRow};
use crate::sql::ArchiveTable;

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
