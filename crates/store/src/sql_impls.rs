//! The store methods whose SQL is the same on SQLite and PostgreSQL, written once.
//!
//! `sql_store!(Store, Db)` expands, inside a backend module, to that backend's
//! implementation of every aggregate trait but [`crate::Lifecycle`]. Names in the
//! expansion resolve in the backend module, which provides: `Tx` (its transaction type),
//! the imports these bodies use, and on the store type `read_pool()`, `write_pool()`,
//! `read_tx()` (one snapshot), `write_tx()`, `version_in(tx, user, lock)`,
//! `account_exists(tx, user)`, `delete_offline(user, seqs)`, `archive_by_ids(table)` (the
//! `FROM` of an archive query by id list) and the constant `NODE_FOR_PUBLISH` (reading a
//! node's `max_items` in the publishing transaction). A macro rather than code generic
//! over `sqlx::Database`: the bounds for every bound and decoded type would outweigh the
//! bodies.
//!
//! The users' and the rooms' archives share one implementation (append, query, get),
//! parametrized by [`crate::sql::ArchiveTable`].

macro_rules! sql_store {
    ($store:ident, $db:ty) => {
impl $store {
    async fn bump_version(tx: &mut Tx, user: &str) -> Result<u64, StoreError> {
        let v: i64 = sqlx::query_scalar(
            "UPDATE accounts SET roster_version = roster_version + 1 \
             WHERE username = $1 RETURNING roster_version",
        )
        .bind(user)
        .fetch_one(&mut **tx)
        .await
        .db()?;
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
        .await
        .db()?;
        let Some(row) = row else { return Ok(None) };
        let groups: Vec<String> = sqlx::query_scalar(
            "SELECT group_name FROM roster_groups \
             WHERE username = $1 AND contact = $2 ORDER BY position",
        )
        .bind(user)
        .bind(contact)
        .fetch_all(&mut **tx)
        .await
        .db()?;
        let mut item = row_to_item(row)?;
        item.groups = groups;
        Ok(Some(item))
    }

    /// Deletes `owner`'s archived messages older than `older_than_micros`, a chunk per
    /// transaction so other writes never wait long.
    async fn prune_owner(&self, owner: &str, older_than_micros: i64) -> Result<u64, StoreError> {
        let mut total = 0u64;
        loop {
            let mut tx = self.write_tx().await?;
            let deleted = sqlx::query(
                "DELETE FROM archive WHERE seq IN (SELECT seq FROM archive \
                 WHERE owner = $1 AND ts < $2 LIMIT $3)",
            )
            .bind(owner)
            .bind(older_than_micros)
            .bind(PRUNE_CHUNK)
            .execute(&mut *tx)
            .await
            .db()?
            .rows_affected();
            tx.commit().await.db()?;
            total += deleted;
            if deleted < PRUNE_CHUNK as u64 {
                return Ok(total);
            }
        }
    }

    /// `FROM archive WHERE …` (or `room_archive`, as `t` says) for `owner`'s messages
    /// matching the `<with/>` and `ids` filters between the exclusive positions `lo` and
    /// `hi` (see [`Position`]).
    fn push_archive_from<'a>(
        qb: &mut QueryBuilder<'a, $db>,
        t: &ArchiveTable,
        owner: &'a str,
        q: &'a ArchiveQuery,
        lo: Option<Position>,
        hi: Option<Position>,
    ) {
        qb.push(match q.ids.as_deref() {
            Some([_, ..]) => Self::archive_by_ids(t),
            _ => format!(" FROM {}", t.table),
        });
        qb.push(format!(" WHERE {} = ", t.owner)).push_bind(owner);
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
        // `ts` alone bounds the index range; `seq` only orders the rows of equal `ts`.
        for (bound, (cmp, cmp_eq)) in [(lo, (">", ">=")), (hi, ("<", "<="))] {
            let Some(pos) = bound else { continue };
            qb.push(format!(" AND ts {cmp_eq} ")).push_bind(pos.ts);
            if pos.is_message() {
                qb.push(format!(" AND (ts {cmp} ")).push_bind(pos.ts);
                qb.push(format!(" OR seq {cmp} ")).push_bind(pos.seq).push(")");
            }
        }
    }

    /// The rest of an archive page query after the SELECT list: `push_archive_from`, order
    /// and limit. The limit is one more than the page size, to tell whether anything lies
    /// beyond the page.
    fn push_archive_page<'a>(
        qb: &mut QueryBuilder<'a, $db>,
        t: &ArchiveTable,
        owner: &'a str,
        q: &'a ArchiveQuery,
        lo: Option<Position>,
        hi: Option<Position>,
        backward: bool,
    ) {
        Self::push_archive_from(qb, t, owner, q, lo, hi);
        qb.push(if backward {
            " ORDER BY ts DESC, seq DESC"
        } else {
            " ORDER BY ts, seq"
        });
        qb.push(" LIMIT ")
            .push_bind(limit_of(q.max).saturating_add(1));
    }

    /// Appends group-commit `rows` to archive `t`; their ids.
    async fn append_to(
        &self,
        t: &'static ArchiveTable,
        rows: Vec<crate::batch::ArchiveRow>,
    ) -> Result<Vec<String>, StoreError> {
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let ids = rows.iter().map(|r| r.id.clone()).collect();
        self.append_rows(t, rows).await?;
        Ok(ids)
    }

    /// The position of message `id` in `owner`'s archive `t`.
    async fn position_of(
        tx: &mut Tx,
        t: &ArchiveTable,
        owner: &str,
        id: &str,
    ) -> Result<Option<Position>, StoreError> {
        let row: Option<(i64, i64)> = sqlx::query_as(&format!(
            "SELECT ts, seq FROM {} WHERE {} = $1 AND id = $2",
            t.table, t.owner
        ))
        .bind(owner)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
        .db()?;
        Ok(row.map(|(ts, seq)| Position { ts, seq }))
    }

    /// The seq of message `id` in `owner`'s archive `t`.
    async fn seq_of(
        tx: &mut Tx,
        t: &ArchiveTable,
        owner: &str,
        id: &str,
    ) -> Result<Option<i64>, StoreError> {
        Ok(Self::position_of(tx, t, owner, id).await?.map(|p| p.seq))
    }

    /// [`ArchiveStore::archive_query`] on archive `t`.
    async fn query_archive(
        &self,
        t: &ArchiveTable,
        owner: &str,
        q: &ArchiveQuery,
    ) -> Result<ArchivePage, StoreError> {
        self.archive_barrier(t).await?;
        // One read transaction: cursors, page and count come from the same snapshot.
        let mut tx = self.read_tx().await?;
        let mut bounds = [None, None];
        for (slot, id) in bounds.iter_mut().zip([&q.after_id, &q.before_id]) {
            if let Some(id) = id {
                let pos = Self::position_of(&mut tx, t, owner, id).await?;
                *slot = Some(pos.ok_or(StoreError::NotFound)?);
            }
        }
        let [after, before] = bounds;
        let backward = before.is_some() || q.last_page;
        let (lo, hi) = Position::time_range(q.start_micros, q.end_micros);
        let mut qb = QueryBuilder::new(format!("SELECT {}", t.row_columns()));
        Self::push_archive_page(
            &mut qb,
            t,
            owner,
            q,
            tighter(lo, after, std::cmp::max),
            tighter(hi, before, std::cmp::min),
            backward,
        );
        let mut rows: Vec<ArchiveRow> = qb.build_query_as().fetch_all(&mut *tx).await.db()?;

        // RSM count: the filters without the paging cursors. Only when asked
        // for with max=0 (XEP-0059 §2.6): counting walks every matching row,
        // ~270 ms on a 10M archive, while a page costs under a millisecond.
        let count = if q.max == 0 {
            let mut cq = QueryBuilder::new("SELECT COUNT(*)");
            Self::push_archive_from(&mut cq, t, owner, q, lo, hi);
            let n: i64 = cq.build_query_scalar().fetch_one(&mut *tx).await.db()?;
            Some(to_u64(n, "archive count")?)
        } else {
            None
        };
        tx.commit().await.db()?;

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

    /// [`ArchiveStore::archive_get`] on archive `t`.
    async fn get_archived(
        &self,
        t: &ArchiveTable,
        owner: &str,
        id: &str,
    ) -> Result<Option<ArchivedMessage>, StoreError> {
        self.archive_barrier(t).await?;
        let row: Option<ArchiveRow> = sqlx::query_as(&format!(
            "SELECT {} FROM {} WHERE {} = $1 AND id = $2",
            t.row_columns(),
            t.table,
            t.owner
        ))
        .bind(owner)
        .bind(id)
        .fetch_optional(self.read_pool())
        .await
        .db()?;
        Ok(row.map(|r| to_archived(owner, r)))
    }
}

/// `pubsub#item_expire` seconds as stored (BIGINT; 0 = never).
fn expire_secs(secs: u64) -> i64 {
    i64::try_from(secs).unwrap_or(i64::MAX)
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
    .await
    .db()?;
    Ok(())
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
        .await
        .db()?;
    }
    Ok(())
}

