-- HTTP File Upload (XEP-0363, UploadStore): one row per slot whose bytes are stored.
-- The bytes themselves are blobs outside the database, content-addressed by `sha256`
-- (lowercase hex), so several slots may refer to one blob; a blob no row refers to is
-- garbage. Rows belong to the uploader's account and go with it (ON DELETE CASCADE);
-- their blobs are collected later. `size` in bytes, `created` in unix seconds.
CREATE TABLE uploads (
    slot         TEXT    NOT NULL PRIMARY KEY,
    owner        TEXT    NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    sha256       TEXT    NOT NULL,
    size         INTEGER NOT NULL CHECK (size >= 0),
    content_type TEXT    NOT NULL,
    filename     TEXT    NOT NULL,
    created      INTEGER NOT NULL
) STRICT;

-- Index: a user's uploads oldest first, their usage since a time, and the cascade from
-- accounts.
CREATE INDEX uploads_owner_created_idx ON uploads (owner, created);
-- Index: whether any slot refers to a blob (blob garbage collection).
CREATE INDEX uploads_sha256_idx ON uploads (sha256);
-- Index: the oldest uploads of all (expiry).
CREATE INDEX uploads_created_idx ON uploads (created);
