//! Reading an embedded database table by table, for `kabar migrate`.

use std::path::Path;

use kabar_store::{
    StoreError, StoreResult,
    copy::{Cell, Rows, ServerState},
};
use rusqlite::{Connection, OpenFlags, types::ValueRef};

use crate::engine::{SCHEMA_VERSION, backend};

/// A read-only view of an embedded database that no server is using.
pub struct SqliteExport {
    conn: Connection,
}

impl SqliteExport {
    /// Opens the database at `path` read-only; it must be at this version's schema.
    pub fn open(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(backend)?;
        let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(backend)?;
        if version != SCHEMA_VERSION {
            return Err(StoreError::Backend(format!(
                "{} is at schema version {version}; start this Kabar on it once (which migrates it to {SCHEMA_VERSION}) before copying it",
                path.display()
            )));
        }
        Ok(Self { conn })
    }

    pub fn count(&self, table: &str) -> StoreResult<u64> {
        self.conn
            .query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get::<_, i64>(0))
            .map(|n| n as u64)
            .map_err(backend)
    }

    /// Up to `limit` rows of `table` after row id `after` (0: from the
    /// start), and the row id to continue after.
    pub fn read(&self, table: &str, after: i64, limit: usize) -> StoreResult<(Rows, i64)> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT rowid, * FROM {table} WHERE rowid > ?1 ORDER BY rowid LIMIT ?2"))
            .map_err(backend)?;
        let columns: Vec<String> = st.column_names().iter().skip(1).map(|c| c.to_string()).collect();
        let mut last = after;
        let mut rows = vec![];
        let mut q = st.query(rusqlite::params![after, limit as i64]).map_err(backend)?;
        while let Some(row) = q.next().map_err(backend)? {
            last = row.get(0).map_err(backend)?;
            let mut cells = Vec::with_capacity(columns.len());
            for i in 1..=columns.len() {
                cells.push(match row.get_ref(i).map_err(backend)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Int(v),
                    ValueRef::Real(v) => Cell::Real(v),
                    ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Cell::Blob(b.to_vec()),
                });
            }
            rows.push(cells);
        }
        Ok((
            Rows {
                table: table.to_owned(),
                columns,
                rows,
            },
            last,
        ))
    }

    pub fn server_state(&self) -> StoreResult<ServerState> {
        let meta = |key: &str| -> StoreResult<Option<ValueOwned>> {
            self.conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
                    Ok(match r.get_ref(0)? {
                        ValueRef::Integer(v) => ValueOwned::Int(v),
                        ValueRef::Text(t) => ValueOwned::Text(String::from_utf8_lossy(t).into_owned()),
                        ValueRef::Blob(b) => ValueOwned::Blob(b.to_vec()),
                        _ => ValueOwned::Text(String::new()),
                    })
                })
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    other => Err(backend(other)),
                })
        };
        let as_u64 = |v: Option<ValueOwned>| match v {
            Some(ValueOwned::Int(i)) => Some(i.max(0) as u64),
            Some(ValueOwned::Text(t)) => t.parse().ok(),
            _ => None,
        };
        Ok(ServerState {
            stream_pos: as_u64(meta("stream_pos")?).unwrap_or(0),
            signing_key: match meta("signing_key")? {
                Some(ValueOwned::Blob(b)) => Some(b),
                Some(ValueOwned::Text(t)) => Some(t.into_bytes()),
                _ => None,
            },
            media_freeze_ms: as_u64(meta("media_freeze_ms")?),
        })
    }
}

enum ValueOwned {
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}
