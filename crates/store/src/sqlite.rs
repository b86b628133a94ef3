//! Embedded SQLite backend.
//!
//! SQLite allows one writer at a time. Rather than letting several pooled connections race
//! for the write lock (and spin in the busy handler), all writes go through a pool with a
//! single connection, so in-process writers queue fairly; reads use a separate pool and run
//! concurrently thanks to WAL. Write transactions start with `BEGIN IMMEDIATE` so that a
//! second process (e.g. an admin CLI) can't make a read-then-write transaction fail halfway.
//!
//! Queries use `$N` placeholders and portable SQL so the PostgreSQL backend can share them
//! where it wants; SQLite specifics (pragmas, checkpointing) stay in this file.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

use crate::{
    dedup_groups, domain_of, now_unix, AccountCredentials, RosterItem, Store, StoreError,
    StoredCredentials, Subscription,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long a connection waits for a lock held by another process before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent readers; WAL lets them proceed alongside the writer.
const READERS: u32 = 4;

type Tx = Transaction<'static, Sqlite>;

pub struct SqliteStore {
    writer: SqlitePool,
    /// `None` for in-memory stores, whose database lives in the writer's single connection.
    reader: Option<SqlitePool>,
}

impl SqliteStore {
    /// Open (creating the file and parent dir) and migrate. Fails with a clear error
    /// naming the path when it can't. `sync_full`: PRAGMA synchronous=FULL instead of NORMAL
    /// (NORMAL in WAL mode can lose the last commits on power loss, never corrupt).
    pub async fn open(path: &Path, sync_full: bool) -> Result<Self, StoreError> {
        let shown = path.display();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir).await.map_err(|e| {
                StoreError::Backend(format!(
                    "cannot create directory {} for SQLite database {shown}: {e}",
                    dir.display()
                ))
            })?;
        }
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
            .busy_timeout(BUSY_TIMEOUT);
        let open_err = |e: sqlx::Error| {
            StoreError::Backend(format!("cannot open SQLite database {shown}: {e}"))
        };

        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone().optimize_on_close(true, 400))
            .await
            .map_err(open_err)?;
        // Migrate before readers exist so they never see a half-built schema.
        if let Err(e) = MIGRATOR.run(&writer).await {
            writer.close().await;
            return Err(StoreError::Migration(format!(
                "SQLite database {shown}: {e}"
            )));
        }
        let reader = match SqlitePoolOptions::new()
            .max_connections(READERS)
            .connect_with(options)
            .await
        {
            Ok(r) => r,
            Err(e) => {
                writer.close().await;
                return Err(open_err(e));
            }
        };
        Ok(SqliteStore {
            writer,
            reader: Some(reader),
        })
    }

    /// A private in-memory database (for tests); gone when the store is closed or dropped.
    pub async fn open_memory() -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .in_memory(true)
            .shared_cache(false)
            .foreign_keys(true);
        // Exactly one connection that never expires: every connection to ":memory:" would
        // otherwise be a separate, empty database.
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
        Ok(SqliteStore {
            writer,
            reader: None,
        })
    }

    fn read_pool(&self) -> &SqlitePool {
        self.reader.as_ref().unwrap_or(&self.writer)
    }

    async fn write_tx(&self) -> Result<Tx, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
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

    async fn ping(&self) -> Result<(), StoreError> {
        let one: i64 = sqlx::query_scalar("SELECT 1")
            .fetch_one(self.read_pool())
            .await?;
        debug_assert_eq!(one, 1);
        Ok(())
    }

    async fn close(&self) {
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
}
