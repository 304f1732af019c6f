-- Version 2: media bytes in the database (`media.storage = "database"`),
-- so that nodes share uploads without a shared filesystem.
CREATE TABLE media_content (
    sha256 TEXT PRIMARY KEY,
    bytes  BYTEA NOT NULL
);
