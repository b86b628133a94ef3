-- PEP item expiry and node affiliations: the schema of migrations/sqlite
-- 0010_pep_expiry_affiliations.sql (see the comments there), with BIGINT columns.
ALTER TABLE pep_nodes ADD COLUMN item_expire BIGINT NOT NULL DEFAULT 0
    CHECK (item_expire >= 0);
ALTER TABLE pep_items ADD COLUMN expires BIGINT;
CREATE INDEX pep_items_expires_idx ON pep_items (expires) WHERE expires IS NOT NULL;

CREATE TABLE pep_affiliations (
    owner       TEXT NOT NULL,
    node        TEXT NOT NULL,
    jid         TEXT NOT NULL,
    affiliation TEXT NOT NULL,
    PRIMARY KEY (owner, node, jid),
    FOREIGN KEY (owner, node) REFERENCES pep_nodes (owner, node) ON DELETE CASCADE
);
