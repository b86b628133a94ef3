-- Offline queue in acceptance order (issue 9): `ord` is when the server accepted the
-- message for this user (unix µs, strictly increasing per server), not when it was
-- queued. A message a session was given and gave back (its connection died before it
-- was delivered) is queued again with its original `ord`, so it comes before messages
-- accepted after it, wherever in the table it lands.
ALTER TABLE offline_messages ADD COLUMN ord INTEGER NOT NULL DEFAULT 0;
UPDATE offline_messages SET ord = ts;
DROP INDEX offline_user_seq_idx;
CREATE INDEX offline_user_ord_idx ON offline_messages (username, ord, seq);
