-- Archives are paged in (ts, seq) order, one index fewer per row: migrations/sqlite
-- 0013_archive_time_order.sql (see the comments there). PostgreSQL indexes carry no
-- rowid, so `seq` is spelled out as the last column.

DROP INDEX archive_owner_seq_idx;
DROP INDEX archive_owner_with_idx;
DROP INDEX archive_owner_ts_idx;
CREATE INDEX archive_owner_ts_idx ON archive (owner, ts, seq);
CREATE INDEX archive_owner_with_idx ON archive (owner, with_jid, ts, seq);

DROP INDEX room_archive_room_seq_idx;
DROP INDEX room_archive_room_with_idx;
DROP INDEX room_archive_room_ts_idx;
CREATE INDEX room_archive_room_ts_idx ON room_archive (room, ts, seq);
CREATE INDEX room_archive_room_with_idx ON room_archive (room, with_jid, ts, seq);
