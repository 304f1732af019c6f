-- Schema version 3: what real clients and a conformance suite found missing.

-- Where each device was last seen from, for /devices.
ALTER TABLE devices ADD COLUMN last_seen_ip TEXT;

-- A transaction id is scoped to the device and the request path (the room,
-- the endpoint and its event type or target), not to the device alone: the
-- same id reused in another room or on /redact is a new request.
ALTER TABLE events ADD COLUMN txn_scope TEXT;
UPDATE events SET txn_scope = 'send/' || kind WHERE txn_id IS NOT NULL;
DROP INDEX events_by_txn;
CREATE UNIQUE INDEX events_by_txn ON events (sender, txn_device, room_id, txn_scope, txn_id) WHERE txn_id IS NOT NULL;

-- The state event a state event replaced, for unsigned.prev_content and
-- prev_sender; kept here so serving an event needs no second read.
ALTER TABLE events ADD COLUMN replaces_state TEXT;
ALTER TABLE events ADD COLUMN prev_sender TEXT;
ALTER TABLE events ADD COLUMN prev_content TEXT;
CREATE INDEX events_by_replaced ON events (replaces_state) WHERE replaces_state IS NOT NULL;
-- State at a point of the timeline (for members who left, and /context).
CREATE INDEX events_state ON events (room_id, kind, state_key, pos) WHERE state_key IS NOT NULL;

-- Rooms anyone may join, for the user directory.
ALTER TABLE rooms ADD COLUMN join_rule TEXT;
UPDATE rooms SET join_rule = (
    SELECT json_extract(e.json, '$.content.join_rule') FROM current_state s JOIN events e ON e.pos = s.pos
    WHERE s.room_id = rooms.room_id AND s.kind = 'm.room.join_rules' AND s.state_key = ''
);

-- Send-to-device transaction ids are scoped to the event type, as the path is.
CREATE TABLE to_device_txns_v3 (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    kind      TEXT NOT NULL,
    txn_id    TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, kind, txn_id)
);
INSERT INTO to_device_txns_v3 (user_id, device_id, kind, txn_id) SELECT user_id, device_id, '', txn_id FROM to_device_txns;
DROP TABLE to_device_txns;
ALTER TABLE to_device_txns_v3 RENAME TO to_device_txns;

-- Matrix 1.11 froze unauthenticated media: what was uploaded before this
-- server first ran this schema stays downloadable on the legacy paths.
INSERT OR IGNORE INTO meta (key, value) VALUES ('media_freeze_ms', CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER));
