-- Multi-user chat rooms (XEP-0045, RoomStore): the tables of migrations/sqlite
-- 0008_rooms.sql (see the comments there), with BIGINT columns.

CREATE TABLE rooms (
    jid        TEXT   NOT NULL PRIMARY KEY,
    service    TEXT   NOT NULL,
    doc        TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX rooms_service_idx ON rooms (service, jid);

CREATE TABLE room_archive (
    seq      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    room     TEXT   NOT NULL REFERENCES rooms (jid) ON DELETE CASCADE,
    id       TEXT   NOT NULL,
    with_jid TEXT   NOT NULL,
    ts       BIGINT NOT NULL,
    stanza   TEXT   NOT NULL
);
CREATE UNIQUE INDEX room_archive_room_id_idx ON room_archive (room, id);
CREATE INDEX room_archive_room_seq_idx ON room_archive (room, seq);
CREATE INDEX room_archive_room_with_idx ON room_archive (room, with_jid, seq);
CREATE INDEX room_archive_room_ts_idx ON room_archive (room, ts);

CREATE TABLE room_positions (
    room   TEXT   NOT NULL REFERENCES rooms (jid) ON DELETE CASCADE,
    member TEXT   NOT NULL,
    kind   TEXT   NOT NULL CHECK (kind IN ('received', 'displayed')),
    seq    BIGINT NOT NULL REFERENCES room_archive (seq) ON DELETE CASCADE,
    PRIMARY KEY (room, member, kind)
);
CREATE INDEX room_positions_seq_idx ON room_positions (seq);