#[async_trait::async_trait]
impl AccountStore for $store {
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
            Err(e) => return Err(db(e)),
        }
        put_credentials(&mut tx, user, creds).await?;
        tx.commit().await.db()?;
        Ok(())
    }

    async fn credentials(&self, user: &str) -> Result<Option<AccountCredentials>, StoreError> {
        let rows: Vec<CredRow> = sqlx::query_as(
            "SELECT hash, salt, iterations, stored_key, server_key \
             FROM scram_credentials WHERE username = $1",
        )
        .bind(user)
        .fetch_all(self.read_pool())
        .await
        .db()?;
        credentials_from_rows(user, rows)
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
        tx.commit().await.db()?;
        Ok(())
    }

    async fn delete_account(&self, user: &str) -> Result<(), StoreError> {
        self.account_going(user).await?;
        let mut tx = self.write_tx().await?;
        let version = Self::version_in(&mut tx, user, true)
            .await?
            .ok_or(StoreError::NotFound)?;
        // Owned rows go via ON DELETE CASCADE.
        sqlx::query("DELETE FROM accounts WHERE username = $1")
            .bind(user)
            .execute(&mut *tx)
            .await
            .db()?;
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
        .await
        .db()?;
        tx.commit().await.db()?;
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
        q.fetch_all(self.read_pool()).await.db()
    }

    async fn deleted_at(&self, user: &str) -> Result<Option<i64>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT deleted_at FROM account_tombstones WHERE username = $1")
                .bind(user)
                .fetch_optional(self.read_pool())
                .await
                .db()?,
        )
    }
}

