-- Multi-user chat rooms (XEP-0045, RoomStore). Rooms are not accounts: a room is keyed
-- by its bare JID, and nothing here references accounts. Timestamps: unix seconds in
-- rooms, unix microseconds in room_archive.

-- Each room's state as one document the MUC module owns (JSON, opaque to the store).
-- `service` is the domain part of `jid` (the MUC service), for listing its rooms.
CREATE TABLE rooms (
    jid        TEXT    NOT NULL PRIMARY KEY,
    service    TEXT    NOT NULL,
    doc        TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

-- Index: room_list by service, in JID order.
CREATE INDEX rooms_service_idx ON rooms (service, jid);

-- A room's archive: each message once per room. The same shape, ids and ordering as the
-- users' archive (0002): `seq` is the paging key and only grows, `id` the stanza-id
-- handed out, `ts` non-decreasing in `seq` order; every message is incoming, so there
-- is no `outgoing`. `with_jid` is the sender's bare real JID.
CREATE TABLE room_archive (
    seq      INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,
    room     TEXT    NOT NULL REFERENCES rooms (jid) ON DELETE CASCADE,
    id       TEXT    NOT NULL,
    with_jid TEXT    NOT NULL,
    ts       INTEGER NOT NULL,
    stanza   TEXT    NOT NULL
) STRICT;

-- The same indexes as the users' archive, for the same queries (see 0002).
CREATE UNIQUE INDEX room_archive_room_id_idx ON room_archive (room, id);
CREATE INDEX room_archive_room_seq_idx ON room_archive (room, seq);
CREATE INDEX room_archive_room_with_idx ON room_archive (room, with_jid, seq);
CREATE INDEX room_archive_room_ts_idx ON room_archive (room, ts);

-- Each member's positions in the room's archive (XEP-0333 received/displayed), as the
-- `seq` of the archived message: positions compare in archive order, never by id. The
-- primary key (room first) serves reads and the cascade from rooms.
CREATE TABLE room_positions (
    room   TEXT    NOT NULL REFERENCES rooms (jid) ON DELETE CASCADE,
    member TEXT    NOT NULL,
    kind   TEXT    NOT NULL CHECK (kind IN ('received', 'displayed')),
    seq    INTEGER NOT NULL REFERENCES room_archive (seq) ON DELETE CASCADE,
    PRIMARY KEY (room, member, kind)
) STRICT, WITHOUT ROWID;

-- Index: the cascade from room_archive (else every deleted message scans the positions).
CREATE INDEX room_positions_seq_idx ON room_positions (seq);
