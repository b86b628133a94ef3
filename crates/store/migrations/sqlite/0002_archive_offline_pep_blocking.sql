-- Message archive (XEP-0313), offline queue (XEP-0160), PEP (XEP-0163/0223) and
-- blocking (XEP-0191).
--
-- As in 0001, everything a user owns references accounts(username) with ON DELETE CASCADE
-- (directly or through its parent), so delete_account removes it in the same transaction.
-- Contact/peer JIDs are never foreign keys. Timestamps here are unix MICROseconds.

-- Message archive. `seq` is the internal order and the paging key: AUTOINCREMENT so it
-- only ever grows, even after the newest rows are deleted (PostgreSQL: an identity
-- column). `id` is the server-assigned stanza-id (XEP-0359) handed to clients: random, so
-- it reveals nothing and can't be guessed; clients only ever see `id`, the store maps it
-- back to `seq` to page. The writer keeps `ts` non-decreasing in `seq` order.
CREATE TABLE archive (
    seq      INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    owner    TEXT    NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    id       TEXT    NOT NULL,
    -- Bare JID of the other party.
    with_jid TEXT    NOT NULL,
    ts       INTEGER NOT NULL,
    outgoing INTEGER NOT NULL CHECK (outgoing IN (0, 1)),
    stanza   TEXT    NOT NULL
) STRICT;

-- Index: archive_get and resolving RSM after/before ids to `seq`; also keeps ids unique
-- per owner.
CREATE UNIQUE INDEX archive_owner_id_idx ON archive (owner, id);
-- Index: unfiltered paging (WHERE owner = ? [AND seq > / < ?] ORDER BY seq), COUNT(*) per
-- owner, and the cascade from accounts.
CREATE INDEX archive_owner_seq_idx ON archive (owner, seq);
-- Index: paging filtered by conversation partner (<with/>).
CREATE INDEX archive_owner_with_idx ON archive (owner, with_jid, seq);
-- Index: <start/>/<end/> filters and per-owner pruning by age.
CREATE INDEX archive_owner_ts_idx ON archive (owner, ts);

-- MAM preferences (XEP-0313 <prefs/>). No row means the default: 'always', empty lists.
CREATE TABLE mam_prefs (
    username     TEXT NOT NULL PRIMARY KEY REFERENCES accounts (username) ON DELETE CASCADE,
    default_mode TEXT NOT NULL CHECK (default_mode IN ('always', 'never', 'roster'))
) STRICT;

-- The <always/> and <never/> JID lists. The primary key (username first) serves reads and
-- the cascade.
CREATE TABLE mam_prefs_jids (
    username TEXT NOT NULL REFERENCES mam_prefs (username) ON DELETE CASCADE,
    list     TEXT NOT NULL CHECK (list IN ('always', 'never')),
    jid      TEXT NOT NULL,
    PRIMARY KEY (username, list, jid)
) STRICT, WITHOUT ROWID;

-- Offline messages (XEP-0160): a FIFO per user, deleted once delivered. `seq` as for
-- the archive (AUTOINCREMENT: a seq is never reused, so a late offline_delete can't hit a
-- newer message). `archive_id` is the stanza-id of the archived copy, if any.
CREATE TABLE offline_messages (
    seq        INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    username   TEXT    NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    stanza     TEXT    NOT NULL,
    archive_id TEXT,
    ts         INTEGER NOT NULL
) STRICT;

-- Index: fetch/delete/count per user in FIFO order, the quota check, and the cascade.
CREATE INDEX offline_user_seq_idx ON offline_messages (username, seq);

-- PEP nodes owned by an account. The primary key (owner first) serves lookups, listing
-- and the cascade.
CREATE TABLE pep_nodes (
    owner         TEXT    NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    node          TEXT    NOT NULL,
    access_model  TEXT    NOT NULL,
    publish_model TEXT    NOT NULL,
    max_items     INTEGER NOT NULL CHECK (max_items >= 0),
    PRIMARY KEY (owner, node)
) STRICT, WITHOUT ROWID;

-- Published items. `seq` orders items (newest = highest); re-publishing an id deletes and
-- re-inserts it so it becomes the newest.
CREATE TABLE pep_items (
    seq       INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    owner     TEXT    NOT NULL,
    node      TEXT    NOT NULL,
    item_id   TEXT    NOT NULL,
    payload   TEXT    NOT NULL,
    published INTEGER NOT NULL,
    FOREIGN KEY (owner, node) REFERENCES pep_nodes (owner, node) ON DELETE CASCADE
) STRICT;

-- Index: item lookup/upsert by id, and one item per id.
CREATE UNIQUE INDEX pep_items_id_idx ON pep_items (owner, node, item_id);
-- Index: items newest first, trimming to max_items, and the cascade from pep_nodes.
CREATE INDEX pep_items_order_idx ON pep_items (owner, node, seq);

-- Blocked JIDs (XEP-0191), stored as given (bare, full or domain JIDs). The primary key
-- (username first) serves reads and the cascade.
CREATE TABLE blocklist (
    username TEXT NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    jid      TEXT NOT NULL,
    PRIMARY KEY (username, jid)
) STRICT, WITHOUT ROWID;
