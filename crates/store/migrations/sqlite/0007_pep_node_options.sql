-- PEP node options in columns of their own. Until now natter kept them, when not the
-- default, in publish_model as "publishers;persist_items=0;send_last_published_item=never;
-- notify_retract=0;notify_delete=0"; those values move to the columns and publish_model
-- keeps only what comes before the first ';'.
ALTER TABLE pep_nodes ADD COLUMN persist_items INTEGER NOT NULL DEFAULT 1
    CHECK (persist_items IN (0, 1));
ALTER TABLE pep_nodes ADD COLUMN send_last_published_item TEXT NOT NULL
    DEFAULT 'on_sub_and_presence';
ALTER TABLE pep_nodes ADD COLUMN notify_retract INTEGER NOT NULL DEFAULT 1
    CHECK (notify_retract IN (0, 1));
ALTER TABLE pep_nodes ADD COLUMN notify_delete INTEGER NOT NULL DEFAULT 1
    CHECK (notify_delete IN (0, 1));

UPDATE pep_nodes SET persist_items = 0
    WHERE instr(publish_model || ';', ';persist_items=0;') > 0;
UPDATE pep_nodes SET notify_retract = 0
    WHERE instr(publish_model || ';', ';notify_retract=0;') > 0;
UPDATE pep_nodes SET notify_delete = 0
    WHERE instr(publish_model || ';', ';notify_delete=0;') > 0;
-- The value runs from after "=" (26 characters from the ';') to the next ';' or the end.
UPDATE pep_nodes SET send_last_published_item = substr(
        substr(publish_model, instr(publish_model, ';send_last_published_item=') + 26),
        1,
        instr(substr(publish_model, instr(publish_model, ';send_last_published_item=') + 26)
              || ';', ';') - 1)
    WHERE instr(publish_model, ';send_last_published_item=') > 0;
UPDATE pep_nodes SET publish_model = substr(publish_model, 1, instr(publish_model, ';') - 1)
    WHERE instr(publish_model, ';') > 0;