#[async_trait::async_trait]
impl RosterStore for $store {
    async fn roster(&self, user: &str) -> Result<(u64, Vec<RosterItem>), StoreError> {
        // One read transaction so version and items come from the same snapshot.
        let mut tx = self.read_tx().await?;
        let Some(version) = Self::version_in(&mut tx, user, false).await? else {
            return Ok((0, Vec::new()));
        };
        let rows: Vec<ItemRow> = sqlx::query_as(
            "SELECT contact, name, subscription, ask, pending_in, approved \
             FROM roster_items WHERE username = $1 ORDER BY contact",
        )
        .bind(user)
        .fetch_all(&mut *tx)
        .await
        .db()?;
        let groups: Vec<(String, String)> = sqlx::query_as(
            "SELECT contact, group_name FROM roster_groups \
             WHERE username = $1 ORDER BY contact, position",
        )
        .bind(user)
        .fetch_all(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;

        let items = roster_from_rows(rows, groups)?;
        Ok((version, items))
    }

    async fn roster_item(
        &self,
        user: &str,
        contact: &str,
    ) -> Result<Option<RosterItem>, StoreError> {
        let mut tx = self.read_tx().await?;
        let item = Self::item_in(&mut tx, user, contact).await?;
        tx.commit().await.db()?;
        Ok(item)
    }

    async fn roster_version(&self, user: &str) -> Result<u64, StoreError> {
        let v: Option<i64> =
            sqlx::query_scalar("SELECT roster_version FROM accounts WHERE username = $1")
                .bind(user)
                .fetch_optional(self.read_pool())
                .await
                .db()?;
        v.map_or(Ok(0), to_version)
    }

    async fn put_roster_item(&self, user: &str, item: &RosterItem) -> Result<u64, StoreError> {
        let groups = dedup_groups(&item.groups);
        let mut tx = self.write_tx().await?;
        let current = Self::version_in(&mut tx, user, true)
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
        .await
        .db()?;
        sqlx::query("DELETE FROM roster_groups WHERE username = $1 AND contact = $2")
            .bind(user)
            .bind(&item.jid)
            .execute(&mut *tx)
            .await
            .db()?;
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
            .await
            .db()?;
        }
        let version = Self::bump_version(&mut tx, user).await?;
        tx.commit().await.db()?;
        Ok(version)
    }

    async fn remove_roster_item(&self, user: &str, contact: &str) -> Result<u64, StoreError> {
        let mut tx = self.write_tx().await?;
        // Groups go via ON DELETE CASCADE.
        let removed = sqlx::query("DELETE FROM roster_items WHERE username = $1 AND contact = $2")
            .bind(user)
            .bind(contact)
            .execute(&mut *tx)
            .await
            .db()?
            .rows_affected();
        if removed == 0 {
            return Err(StoreError::NotFound);
        }
        let version = Self::bump_version(&mut tx, user).await?;
        tx.commit().await.db()?;
        Ok(version)
    }
}

#[async_trait::async_trait]
impl ProfileStore for $store {
    async fn vcard(&self, user: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT xml FROM vcards WHERE username = $1")
                .bind(user)
                .fetch_optional(self.read_pool())
                .await
                .db()?,
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
        .await
        .db()?;
        tx.commit().await.db()?;
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
        .await
        .db()?;
        tx.commit().await.db()?;
        Ok(())
    }

