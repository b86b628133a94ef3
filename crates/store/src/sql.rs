//! What the SQL backends share: turning sqlx errors into [`StoreError`] (sqlx stays out of
//! the trait API), stanza-ids and small conversions.

use crate::{ArchivedMessage, RosterItem, StoreError, Subscription};

/// Any other database error becomes a backend-neutral message.
pub(crate) fn db(e: sqlx::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// `.db()?` on sqlx results in backend code.
pub(crate) trait DbResult<T> {
    fn db(self) -> Result<T, StoreError>;
}

impl<T> DbResult<T> for Result<T, sqlx::Error> {
    fn db(self) -> Result<T, StoreError> {
        self.map_err(db)
    }
}

/// A foreign-key violation means the owning account (or node) doesn't exist.
pub(crate) fn map_fk(e: sqlx::Error) -> StoreError {
    if e.as_database_error()
        .is_some_and(|d| d.is_foreign_key_violation())
    {
        StoreError::NotFound
    } else {
        db(e)
    }
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .is_some_and(|d| d.is_unique_violation())
}

pub(crate) fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Backend(format!("corrupt {what} {v}")))
}

pub(crate) fn to_version(v: i64) -> Result<u64, StoreError> {
    to_u64(v, "roster version")
}

/// `n` as an SQL LIMIT (saturating).
pub(crate) fn limit_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A random 128-bit stanza-id (XEP-0359), as 26 lowercase base32 characters.
pub(crate) fn new_stanza_id() -> String {
    // Time first, then 64 random bits, base32 in ASCII order: ids sort by creation
    // time, so a new row lands at the end of its owner's range of the (owner, id) index
    // (a random id dirtied a random index page per row, most of the archive's write
    // cost). Only the owner ever sees an id, and that owner already has the time.
    const ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";
    let micros = u64::try_from(crate::now_micros()).unwrap_or(0);
    let v = (u128::from(micros) << 64) | u128::from(rand::random::<u64>());
    let mut id = String::with_capacity(26);
    for i in (0..26).rev() {
        id.push(char::from(ALPHABET[((v >> (5 * i)) & 31) as usize]));
    }
    id
}

/// Archive entries as group-commit rows, each with a fresh stanza-id.
pub(crate) fn archive_rows(entries: &[crate::NewArchiveEntry]) -> Vec<crate::batch::ArchiveRow> {
    entries
        .iter()
        .map(|e| archive_row(&e.owner, &e.with, &e.stanza, e.outgoing))
        .collect()
}

/// One group-commit row with a fresh stanza-id.
pub(crate) fn archive_row(
    owner: &str,
    with: &str,
    stanza: &str,
    outgoing: bool,
) -> crate::batch::ArchiveRow {
    crate::batch::ArchiveRow {
        id: new_stanza_id(),
        owner: owner.to_owned(),
        with: with.to_owned(),
        stanza: stanza.to_owned(),
        outgoing,
    }
}

/// One of the two archives, which have the same shape and share every query: the users'
/// (`archive`, each owned by an account, messages both ways) and the rooms'
/// (`room_archive`, each owned by a room, every message incoming). Both are read in
/// `(ts, seq)` order (see [`Position`]); the writers assign both, `ts` non-decreasing in
/// each owner's `seq` order.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ArchiveTable {
    pub table: &'static str,
    /// The owner column.
    pub owner: &'static str,
    /// The unique `(owner, id)` index.
    pub id_index: &'static str,
    /// Whether rows have an `outgoing` column (else every message reads as incoming).
    pub outgoing: bool,
}

pub(crate) const USER_ARCHIVE: ArchiveTable = ArchiveTable {
    table: "archive",
    owner: "owner",
    id_index: "archive_owner_id_idx",
    outgoing: true,
};

pub(crate) const ROOM_ARCHIVE: ArchiveTable = ArchiveTable {
    table: "room_archive",
    owner: "room",
    id_index: "room_archive_room_id_idx",
    outgoing: false,
};

impl ArchiveTable {
    /// The SELECT list of an [`ArchiveRow`].
    pub fn row_columns(&self) -> &'static str {
        if self.outgoing {
            "id, with_jid, ts, outgoing, stanza"
        } else {
            "id, with_jid, ts, FALSE, stanza"
        }
    }

    /// The columns an INSERT of group-commit rows writes, in their order.
    pub fn insert_columns(&self) -> String {
        let outgoing = if self.outgoing { "outgoing, " } else { "" };
        format!(
            "{} ({}, id, with_jid, ts, {outgoing}stanza)",
            self.table, self.owner
        )
    }
}

