-- Kabar on PostgreSQL, schema version 1: the same tables as the embedded
-- store's schema version 4. Every table that feeds /sync carries `pos`, a
-- position in the one stream.

-- The stream's committed head: one row, locked by each group commit while
-- it hands out positions and moved in the same transaction, so no reader
-- ever sees a position past a write still in flight.
CREATE TABLE stream_head (only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row), pos BIGINT NOT NULL);
INSERT INTO stream_head (pos) VALUES (0);

CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE signing_key (only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row), key BYTEA NOT NULL);

CREATE TABLE users (
    user_id       TEXT PRIMARY KEY,
    password_hash TEXT,
    deactivated   BOOLEAN NOT NULL DEFAULT FALSE,
    displayname   TEXT,
    avatar_url    TEXT,
    created_ms    BIGINT NOT NULL
);

CREATE TABLE devices (
    user_id      TEXT NOT NULL,
    device_id    TEXT NOT NULL,
    display_name TEXT,
    token_hash   TEXT UNIQUE,
    last_seen_ms BIGINT,
    last_seen_ip TEXT,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE uia_sessions (
    session_id TEXT PRIMARY KEY,
    request    TEXT NOT NULL,
    completed  TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX uia_sessions_by_age ON uia_sessions (created_ms);

CREATE TABLE rooms (
    room_id   TEXT PRIMARY KEY,
    version   TEXT NOT NULL,
    creator   TEXT NOT NULL,
    is_public BOOLEAN NOT NULL DEFAULT FALSE,
    join_rule TEXT
);

CREATE TABLE events (
    pos            BIGINT PRIMARY KEY,
    event_id       TEXT NOT NULL UNIQUE,
    room_id        TEXT NOT NULL,
    sender         TEXT NOT NULL,
    kind           TEXT NOT NULL,
    state_key      TEXT,
    json           TEXT NOT NULL,
    txn_device     TEXT,
    txn_id         TEXT,
    txn_scope      TEXT,
    relates_to     TEXT,
    rel_type       TEXT,
    redacted_by    TEXT,
    replaces_state TEXT,
    prev_sender    TEXT,
    prev_content   TEXT
);
-- Covers room timelines (and type-filtered ones) without touching the rows' JSON.
CREATE INDEX events_by_room ON events (room_id, pos, kind, sender);
CREATE INDEX events_by_relation ON events (relates_to, rel_type, pos) WHERE relates_to IS NOT NULL;
CREATE UNIQUE INDEX events_by_txn ON events (sender, txn_device, room_id, txn_scope, txn_id) WHERE txn_id IS NOT NULL;
CREATE INDEX events_by_replaced ON events (replaces_state) WHERE replaces_state IS NOT NULL;
CREATE INDEX events_state ON events (room_id, kind, state_key, pos) WHERE state_key IS NOT NULL;

CREATE TABLE current_state (
    room_id   TEXT NOT NULL,
    kind      TEXT NOT NULL,
    state_key TEXT NOT NULL,
    pos       BIGINT NOT NULL,
    PRIMARY KEY (room_id, kind, state_key)
);

CREATE TABLE memberships (
    user_id    TEXT NOT NULL,
    room_id    TEXT NOT NULL,
    membership TEXT NOT NULL,
    pos        BIGINT NOT NULL,
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
    pos     BIGINT NOT NULL,
    PRIMARY KEY (user_id, room_id, kind)
);
CREATE INDEX account_data_by_pos ON account_data (user_id, pos);

CREATE TABLE receipts (
    room_id      TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    receipt_type TEXT NOT NULL,
    thread_id    TEXT NOT NULL DEFAULT '',
    event_id     TEXT NOT NULL,
    ts_ms        BIGINT NOT NULL,
    pos          BIGINT NOT NULL,
    PRIMARY KEY (room_id, user_id, receipt_type, thread_id)
);
CREATE INDEX receipts_by_pos ON receipts (room_id, pos);

CREATE TABLE filters (user_id TEXT NOT NULL, filter_id BIGINT NOT NULL, json TEXT NOT NULL, PRIMARY KEY (user_id, filter_id));

CREATE TABLE media (
    media_id     TEXT PRIMARY KEY,
    content_type TEXT,
    filename     TEXT,
    sha256       TEXT NOT NULL,
    size         BIGINT NOT NULL,
    uploader     TEXT NOT NULL,
    created_ms   BIGINT NOT NULL
);

CREATE TABLE registration_tokens (
    token        TEXT PRIMARY KEY,
    uses_allowed BIGINT,
    completed    BIGINT NOT NULL DEFAULT 0,
    expiry_ms    BIGINT
);

CREATE TABLE device_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    json      TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id)
);

CREATE TABLE one_time_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    json      TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, key_id)
);
CREATE INDEX one_time_keys_by_algorithm ON one_time_keys (user_id, device_id, algorithm, key_id);

CREATE TABLE fallback_keys (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    algorithm TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    json      TEXT NOT NULL,
    used      BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, device_id, algorithm)
);

CREATE TABLE cross_signing_keys (
    user_id    TEXT NOT NULL,
    kind       TEXT NOT NULL,
    public_key TEXT NOT NULL,
    json       TEXT NOT NULL,
    PRIMARY KEY (user_id, kind)
);

CREATE TABLE key_signatures (
    target_user   TEXT NOT NULL,
    target_key    TEXT NOT NULL,
    signer        TEXT NOT NULL,
    signer_key_id TEXT NOT NULL,
    signature     TEXT NOT NULL,
    PRIMARY KEY (target_user, target_key, signer, signer_key_id)
);

CREATE TABLE device_list_changes (
    user_id TEXT PRIMARY KEY,
    pos     BIGINT NOT NULL
);
CREATE INDEX device_list_changes_by_pos ON device_list_changes (pos);

CREATE TABLE to_device (
    pos       BIGINT PRIMARY KEY,
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    sender    TEXT NOT NULL,
    kind      TEXT NOT NULL,
    content   TEXT NOT NULL
);
CREATE INDEX to_device_by_device ON to_device (user_id, device_id, pos);

CREATE TABLE to_device_txns (
    user_id   TEXT NOT NULL,
    device_id TEXT NOT NULL,
    kind      TEXT NOT NULL,
    txn_id    TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, kind, txn_id)
);

CREATE TABLE backup_versions (
    user_id   TEXT NOT NULL,
    version   BIGINT NOT NULL,
    algorithm TEXT NOT NULL,
    auth_data TEXT NOT NULL,
    etag      BIGINT NOT NULL DEFAULT 0,
    deleted   BOOLEAN NOT NULL DEFAULT FALSE,
    PRIMARY KEY (user_id, version)
);

CREATE TABLE backup_keys (
    user_id             TEXT NOT NULL,
    version             BIGINT NOT NULL,
    room_id             TEXT NOT NULL,
    session_id          TEXT NOT NULL,
    is_verified         BOOLEAN NOT NULL,
    first_message_index BIGINT NOT NULL,
    forwarded_count     BIGINT NOT NULL,
    json                TEXT NOT NULL,
    PRIMARY KEY (user_id, version, room_id, session_id)
);

-- Every change that is not an event, at its stream position.
CREATE TABLE stream_changes (
    id        BIGSERIAL PRIMARY KEY,
    pos       BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    user_id   TEXT,
    room_id   TEXT,
    device_id TEXT
);
CREATE INDEX stream_changes_by_pos ON stream_changes (pos);

-- Unauthenticated media was frozen when this database was created.
INSERT INTO meta (key, value) VALUES ('media_freeze_ms', (EXTRACT(EPOCH FROM now()) * 1000)::BIGINT::TEXT);
