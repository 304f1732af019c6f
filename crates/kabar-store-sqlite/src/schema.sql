-- Kabar embedded store, schema version 1.
-- Every table that feeds /sync carries `pos`, a position in the one stream.
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);

CREATE TABLE users (
    user_id       TEXT PRIMARY KEY,
    password_hash TEXT,
    deactivated   INTEGER NOT NULL DEFAULT 0,
    displayname   TEXT,
    avatar_url    TEXT,
    created_ms    INTEGER NOT NULL
);

CREATE TABLE devices (
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    display_name TEXT,
    token_hash   TEXT UNIQUE,
    last_seen_ms INTEGER,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE rooms (
    room_id   TEXT PRIMARY KEY,
    version   TEXT NOT NULL,
    creator   TEXT NOT NULL,
    is_public INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE events (
    pos         INTEGER PRIMARY KEY,
    event_id    TEXT NOT NULL UNIQUE,
    room_id     TEXT NOT NULL,
    sender      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    state_key   TEXT,
    json        TEXT NOT NULL,
    txn_device  TEXT,
    txn_id      TEXT,
    relates_to  TEXT,
    rel_type    TEXT,
    redacted_by TEXT
);
-- Covers room timelines and unread counts without touching the table rows.
CREATE INDEX events_by_room ON events (room_id, pos, kind, sender);
CREATE INDEX events_members ON events (room_id, state_key, pos) WHERE kind = 'm.room.member';
CREATE INDEX events_by_relation ON events (relates_to, rel_type, pos) WHERE relates_to IS NOT NULL;
CREATE UNIQUE INDEX events_by_txn ON events (sender, txn_device, txn_id) WHERE txn_id IS NOT NULL;

CREATE TABLE current_state (
    room_id   TEXT NOT NULL,
    kind      TEXT NOT NULL,
    state_key TEXT NOT NULL,
    pos       INTEGER NOT NULL,
    PRIMARY KEY (room_id, kind, state_key)
);

CREATE TABLE memberships (
    user_id    TEXT NOT NULL,
    room_id    TEXT NOT NULL,
    membership TEXT NOT NULL,
    pos        INTEGER NOT NULL,
    event_id   TEXT NOT NULL,
    PRIMARY KEY (user_id, room_id)
);
CREATE INDEX memberships_by_room ON memberships (room_id, membership);

CREATE TABLE aliases (alias TEXT PRIMARY KEY, room_id TEXT NOT NULL, creator TEXT NOT NULL);
CREATE INDEX aliases_by_room ON aliases (room_id);

CREATE TABLE account_data (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL DEFAULT '',
    kind    TEXT NOT NULL,
    content TEXT NOT NULL,
    pos     INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, kind)
);
CREATE INDEX account_data_by_pos ON account_data (user_id, pos);

CREATE TABLE receipts (
    room_id      TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    receipt_type TEXT NOT NULL,
    thread_id    TEXT NOT NULL DEFAULT '',
    event_id     TEXT NOT NULL,
    ts_ms        INTEGER NOT NULL,
    pos          INTEGER NOT NULL,
    PRIMARY KEY (room_id, user_id, receipt_type, thread_id)
);
CREATE INDEX receipts_by_pos ON receipts (room_id, pos);

CREATE TABLE filters (user_id TEXT NOT NULL, filter_id INTEGER NOT NULL, json TEXT NOT NULL, PRIMARY KEY (user_id, filter_id));

CREATE TABLE media (
    media_id     TEXT PRIMARY KEY,
    content_type TEXT,
    filename     TEXT,
    sha256       TEXT NOT NULL,
    size         INTEGER NOT NULL,
    uploader     TEXT NOT NULL,
    created_ms   INTEGER NOT NULL
);

CREATE TABLE registration_tokens (
    token        TEXT PRIMARY KEY,
    uses_allowed INTEGER,
    completed    INTEGER NOT NULL DEFAULT 0,
    expiry_ms    INTEGER
);