    async fn last_activity(&self, user: &str) -> Result<Option<(i64, String)>, StoreError> {
        Ok(
            sqlx::query_as("SELECT at, status FROM last_activity WHERE username = $1")
                .bind(user)
                .fetch_optional(self.read_pool())
                .await
                .db()?,
        )
    }
}

#[async_trait::async_trait]
impl ArchiveStore for $store {
    async fn archive_append(&self, entries: &[NewArchiveEntry]) -> Result<Vec<String>, StoreError> {
        self.append_to(&USER_ARCHIVE, archive_rows(entries)).await
    }

    async fn archive_query(
        &self,
        owner: &str,
        q: &ArchiveQuery,
    ) -> Result<ArchivePage, StoreError> {
        self.query_archive(&USER_ARCHIVE, owner, q).await
    }

    async fn archive_get(
        &self,
        owner: &str,
        id: &str,
    ) -> Result<Option<ArchivedMessage>, StoreError> {
        self.get_archived(&USER_ARCHIVE, owner, id).await
    }

    async fn archive_import(&self, msgs: &[ArchivedMessage]) -> Result<(), StoreError> {
        self.archive_barrier(&USER_ARCHIVE).await?;
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
                Err(e) => return Err(db(e)),
            }
        }
        tx.commit().await.db()?;
        Ok(())
    }

    async fn archive_prune(
        &self,
        owner: Option<&str>,
        older_than_micros: i64,
    ) -> Result<u64, StoreError> {
        self.archive_barrier(&USER_ARCHIVE).await?;
        if let Some(owner) = owner {
            return self.prune_owner(owner, older_than_micros).await;
        }
        // Owner by owner, each through `(owner, ts)`: across owners the archive order
        // is not time order (a restore imports one account's history after another's;
        // the SQLite archive log folds owner by owner). One index probe per account
        // finds the owners with rows to go.
        let mut total = 0u64;
        let mut after = String::new();
        loop {
            let due: Vec<String> = sqlx::query_scalar(
                "SELECT username FROM accounts u WHERE username > $1 AND EXISTS \
                 (SELECT 1 FROM archive a WHERE a.owner = u.username AND a.ts < $2) \
                 ORDER BY username LIMIT $3",
            )
            .bind(&after)
            .bind(older_than_micros)
            .bind(PRUNE_CHUNK)
            .fetch_all(self.read_pool())
            .await
            .db()?;
            for owner in &due {
                total += self.prune_owner(owner, older_than_micros).await?;
            }
            match due.into_iter().last() {
                Some(last) => after = last,
                None => return Ok(total),
            }
        }
    }

    async fn mam_prefs(&self, user: &str) -> Result<MamPrefs, StoreError> {
        let mut tx = self.read_tx().await?;
        let default: Option<String> =
            sqlx::query_scalar("SELECT default_mode FROM mam_prefs WHERE username = $1")
                .bind(user)
                .fetch_optional(&mut *tx)
                .await
                .db()?;
        let Some(default) = default else {
            return Ok(MamPrefs::default());
        };
        let jids: Vec<(String, String)> = sqlx::query_as(
            "SELECT list, jid FROM mam_prefs_jids WHERE username = $1 ORDER BY list, jid",
        )
        .bind(user)
        .fetch_all(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;
        Ok(mam_prefs_from(default, jids))
    }

    async fn set_mam_prefs(&self, user: &str, prefs: &MamPrefs) -> Result<(), StoreError> {
        crate::sql::check_mam_default(prefs)?;
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
        .await
        .db()?;
        sqlx::query("DELETE FROM mam_prefs_jids WHERE username = $1")
            .bind(user)
            .execute(&mut *tx)
            .await
            .db()?;
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
                .await
                .db()?;
            }
        }
        tx.commit().await.db()?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl OfflineStore for $store {
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
        .await
        .db()?;
        to_offline(rows)
    }

    async fn offline_delete(&self, user: &str, seqs: &[u64]) -> Result<u64, StoreError> {
        if seqs.is_empty() {
            return Ok(0);
        }
        self.delete_offline(user, seqs).await
    }

    async fn offline_count(&self, user: &str) -> Result<u64, StoreError> {
        // Kept by triggers: no scan of the queue.
        let n: Option<i64> =
            sqlx::query_scalar("SELECT offline_queued FROM accounts WHERE username = $1")
                .bind(user)
                .fetch_optional(self.read_pool())
                .await
                .db()?;
        to_u64(n.unwrap_or(0), "offline count")
    }
}

