-- Schema version 4: the stream of committed changes, and state a client may
-- continue on another node.

-- Every change that is not an event, at its stream position (an event's row
-- in `events` is its record). Replayed by position so that another process
-- on the same database learns what changed.
CREATE TABLE stream_changes (
    pos       INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    user_id   TEXT,
    room_id   TEXT,
    device_id TEXT
);
CREATE INDEX stream_changes_by_pos ON stream_changes (pos);

-- User-interactive authentication sessions: the request each was started
-- for, and the stages completed so far.
CREATE TABLE uia_sessions (
    session_id TEXT PRIMARY KEY,
    request    TEXT NOT NULL,
    completed  TEXT NOT NULL,
    created_ms INTEGER NOT NULL
);
CREATE INDEX uia_sessions_by_age ON uia_sessions (created_ms);