/// The newest timestamp in either archive (NULL when both are empty), where the
/// writers start so timestamps never go back in an owner's archive order. The newest
/// rows of the user archive are one fold of the SQLite archive log, sorted by owner
/// rather than by time, so it looks at as many as a fold holds (`FOLD_MAX`).
pub(crate) const LAST_ARCHIVE_TS: &str = "SELECT MAX(ts) FROM ( \
     SELECT (SELECT MAX(ts) FROM (SELECT ts FROM archive ORDER BY seq DESC LIMIT 8192) AS a) AS ts \
     UNION ALL SELECT (SELECT ts FROM room_archive ORDER BY seq DESC LIMIT 1)) AS newest";

/// The kinds of member positions in a room's archive (XEP-0333 markers).
pub(crate) const ROOM_POSITION_KINDS: [&str; 2] = ["received", "displayed"];

/// Refuses a position kind outside [`ROOM_POSITION_KINDS`].
pub(crate) fn check_position_kind(kind: &str) -> Result<(), StoreError> {
    if ROOM_POSITION_KINDS.contains(&kind) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!("room position kind {kind:?}")))
    }
}

/// Refuses a room document over [`crate::ROOM_MAX_DOC_BYTES`].
pub(crate) fn check_room_doc(doc: &str) -> Result<(), StoreError> {
    if doc.len() > crate::ROOM_MAX_DOC_BYTES {
        Err(StoreError::QuotaExceeded)
    } else {
        Ok(())
    }
}

/// The SELECT list of an [`UploadRow`].
pub(crate) const UPLOAD_COLUMNS: &str =
    "slot, owner, sha256, size, content_type, filename, created";

/// (slot, owner, sha256, size, content_type, filename, created)
pub(crate) type UploadRow = (String, String, String, i64, String, String, i64);

pub(crate) fn to_upload(
    (slot, owner, sha256, size, content_type, filename, created): UploadRow,
) -> Result<crate::Upload, StoreError> {
    Ok(crate::Upload {
        slot,
        owner,
        sha256,
        size: to_u64(size, "upload size")?,
        content_type,
        filename,
        created,
    })
}

pub(crate) fn to_uploads(rows: Vec<UploadRow>) -> Result<Vec<crate::Upload>, StoreError> {
    rows.into_iter().map(to_upload).collect()
}

/// An upload's size as stored (BIGINT/INTEGER); [`StoreError::Invalid`] over `i64::MAX`.
pub(crate) fn upload_size(size: u64) -> Result<i64, StoreError> {
    i64::try_from(size).map_err(|_| StoreError::Invalid(format!("upload size {size}")))
}

/// (id, with_jid, ts, outgoing, stanza)
pub(crate) type ArchiveRow = (String, String, i64, bool, String);

pub(crate) fn to_archived(
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

/// (contact, name, subscription, ask, pending_in, approved)
pub(crate) type ItemRow = (String, Option<String>, String, bool, bool, bool);

pub(crate) fn row_to_item(
    (jid, name, sub, ask, pending_in, approved): ItemRow,
) -> Result<RosterItem, StoreError> {
    let subscription = sub
        .parse::<Subscription>()
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

/// A place in an archive's order. Archives are read in `(ts, seq)` order: the order of
/// `seq` for what the server wrote (its writers keep `ts` non-decreasing in an owner's
/// `seq` order), chronological for anything else, and the order of the `(owner, ts)`
/// index (SQLite ends each index with the rowid, `seq`; PostgreSQL's names it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Position {
    pub ts: i64,
    pub seq: i64,
}

impl Position {
    /// The exclusive bounds of the `<start/>`/`<end/>` filters: `ts >= start` is after
    /// `(start, 0)` (seqs start at 1), `ts <= end` before `(end, i64::MAX)`.
    pub fn time_range(start: Option<i64>, end: Option<i64>) -> (Option<Self>, Option<Self>) {
        (
            start.map(|ts| Position { ts, seq: 0 }),
            end.map(|ts| Position { ts, seq: i64::MAX }),
        )
    }

    /// Whether `seq` matters in this bound: a message's position, not a time filter's.
    pub fn is_message(&self) -> bool {
        self.seq > 0 && self.seq < i64::MAX
    }
}

/// The tighter of two optional bounds (`pick` = max for lower, min for upper bounds).
pub(crate) fn tighter<T>(a: Option<T>, b: Option<T>, pick: fn(T, T) -> T) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(pick(a, b)),
        (a, b) => a.or(b),
    }
}

