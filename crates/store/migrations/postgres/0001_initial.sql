-- natter schema (PostgreSQL): the SQLite schema of migrations/sqlite 0001-0006 in one
-- step, same tables, keys, cascades and indexes (see the comments there for why each
-- index exists). Users are keyed by their normalized bare JID; everything a user owns
-- references accounts(username) ON DELETE CASCADE. Timestamps: unix seconds in
-- accounts, vcards, last_activity, tombstones and kv; unix microseconds elsewhere.

CREATE TABLE accounts (
    username       TEXT   NOT NULL PRIMARY KEY,
    domain         TEXT   NOT NULL,
    created_at     BIGINT NOT NULL,
    roster_version BIGINT NOT NULL DEFAULT 0 CHECK (roster_version >= 0),
    -- Offline queue length, kept by the triggers below (one row read per quota check).
    offline_queued BIGINT NOT NULL DEFAULT 0 CHECK (offline_queued >= 0)
);
CREATE INDEX accounts_domain_idx ON accounts (domain, username);

CREATE TABLE scram_credentials (
    username   TEXT   NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    hash       TEXT   NOT NULL CHECK (hash IN ('sha1', 'sha256')),
    salt       BYTEA  NOT NULL,
    iterations BIGINT NOT NULL CHECK (iterations > 0),
    stored_key BYTEA  NOT NULL,
    server_key BYTEA  NOT NULL,
    PRIMARY KEY (username, hash)
);

CREATE TABLE roster_items (
    username     TEXT    NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    contact      TEXT    NOT NULL,
    name         TEXT,
    subscription TEXT    NOT NULL CHECK (subscription IN ('none', 'to', 'from', 'both')),
    ask          BOOLEAN NOT NULL DEFAULT FALSE,
    pending_in   BOOLEAN NOT NULL DEFAULT FALSE,
    approved     BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (username, contact)
);

CREATE TABLE roster_groups (
    username   TEXT   NOT NULL,
    contact    TEXT   NOT NULL,
    group_name TEXT   NOT NULL,
    position   BIGINT NOT NULL,
    PRIMARY KEY (username, contact, group_name),
    FOREIGN KEY (username, contact)
        REFERENCES roster_items (username, contact) ON DELETE CASCADE
);

CREATE TABLE vcards (
    username   TEXT   NOT NULL PRIMARY KEY REFERENCES accounts (username) ON DELETE CASCADE,
    xml        TEXT   NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE last_activity (
    username TEXT   NOT NULL PRIMARY KEY REFERENCES accounts (username) ON DELETE CASCADE,
    at       BIGINT NOT NULL,
    status   TEXT   NOT NULL
);

CREATE TABLE account_tombstones (
    username       TEXT   NOT NULL PRIMARY KEY,
    deleted_at     BIGINT NOT NULL,
    roster_version BIGINT NOT NULL DEFAULT 0
);

-- `seq` only grows (an identity column is never reused), the paging key.
CREATE TABLE archive (
    seq      BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner    TEXT    NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    id       TEXT    NOT NULL,
    with_jid TEXT    NOT NULL,
    ts       BIGINT  NOT NULL,
    outgoing BOOLEAN NOT NULL,
    stanza   TEXT    NOT NULL
);
CREATE UNIQUE INDEX archive_owner_id_idx ON archive (owner, id);
CREATE INDEX archive_owner_seq_idx ON archive (owner, seq);
CREATE INDEX archive_owner_with_idx ON archive (owner, with_jid, seq);
CREATE INDEX archive_owner_ts_idx ON archive (owner, ts);

CREATE TABLE mam_prefs (
    username     TEXT NOT NULL PRIMARY KEY REFERENCES accounts (username) ON DELETE CASCADE,
    default_mode TEXT NOT NULL CHECK (default_mode IN ('always', 'never', 'roster'))
);

CREATE TABLE mam_prefs_jids (
    username TEXT NOT NULL REFERENCES mam_prefs (username) ON DELETE CASCADE,
    list     TEXT NOT NULL CHECK (list IN ('always', 'never')),
    jid      TEXT NOT NULL,
    PRIMARY KEY (username, list, jid)
);

CREATE TABLE offline_messages (
    seq        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username   TEXT   NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    stanza     TEXT   NOT NULL,
    archive_id TEXT,
    ts         BIGINT NOT NULL,
    -- Acceptance order (see sqlite 0004).
    ord        BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX offline_user_ord_idx ON offline_messages (username, ord, seq);

CREATE FUNCTION offline_queued_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts SET offline_queued = offline_queued + 1 WHERE username = NEW.username;
    RETURN NULL;
END $$;
CREATE FUNCTION offline_queued_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE accounts SET offline_queued = offline_queued - 1 WHERE username = OLD.username;
    RETURN NULL;
END $$;
CREATE TRIGGER offline_queued_insert AFTER INSERT ON offline_messages
    FOR EACH ROW EXECUTE FUNCTION offline_queued_insert();
CREATE TRIGGER offline_queued_delete AFTER DELETE ON offline_messages
    FOR EACH ROW EXECUTE FUNCTION offline_queued_delete();

CREATE TABLE pep_nodes (
    owner         TEXT   NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    node          TEXT   NOT NULL,
    access_model  TEXT   NOT NULL,
    publish_model TEXT   NOT NULL,
    max_items     BIGINT NOT NULL CHECK (max_items >= 0),
    -- Node options (see sqlite 0007).
    persist_items            BOOLEAN NOT NULL DEFAULT TRUE,
    send_last_published_item TEXT    NOT NULL DEFAULT 'on_sub_and_presence',
    notify_retract           BOOLEAN NOT NULL DEFAULT TRUE,
    notify_delete            BOOLEAN NOT NULL DEFAULT TRUE,
    PRIMARY KEY (owner, node)
);

CREATE TABLE pep_items (
    seq       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner     TEXT   NOT NULL,
    node      TEXT   NOT NULL,
    item_id   TEXT   NOT NULL,
    payload   TEXT   NOT NULL,
    published BIGINT NOT NULL,
    FOREIGN KEY (owner, node) REFERENCES pep_nodes (owner, node) ON DELETE CASCADE
);
CREATE UNIQUE INDEX pep_items_id_idx ON pep_items (owner, node, item_id);
CREATE INDEX pep_items_order_idx ON pep_items (owner, node, seq);

CREATE TABLE blocklist (
    username TEXT NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    jid      TEXT NOT NULL,
    PRIMARY KEY (username, jid)
);

CREATE TABLE write_probe (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    at  BIGINT  NOT NULL,
    pad BYTEA   NOT NULL
);

CREATE TABLE kv (
    username   TEXT   NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    namespace  TEXT   NOT NULL,
    key        TEXT   NOT NULL,
    value      TEXT   NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (username, namespace, key)
);
