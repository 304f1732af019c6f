//! Copying an installation from one engine to another (`kabar migrate`):
//! tables read as plain rows from the source engine and written by the
//! target engine, which both know the same tables by name.

/// One value of a row being copied.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// A chunk of one table's rows, with the columns they hold.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    pub table: String,
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Cell>>,
}

/// What is not a table row: where the stream stands, the server's signing
/// key, and when unauthenticated media was frozen.
#[derive(Debug, Clone, Default)]
pub struct ServerState {
    pub stream_pos: u64,
    pub signing_key: Option<Vec<u8>>,
    pub media_freeze_ms: Option<u64>,
}

/// Every table of the schema, in an order that copies parents before the
/// rows that name them.
pub const TABLES: &[&str] = &[
    "users",
    "devices",
    "uia_sessions",
    "rooms",
    "events",
    "current_state",
    "memberships",
    "aliases",
    "account_data",
    "receipts",
    "filters",
    "pushers",
    "media",
    "registration_tokens",
    "device_keys",
    "one_time_keys",
    "fallback_keys",
    "cross_signing_keys",
    "key_signatures",
    "device_list_changes",
    "to_device",
    "to_device_txns",
    "backup_versions",
    "backup_keys",
    "stream_changes",
];
