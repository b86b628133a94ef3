-- Small per-user values for modules without tables of their own (KvStore; XEP-0049
-- private XML storage): (user, namespace, key) -> value, removed with the account.
-- The primary key (username first) serves lookups and the cascade.
CREATE TABLE kv (
    username   TEXT    NOT NULL REFERENCES accounts (username) ON DELETE CASCADE,
    namespace  TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (username, namespace, key)
) STRICT, WITHOUT ROWID;
