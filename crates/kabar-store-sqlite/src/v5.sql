-- Schema version 5: pushers (where a user's phone wants its push
-- notifications sent), one per user, app id and push key.
CREATE TABLE pushers (
    user_id TEXT NOT NULL,
    app_id  TEXT NOT NULL,
    pushkey TEXT NOT NULL,
    json    TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (user_id, app_id, pushkey)
);
CREATE INDEX pushers_by_key ON pushers (app_id, pushkey);