#[async_trait::async_trait]
impl PepStore for $store {
    async fn pep_node(&self, owner: &str, node: &str) -> Result<Option<PepNodeConfig>, StoreError> {
        let row: Option<crate::sql::PepNodeRow> = sqlx::query_as(
            "SELECT access_model, max_items, publish_model, persist_items, \
                 send_last_published_item, notify_retract, notify_delete, item_expire \
             FROM pep_nodes WHERE owner = $1 AND node = $2",
        )
        .bind(owner)
        .bind(node)
        .fetch_optional(self.read_pool())
        .await
        .db()?;
        row.map(to_pep_config).transpose()
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
            "INSERT INTO pep_nodes (owner, node, access_model, publish_model, max_items, \
                 persist_items, send_last_published_item, notify_retract, notify_delete, \
                 item_expire) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (owner, node) DO UPDATE SET \
                 access_model = excluded.access_model, \
                 publish_model = excluded.publish_model, max_items = excluded.max_items, \
                 persist_items = excluded.persist_items, \
                 send_last_published_item = excluded.send_last_published_item, \
                 notify_retract = excluded.notify_retract, \
                 notify_delete = excluded.notify_delete, \
                 item_expire = excluded.item_expire",
        )
        .bind(owner)
        .bind(node)
        .bind(&cfg.access_model)
        .bind(&cfg.publish_model)
        .bind(i64::from(cfg.max_items))
        .bind(cfg.persist_items)
        .bind(&cfg.send_last_published_item)
        .bind(cfg.notify_retract)
        .bind(cfg.notify_delete)
        .bind(expire_secs(cfg.item_expire_secs))
        .execute(&mut *tx)
        .await
        .db()?;
        // A new item_expire applies to the items already there too.
        sqlx::query(
            "UPDATE pep_items SET expires = CASE WHEN $3 > 0 \
                 THEN published + $3 * 1000000 ELSE NULL END \
             WHERE owner = $1 AND node = $2",
        )
        .bind(owner)
        .bind(node)
        .bind(expire_secs(cfg.item_expire_secs))
        .execute(&mut *tx)
        .await
        .db()?;
        trim_pep_items(&mut tx, owner, node, i64::from(cfg.max_items)).await?;
        tx.commit().await.db()?;
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
        let (max_items, item_expire): (i64, i64) =
            sqlx::query_as(Self::NODE_FOR_PUBLISH)
                .bind(owner)
                .bind(node)
                .fetch_optional(&mut *tx)
                .await
                .db()?
                .ok_or(StoreError::NotFound)?;
        // Delete + insert (rather than update) so the item gets a new, highest seq.
        sqlx::query("DELETE FROM pep_items WHERE owner = $1 AND node = $2 AND item_id = $3")
            .bind(owner)
            .bind(node)
            .bind(item_id)
            .execute(&mut *tx)
            .await
            .db()?;
        let now = now_micros();
        let expires = (item_expire > 0).then(|| now.saturating_add(item_expire.saturating_mul(1_000_000)));
        sqlx::query(
            "INSERT INTO pep_items (owner, node, item_id, payload, published, expires) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(owner)
        .bind(node)
        .bind(item_id)
        .bind(payload)
        .bind(now)
        .bind(expires)
        .execute(&mut *tx)
        .await
        .db()?;
        trim_pep_items(&mut tx, owner, node, max_items).await?;
        tx.commit().await.db()?;
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
        // Expired but not swept yet: already gone for readers.
        qb.push(" AND (expires IS NULL OR expires > ").push_bind(now_micros()).push(")");
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
            qb.build_query_as().fetch_all(self.read_pool()).await.db()?;
        Ok(to_pep_items(rows))
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
                .execute(self.write_pool())
                .await
                .db()?
                .rows_affected();
        Ok(n > 0)
    }

    async fn pep_delete_node(&self, owner: &str, node: &str) -> Result<bool, StoreError> {
        // Items go via ON DELETE CASCADE.
        let n = sqlx::query("DELETE FROM pep_nodes WHERE owner = $1 AND node = $2")
            .bind(owner)
            .bind(node)
            .execute(self.write_pool())
            .await
            .db()?
            .rows_affected();
        Ok(n > 0)
    }

