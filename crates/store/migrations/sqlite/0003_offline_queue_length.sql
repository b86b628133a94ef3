-- Offline queue length per account, kept by triggers in the same transaction as the
-- queue itself, so the quota check on every offline push reads one row instead of
-- counting the queue (which cost O(queue length) per message).
ALTER TABLE accounts ADD COLUMN offline_queued INTEGER NOT NULL DEFAULT 0
    CHECK (offline_queued >= 0);

UPDATE accounts SET offline_queued =
    (SELECT COUNT(*) FROM offline_messages o WHERE o.username = accounts.username);

CREATE TRIGGER offline_queued_insert AFTER INSERT ON offline_messages
BEGIN
    UPDATE accounts SET offline_queued = offline_queued + 1 WHERE username = NEW.username;
END;

CREATE TRIGGER offline_queued_delete AFTER DELETE ON offline_messages
BEGIN
    UPDATE accounts SET offline_queued = offline_queued - 1 WHERE username = OLD.username;
END;
