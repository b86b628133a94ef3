-- `archive.owner` stops being a foreign key; a trigger on `accounts` keeps the cascade.
--
-- Why: the archive log's fold (sqlite/journal.rs) inserts its rows in multi-row INSERTs.
-- With the foreign key, each such INSERT may abort halfway, so SQLite copies every page
-- it changes into a statement journal first; switching `PRAGMA foreign_keys` off around
-- the fold avoided that but expired every prepared statement on the writer, so every
-- fold parsed its INSERTs again (a quarter of the writer's CPU). Without the foreign key
-- the fold's statements stay prepared and need no statement journal.
--
-- What keeps the archive consistent instead: the fold looks up the owners of its rows
-- in the same write transaction and drops rows whose account is gone; `archive_import`
-- checks the owner too; and deleting an account deletes its archive (the trigger below,
-- in the same transaction, as ON DELETE CASCADE did). PostgreSQL keeps the foreign key:
-- it has no archive log to fold.

CREATE TABLE archive_new (
    seq      INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    owner    TEXT    NOT NULL,
    id       TEXT    NOT NULL,
    with_jid TEXT    NOT NULL,
    ts       INTEGER NOT NULL,
    outgoing INTEGER NOT NULL CHECK (outgoing IN (0, 1)),
    stanza   TEXT    NOT NULL
) STRICT;

INSERT INTO archive_new (seq, owner, id, with_jid, ts, outgoing, stanza)
    SELECT seq, owner, id, with_jid, ts, outgoing, stanza FROM archive ORDER BY seq;

-- AUTOINCREMENT's high-water mark carries over: `seq` never reuses a deleted row's value.
DELETE FROM sqlite_sequence WHERE name = 'archive_new';
INSERT INTO sqlite_sequence (name, seq)
    SELECT 'archive_new', seq FROM sqlite_sequence WHERE name = 'archive';

DROP TABLE archive;
ALTER TABLE archive_new RENAME TO archive;

-- The same indexes as 0002 (see there for which query uses which).
CREATE UNIQUE INDEX archive_owner_id_idx ON archive (owner, id);
CREATE INDEX archive_owner_seq_idx ON archive (owner, seq);
CREATE INDEX archive_owner_with_idx ON archive (owner, with_jid, seq);
CREATE INDEX archive_owner_ts_idx ON archive (owner, ts);

CREATE TRIGGER archive_owner_deleted AFTER DELETE ON accounts
BEGIN
    DELETE FROM archive WHERE owner = old.username;
END;