    async fn pep_nodes(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT node FROM pep_nodes WHERE owner = $1 ORDER BY node")
                .bind(owner)
                .fetch_all(self.read_pool())
                .await
                .db()?,
        )
    }

    async fn pep_expired(
        &self,
        now_micros: i64,
        limit: usize,
    ) -> Result<Vec<crate::PepExpiredItem>, StoreError> {
        let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(
            "SELECT owner, node, item_id, payload, published FROM pep_items \
             WHERE expires IS NOT NULL AND expires <= $1 ORDER BY expires LIMIT $2",
        )
        .bind(now_micros)
        .bind(limit_of(limit))
        .fetch_all(self.read_pool())
        .await
        .db()?;
        Ok(rows
            .into_iter()
            .map(|(owner, node, id, payload, published_micros)| crate::PepExpiredItem {
                owner,
                node,
                item: PepItem {
                    id,
                    payload,
                    published_micros,
                },
            })
            .collect())
    }

    async fn pep_affiliations(
        &self,
        owner: &str,
        node: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT jid, affiliation FROM pep_affiliations \
             WHERE owner = $1 AND node = $2 ORDER BY jid",
        )
        .bind(owner)
        .bind(node)
        .fetch_all(self.read_pool())
        .await
        .db()?)
    }

    async fn pep_set_affiliation(
        &self,
        owner: &str,
        node: &str,
        jid: &str,
        affiliation: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut tx = self.write_tx().await?;
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT max_items FROM pep_nodes WHERE owner = $1 AND node = $2")
                .bind(owner)
                .bind(node)
                .fetch_optional(&mut *tx)
                .await
                .db()?;
        if exists.is_none() {
            return Err(StoreError::NotFound);
        }
        match affiliation {
            Some(a) => sqlx::query(
                "INSERT INTO pep_affiliations (owner, node, jid, affiliation) \
                 VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (owner, node, jid) DO UPDATE SET affiliation = excluded.affiliation",
            )
            .bind(owner)
            .bind(node)
            .bind(jid)
            .bind(a),
            None => sqlx::query(
                "DELETE FROM pep_affiliations WHERE owner = $1 AND node = $2 AND jid = $3",
            )
            .bind(owner)
            .bind(node)
            .bind(jid),
        }
        .execute(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl BlockStore for $store {
    async fn blocklist(&self, user: &str) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT jid FROM blocklist WHERE username = $1 ORDER BY jid")
                .bind(user)
                .fetch_all(self.read_pool())
                .await
                .db()?,
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
            .await
            .db()?;
        }
        tx.commit().await.db()?;
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
                    .await
                    .db()?;
            }
            Some(jids) => {
                for jid in jids {
                    sqlx::query("DELETE FROM blocklist WHERE username = $1 AND jid = $2")
                        .bind(user)
                        .bind(jid)
                        .execute(&mut *tx)
                        .await
                        .db()?;
                }
            }
        }
        tx.commit().await.db()?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl KvStore for $store {
    async fn kv_get(
        &self,
        user: &str,
        namespace: &str,
        key: &str,
    ) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT value FROM kv WHERE username = $1 AND namespace = $2 AND key = $3",
        )
        .bind(user)
        .bind(namespace)
        .bind(key)
        .fetch_optional(self.read_pool())
        .await
        .db()
    }

    async fn kv_put(
        &self,
        user: &str,
        namespace: &str,
        key: &str,
        value: &str,
    ) -> Result<(), StoreError> {
        kv_check(namespace, key, Some(value))?;
        sqlx::query(
            "INSERT INTO kv (username, namespace, key, value, updated_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (username, namespace, key) DO UPDATE SET \
                 value = excluded.value, updated_at = excluded.updated_at",
        )
        .bind(user)
        .bind(namespace)
        .bind(key)
        .bind(value)
        .bind(now_unix())
        .execute(self.write_pool())
        .await
        .map_err(crate::sql::map_fk)?;
        Ok(())
    }

    async fn kv_delete(&self, user: &str, namespace: &str, key: &str) -> Result<bool, StoreError> {
        kv_check(namespace, key, None)?;
        let n = sqlx::query("DELETE FROM kv WHERE username = $1 AND namespace = $2 AND key = $3")
            .bind(user)
            .bind(namespace)
            .bind(key)
            .execute(self.write_pool())
            .await
            .db()?
            .rows_affected();
        Ok(n > 0)
    }
}

#[async_trait::async_trait]
impl RoomStore for $store {
    async fn room_put(&self, room: &str, doc: &str) -> Result<(), StoreError> {
        crate::sql::check_room_doc(doc)?;
        let now = now_unix();
        sqlx::query(
            "INSERT INTO rooms (jid, service, doc, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $4) \
             ON CONFLICT (jid) DO UPDATE SET \
                 doc = excluded.doc, updated_at = excluded.updated_at",
        )
        .bind(room)
        .bind(domain_of(room))
        .bind(doc)
        .bind(now)
        .execute(self.write_pool())
        .await
        .db()?;
        Ok(())
    }