/// Items of a roster read in contact order, with their groups `(contact, group)` in
/// position order attached.
pub(crate) fn roster_from_rows(
    rows: Vec<ItemRow>,
    groups: Vec<(String, String)>,
) -> Result<Vec<RosterItem>, StoreError> {
    let mut items = rows
        .into_iter()
        .map(row_to_item)
        .collect::<Result<Vec<_>, _>>()?;
    let index: std::collections::HashMap<String, usize> = items
        .iter()
        .enumerate()
        .map(|(i, it)| (it.jid.clone(), i))
        .collect();
    for (contact, group) in groups {
        if let Some(&i) = index.get(&contact) {
            items[i].groups.push(group);
        }
    }
    Ok(items)
}

/// Credentials rows `(hash, salt, iterations, stored_key, server_key)` of `user`.
pub(crate) type CredRow = (String, Vec<u8>, i64, Vec<u8>, Vec<u8>);

pub(crate) fn credentials_from_rows(
    user: &str,
    rows: Vec<CredRow>,
) -> Result<Option<crate::AccountCredentials>, StoreError> {
    if rows.is_empty() {
        return Ok(None);
    }
    let (mut sha1, mut sha256) = (None, None);
    for (hash, salt, iterations, stored_key, server_key) in rows {
        let iterations = u32::try_from(iterations).map_err(|_| {
            StoreError::Backend(format!("corrupt iteration count for {user}: {iterations}"))
        })?;
        let c = crate::StoredCredentials {
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
        (Some(sha1), Some(sha256)) => Ok(Some(crate::AccountCredentials { sha1, sha256 })),
        _ => Err(StoreError::Backend(format!(
            "incomplete credentials stored for {user}"
        ))),
    }
}

/// MAM preferences from the default mode and `(list, jid)` rows.
pub(crate) fn mam_prefs_from(default: String, jids: Vec<(String, String)>) -> crate::MamPrefs {
    let mut prefs = crate::MamPrefs {
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
    prefs
}

/// Checks a MAM default mode before writing it.
pub(crate) fn check_mam_default(prefs: &crate::MamPrefs) -> Result<(), StoreError> {
    if crate::MAM_DEFAULT_MODES.contains(&prefs.default.as_str()) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "MAM default mode {:?}",
            prefs.default
        )))
    }
}

/// (access_model, max_items, publish_model, persist_items, send_last_published_item,
/// notify_retract, notify_delete, item_expire)
pub(crate) type PepNodeRow = (String, i64, String, bool, String, bool, bool, i64);

pub(crate) fn to_pep_config(
    (
        access_model,
        max_items,
        publish_model,
        persist_items,
        send_last_published_item,
        notify_retract,
        notify_delete,
        item_expire,
    ): PepNodeRow,
) -> Result<crate::PepNodeConfig, StoreError> {
    Ok(crate::PepNodeConfig {
        access_model,
        max_items: u32::try_from(max_items)
            .map_err(|_| StoreError::Backend(format!("corrupt max_items {max_items}")))?,
        publish_model,
        persist_items,
        send_last_published_item,
        notify_retract,
        notify_delete,
        item_expire_secs: u64::try_from(item_expire)
            .map_err(|_| StoreError::Backend(format!("corrupt item_expire {item_expire}")))?,
    })
}

pub(crate) fn to_pep_items(rows: Vec<(String, String, i64)>) -> Vec<crate::PepItem> {
    rows.into_iter()
        .map(|(id, payload, published_micros)| crate::PepItem {
            id,
            payload,
            published_micros,
        })
        .collect()
}

/// Offline rows `(seq, stanza, archive_id, ts, ord)` as messages.
pub(crate) fn to_offline(
    rows: Vec<(i64, String, Option<String>, i64, i64)>,
) -> Result<Vec<crate::OfflineMessage>, StoreError> {
    rows.into_iter()
        .map(|(seq, stanza, archive_id, ts_micros, ord)| {
            Ok(crate::OfflineMessage {
                seq: to_u64(seq, "offline seq")?,
                stanza,
                archive_id,
                ts_micros,
                ord,
            })
        })
        .collect()
}
