-- Archives are paged in (ts, seq) order, one index fewer per row.
--
-- Why: every archived message is written twice (sender's and recipient's copy), and each
-- row went into four indexes. Paging used `(owner, seq)`; time filters used `(owner, ts)`
-- to turn times into seqs first. SQLite ends every index with the rowid (here `seq`), so
-- `(owner, ts)` already orders rows by `(ts, seq)`: pages now walk it directly, with the
-- RSM cursors as `(ts, seq)` positions, and `(owner, seq)` goes. The `<with/>` index
-- becomes `(owner, with_jid, ts)` (also `(…, ts, seq)` by the rowid) for the same order.
--
-- The order is the same as before for every archive the server wrote (the writers keep
-- `ts` non-decreasing in an owner's seq order) and is chronological for any other, such as
-- an imported one. The owner prefix of `(owner, ts)` serves the account-deletion trigger
-- and per-owner counts as `(owner, seq)` did.

DROP INDEX archive_owner_seq_idx;
DROP INDEX archive_owner_with_idx;
CREATE INDEX archive_owner_with_idx ON archive (owner, with_jid, ts);

DROP INDEX room_archive_room_seq_idx;
DROP INDEX room_archive_room_with_idx;
CREATE INDEX room_archive_room_with_idx ON room_archive (room, with_jid, ts);