    async fn room_get(&self, room: &str) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar("SELECT doc FROM rooms WHERE jid = $1")
            .bind(room)
            .fetch_optional(self.read_pool())
            .await
            .db()
    }

    async fn room_list(&self, service: &str) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar("SELECT jid FROM rooms WHERE service = $1 ORDER BY jid")
            .bind(service)
            .fetch_all(self.read_pool())
            .await
            .db()
    }

    async fn room_delete(&self, room: &str) -> Result<bool, StoreError> {
        // Archive and positions go via ON DELETE CASCADE.
        let n = sqlx::query("DELETE FROM rooms WHERE jid = $1")
            .bind(room)
            .execute(self.write_pool())
            .await
            .db()?
            .rows_affected();
        Ok(n > 0)
    }

    async fn room_archive_append(
        &self,
        room: &str,
        entries: &[(String, String)],
    ) -> Result<Vec<String>, StoreError> {
        if entries.is_empty() {
            // Nothing to write, but an unknown room is still refused.
            let found: Option<String> = sqlx::query_scalar("SELECT jid FROM rooms WHERE jid = $1")
                .bind(room)
                .fetch_optional(self.read_pool())
                .await
                .db()?;
            return found.map(|_| Vec::new()).ok_or(StoreError::NotFound);
        }
        let rows = entries
            .iter()
            .map(|(with, stanza)| crate::sql::archive_row(room, with, stanza, false))
            .collect();
        // An unknown room fails on the foreign key: NotFound.
        self.append_to(&ROOM_ARCHIVE, rows).await
    }

    async fn room_archive_query(
        &self,
        room: &str,
        q: &ArchiveQuery,
    ) -> Result<ArchivePage, StoreError> {
        self.query_archive(&ROOM_ARCHIVE, room, q).await
    }

    async fn room_archive_get(
        &self,
        room: &str,
        id: &str,
    ) -> Result<Option<ArchivedMessage>, StoreError> {
        self.get_archived(&ROOM_ARCHIVE, room, id).await
    }

    async fn room_archive_replace(
        &self,
        room: &str,
        id: &str,
        stanza: &str,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query("UPDATE room_archive SET stanza = $3 WHERE room = $1 AND id = $2")
            .bind(room)
            .bind(id)
            .bind(stanza)
            .execute(self.write_pool())
            .await
            .db()?
            .rows_affected();
        Ok(n > 0)
    }

    async fn room_set_position(
        &self,
        room: &str,
        member: &str,
        kind: &str,
        id: &str,
    ) -> Result<bool, StoreError> {
        crate::sql::check_position_kind(kind)?;
        let mut tx = self.write_tx().await?;
        let seq = Self::seq_of(&mut tx, &ROOM_ARCHIVE, room, id)
            .await?
            .ok_or(StoreError::NotFound)?;
        // Forward only: the update applies only to a position older (by seq) than `id`.
        let n = sqlx::query(
            "INSERT INTO room_positions (room, member, kind, seq) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (room, member, kind) DO UPDATE SET seq = excluded.seq \
             WHERE room_positions.seq < excluded.seq",
        )
        .bind(room)
        .bind(member)
        .bind(kind)
        .bind(seq)
        .execute(&mut *tx)
        .await
        // The message (or the room) deleted meanwhile.
        .map_err(crate::sql::map_fk)?
        .rows_affected();
        tx.commit().await.db()?;
        Ok(n > 0)
    }

    async fn room_positions(
        &self,
        room: &str,
        kind: &str,
    ) -> Result<Vec<(String, String)>, StoreError> {
        crate::sql::check_position_kind(kind)?;
        sqlx::query_as(
            "SELECT p.member, a.id FROM room_positions p JOIN room_archive a ON a.seq = p.seq \
             WHERE p.room = $1 AND p.kind = $2 ORDER BY p.member",
        )
        .bind(room)
        .bind(kind)
        .fetch_all(self.read_pool())
        .await
        .db()
    }

    async fn room_members_past(
        &self,
        room: &str,
        kind: &str,
        id: &str,
    ) -> Result<Vec<String>, StoreError> {
        crate::sql::check_position_kind(kind)?;
        let mut tx = self.read_tx().await?;
        let seq = Self::seq_of(&mut tx, &ROOM_ARCHIVE, room, id)
            .await?
            .ok_or(StoreError::NotFound)?;
        let members = sqlx::query_scalar(
            "SELECT member FROM room_positions \
             WHERE room = $1 AND kind = $2 AND seq >= $3 ORDER BY member",
        )
        .bind(room)
        .bind(kind)
        .bind(seq)
        .fetch_all(&mut *tx)
        .await
        .db()?;
        tx.commit().await.db()?;
        Ok(members)
    }
}

