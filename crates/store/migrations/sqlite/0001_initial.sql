-- natter initial schema (SQLite).
--
-- Users are keyed by their normalized bare JID ("local@domain"). Everything a user owns
-- references accounts(username) with ON DELETE CASCADE, so deleting the account row
-- removes all of it in the same transaction. Tables are STRICT so SQLite enforces the
-- declared column types like PostgreSQL will.

CREATE TABLE accounts (
    username       TEXT    NOT NULL PRIMARY KEY,
    -- Denormalized from username so per-domain listing can use an index.
    domain         TEXT    NOT NULL,
    created_at     INTEGER NOT NULL,
    -- XEP-0237 roster version: bumped on every roster change of this user.
    roster_version INTEGER NOT NULL DEFAULT 0 CHECK (roster_version >= 0)
) STRICT;

-- Index: list_accounts(Some(domain)); includes username so the ORDER BY needs no sort.
CREATE INDEX accounts_domain_idx ON accounts (domain, username);

-- One row per SCRAM hash so adding e.g. SHA-512 later needs no schema change.
-- The primary key (username first) also serves the cascade from accounts.
CREATE TABLE scram_credentials (
    username   TEXT    NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    hash       TEXT    NOT NULL CHECK (hash IN ('sha1', 'sha256')),
    salt       BLOB    NOT NULL,
    iterations INTEGER NOT NULL CHECK (iterations > 0),
    stored_key BLOB    NOT NULL,
    server_key BLOB    NOT NULL,
    PRIMARY KEY (username, hash)
) STRICT, WITHOUT ROWID;

-- Roster items (RFC 6121). `contact` is deliberately not a foreign key: contacts may be
-- remote or deleted users. The primary key (username first) serves both per-user roster
-- reads and the cascade from accounts.
CREATE TABLE roster_items (
    username     TEXT    NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    contact      TEXT    NOT NULL,
    name         TEXT,
    subscription TEXT    NOT NULL CHECK (subscription IN ('none', 'to', 'from', 'both')),
    ask          INTEGER NOT NULL DEFAULT 0 CHECK (ask IN (0, 1)),
    pending_in   INTEGER NOT NULL DEFAULT 0 CHECK (pending_in IN (0, 1)),
    approved     INTEGER NOT NULL DEFAULT 0 CHECK (approved IN (0, 1)),
    PRIMARY KEY (username, contact)
) STRICT, WITHOUT ROWID;

-- Group membership of a roster item; `position` keeps the order the client sent.
-- The primary key (username, contact first) serves per-user reads and the cascade.
CREATE TABLE roster_groups (
    username   TEXT    NOT NULL,
    contact    TEXT    NOT NULL,
    group_name TEXT    NOT NULL,
    position   INTEGER NOT NULL,
    PRIMARY KEY (username, contact, group_name),
    FOREIGN KEY (username, contact)
        REFERENCES roster_items (username, contact) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;

-- vCard-temp (XEP-0054), stored as the serialized <vCard/> element.
CREATE TABLE vcards (
    username   TEXT    NOT NULL PRIMARY KEY REFERENCES accounts (username) ON DELETE CASCADE,
    xml        TEXT    NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

-- Last activity (XEP-0012).
CREATE TABLE last_activity (
    username TEXT    NOT NULL PRIMARY KEY REFERENCES accounts (username) ON DELETE CASCADE,
    at       INTEGER NOT NULL,
    status   TEXT    NOT NULL
) STRICT;

-- Deleted accounts. Not a foreign key: the account row is gone. `roster_version` is the
-- last version the old account handed out, so a re-created account continues above it and
-- clients holding a cached roster of the old account never see a matching version.
CREATE TABLE account_tombstones (
    username       TEXT    NOT NULL PRIMARY KEY,
    deleted_at     INTEGER NOT NULL,
    roster_version INTEGER NOT NULL DEFAULT 0
) STRICT;
