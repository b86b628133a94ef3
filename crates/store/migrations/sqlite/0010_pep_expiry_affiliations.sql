-- pubsub#item_expire (XEP-0060 §16.4.3) per node, in seconds (0 = never), and each item's
-- expiry instant (unix microseconds, NULL = never), fixed at publish and recomputed when
-- the node is reconfigured, so the expiry sweep reads only what is due, by index.
ALTER TABLE pep_nodes ADD COLUMN item_expire INTEGER NOT NULL DEFAULT 0
    CHECK (item_expire >= 0);
ALTER TABLE pep_items ADD COLUMN expires INTEGER;
CREATE INDEX pep_items_expires_idx ON pep_items (expires) WHERE expires IS NOT NULL;

-- Affiliations (XEP-0060 §8.9) of a node: who a whitelist node lets read. Bare JIDs as
-- given by the owner; the primary key (owner, node first) serves reads and the cascade.
CREATE TABLE pep_affiliations (
    owner       TEXT NOT NULL,
    node        TEXT NOT NULL,
    jid         TEXT NOT NULL,
    affiliation TEXT NOT NULL,
    PRIMARY KEY (owner, node, jid),
    FOREIGN KEY (owner, node) REFERENCES pep_nodes (owner, node) ON DELETE CASCADE
) STRICT, WITHOUT ROWID;
