//! Writing rows copied from another engine, for `kabar migrate`.

use std::collections::HashMap;

use kabar_store::{
    StoreError, StoreResult,
    copy::{Cell, Rows, ServerState, TABLES},
};
use sqlx::Row;

use crate::{
    PostgresStore,
    engine::{backend, corrupt},
};

impl PostgresStore {
    /// Whether the database holds nothing yet (a copy goes only into an empty one).
    pub async fn is_empty(&self) -> StoreResult<bool> {
        let row = sqlx::query(
            "SELECT (SELECT pos FROM stream_head) = 0 AND NOT EXISTS (SELECT 1 FROM users) AND NOT EXISTS (SELECT 1 FROM rooms)",
        )
        .fetch_one(&self.engine.pool)
        .await
        .map_err(backend)?;
        row.try_get(0).map_err(corrupt)
    }

    pub async fn count(&self, table: &str) -> StoreResult<u64> {
        if !TABLES.contains(&table) {
            return Err(StoreError::Backend(format!("unknown table {table}")));
        }
        let row = sqlx::query(&format!("SELECT COUNT(*) FROM {table}"))
            .fetch_one(&self.engine.pool)
            .await
            .map_err(backend)?;
        Ok(row.try_get::<i64, _>(0).map_err(corrupt)? as u64)
    }

    /// Inserts a chunk of rows in one transaction. Integers go into boolean
    /// columns as true for anything but 0 (the embedded store keeps flags as
    /// integers).
    pub async fn import(&self, rows: &Rows) -> StoreResult<()> {
        if !TABLES.contains(&rows.table.as_str()) {
            return Err(StoreError::Backend(format!("unknown table {}", rows.table)));
        }
        if rows.rows.is_empty() {
            return Ok(());
        }
        let types: HashMap<String, String> =
            sqlx::query("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = $1")
                .bind(&rows.table)
                .fetch_all(&self.engine.pool)
                .await
                .map_err(backend)?
                .iter()
                .map(|r| Ok((r.try_get(0).map_err(corrupt)?, r.try_get(1).map_err(corrupt)?)))
                .collect::<StoreResult<_>>()?;
        for c in &rows.columns {
            if !types.contains_key(c) {
                return Err(StoreError::Backend(format!("{}.{c} has no column in PostgreSQL", rows.table)));
            }
        }
        let placeholders: Vec<String> = (1..=rows.columns.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({})",
            rows.table,
            rows.columns.join(", "),
            placeholders.join(", ")
        );
        let mut tx = self.engine.pool.begin().await.map_err(backend)?;
        for row in &rows.rows {
            let mut q = sqlx::query(&sql);
            for (cell, column) in row.iter().zip(&rows.columns) {
                let boolean = types.get(column).is_some_and(|t| t == "boolean");
                q = match cell {
                    Cell::Null if boolean => q.bind(None::<bool>),
                    Cell::Null if types.get(column).is_some_and(|t| t == "bigint" || t == "integer") => q.bind(None::<i64>),
                    Cell::Null if types.get(column).is_some_and(|t| t == "bytea") => q.bind(None::<Vec<u8>>),
                    Cell::Null => q.bind(None::<String>),
                    Cell::Int(v) if boolean => q.bind(*v != 0),
                    Cell::Int(v) if types.get(column).is_some_and(|t| t == "text") => q.bind(v.to_string()),
                    Cell::Int(v) => q.bind(*v),
                    Cell::Real(v) => q.bind(*v),
                    Cell::Text(t) => q.bind(t.clone()),
                    Cell::Blob(b) => q.bind(b.clone()),
                };
            }
            q.execute(&mut *tx).await.map_err(backend)?;
        }
        tx.commit().await.map_err(backend)
    }

    /// Sets where the stream stands, the signing key and the media freeze
    /// time, once every row is in.
    pub async fn finish_import(&self, state: &ServerState) -> StoreResult<()> {
        let mut tx = self.engine.pool.begin().await.map_err(backend)?;
        sqlx::query("UPDATE stream_head SET pos = $1")
            .bind(state.stream_pos as i64)
            .execute(&mut *tx)
            .await
            .map_err(backend)?;
        if let Some(key) = &state.signing_key {
            sqlx::query("INSERT INTO signing_key (key) VALUES ($1) ON CONFLICT (only_row) DO UPDATE SET key = excluded.key")
                .bind(key)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        if let Some(ms) = state.media_freeze_ms {
            sqlx::query("UPDATE meta SET value = $1 WHERE key = 'media_freeze_ms'")
                .bind(ms.to_string())
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        tx.commit().await.map_err(backend)?;
        self.engine.saw_head(state.stream_pos);
        Ok(())
    }
}
