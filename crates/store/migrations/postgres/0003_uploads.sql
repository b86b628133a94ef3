-- HTTP File Upload (XEP-0363, UploadStore): the table of migrations/sqlite
-- 0009_uploads.sql (see the comments there), with BIGINT columns.

CREATE TABLE uploads (
    slot         TEXT   NOT NULL PRIMARY KEY,
    owner        TEXT   NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    sha256       TEXT   NOT NULL,
    size         BIGINT NOT NULL CHECK (size >= 0),
    content_type TEXT   NOT NULL,
    filename     TEXT   NOT NULL,
    created      BIGINT NOT NULL
);
CREATE INDEX uploads_owner_created_idx ON uploads (owner, created);
CREATE INDEX uploads_sha256_idx ON uploads (sha256);
CREATE INDEX uploads_created_idx ON uploads (created);