#[async_trait::async_trait]
impl UploadStore for $store {
    async fn upload_put(&self, upload: &Upload) -> Result<(), StoreError> {
        let size = upload_size(upload.size)?;
        let inserted = sqlx::query(
            "INSERT INTO uploads (slot, owner, sha256, size, content_type, filename, created) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&upload.slot)
        .bind(&upload.owner)
        .bind(&upload.sha256)
        .bind(size)
        .bind(&upload.content_type)
        .bind(&upload.filename)
        .bind(upload.created)
        .execute(self.write_pool())
        .await;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict),
            // An unknown owner fails on the foreign key: NotFound.
            Err(e) => Err(crate::sql::map_fk(e)),
        }
    }

    async fn upload_get(&self, slot: &str) -> Result<Option<Upload>, StoreError> {
        let row: Option<UploadRow> =
            sqlx::query_as(&format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE slot = $1"))
                .bind(slot)
                .fetch_optional(self.read_pool())
                .await
                .db()?;
        row.map(to_upload).transpose()
    }

    async fn upload_delete(&self, slot: &str) -> Result<bool, StoreError> {
        let n = sqlx::query("DELETE FROM uploads WHERE slot = $1")
            .bind(slot)
            .execute(self.write_pool())
            .await
            .db()?
            .rows_affected();
        Ok(n > 0)
    }

    async fn upload_usage(&self, owner: &str, since: i64) -> Result<(u64, u64), StoreError> {
        // SUM of BIGINT is NUMERIC on PostgreSQL: cast back.
        let (recent, total): (i64, i64) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(CASE WHEN created >= $2 THEN size ELSE 0 END), 0) \
                         AS BIGINT), \
                    CAST(COALESCE(SUM(size), 0) AS BIGINT) \
             FROM uploads WHERE owner = $1",
        )
        .bind(owner)
        .bind(since)
        .fetch_one(self.read_pool())
        .await
        .db()?;
        Ok((to_u64(recent, "upload usage")?, to_u64(total, "upload usage")?))
    }

    async fn upload_total(&self) -> Result<u64, StoreError> {
        let total: i64 =
            sqlx::query_scalar("SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM uploads")
                .fetch_one(self.read_pool())
                .await
                .db()?;
        to_u64(total, "upload total")
    }

    async fn uploads_of(&self, owner: &str) -> Result<Vec<Upload>, StoreError> {
        let rows: Vec<UploadRow> = sqlx::query_as(&format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE owner = $1 ORDER BY created, slot"
        ))
        .bind(owner)
        .fetch_all(self.read_pool())
        .await
        .db()?;
        to_uploads(rows)
    }

    async fn blob_referenced(&self, sha256: &str) -> Result<bool, StoreError> {
        let slot: Option<String> =
            sqlx::query_scalar("SELECT slot FROM uploads WHERE sha256 = $1 LIMIT 1")
                .bind(sha256)
                .fetch_optional(self.read_pool())
                .await
                .db()?;
        Ok(slot.is_some())
    }

    async fn uploads_before(&self, before: i64, limit: usize) -> Result<Vec<Upload>, StoreError> {
        let rows: Vec<UploadRow> = sqlx::query_as(&format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE created < $1 \
             ORDER BY created, slot LIMIT $2"
        ))
        .bind(before)
        .bind(limit_of(limit))
        .fetch_all(self.read_pool())
        .await
        .db()?;
        to_uploads(rows)
    }
}

/// Group commit: one INSERT of all `rows` into archive `t`, each with timestamp `ts`.
async fn insert_archive_rows(
    tx: &mut Tx,
    t: &ArchiveTable,
    rows: &[&crate::batch::ArchiveRow],
    ts: i64,
) -> Result<(), sqlx::Error> {
    let mut qb = QueryBuilder::<$db>::new(format!("INSERT INTO {} ", t.insert_columns()));
    qb.push_values(rows, |mut values, row| {
        values
            .push_bind(&row.owner)
            .push_bind(&row.id)
            .push_bind(&row.with)
            .push_bind(ts);
        if t.outgoing {
            values.push_bind(row.outgoing);
        }
        values.push_bind(&row.stanza);
    });
    qb.build().execute(&mut **tx).await.map(drop)
}

/// Group commit: one offline push, `None` when the queue is full.
async fn push_offline_row(
    tx: &mut Tx,
    msg: &crate::batch::OfflineRow<'_>,
    now: i64,
) -> Result<Option<i64>, sqlx::Error> {
    // The quota check is part of the insert, so it sees the requests earlier in the
    // same batch. The queue length is kept by triggers (migration 0003); an unknown
    // account reads as 0 so the insert fails on its foreign key.
    sqlx::query_scalar(
        "INSERT INTO offline_messages (username, stanza, archive_id, ts, ord) \
         SELECT $1, $2, $3, $4, $6 \
         WHERE COALESCE((SELECT offline_queued FROM accounts \
                         WHERE username = $1), 0) < $5 \
         RETURNING seq",
    )
    .bind(msg.user)
    .bind(msg.stanza)
    .bind(msg.archive_id)
    .bind(now)
    .bind(msg.limit)
    .bind(msg.ord)
    .fetch_optional(&mut **tx)
    .await
}
    };
}

pub(crate) use sql_store;
