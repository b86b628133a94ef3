-- The one row readiness probes rewrite (Store::writable): a real commit through the
-- writer, of a chosen size. After a failed write the probe writes about a batch's worth,
-- so a disk with room left for a page or two does not count as healed.
CREATE TABLE write_probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at INTEGER NOT NULL,
    pad BLOB NOT NULL
);
