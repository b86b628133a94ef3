-- How far the archive log (sqlite/journal.rs) has been folded into `archive`: the log
-- file generation and the byte offset after the last folded record. Updated in the same
-- transaction as the folded rows, so a restart replays exactly what is not here yet.
CREATE TABLE archive_journal (
    id  INTEGER NOT NULL PRIMARY KEY CHECK (id = 1),
    gen INTEGER NOT NULL,
    pos INTEGER NOT NULL
) STRICT;

INSERT INTO archive_journal (id, gen, pos) VALUES (1, 0, 16);
