//! The PostgreSQL storage engine, for operators who run PostgreSQL already
//! and for several Kabar processes on one database.
//!
//! Reads go through a connection pool (sqlx, which prepares each statement
//! once per connection and reuses it); writes go through one connection per
//! process with group commit (`engine.rs`). The schema is `src/schema.sql`
//! plus one migration per later version, applied in order at start, under
//! an advisory lock, with the version in `kabar_schema`.

mod e2ee;
mod engine;
mod import;
mod rooms;
pub mod test_cluster;

use std::{sync::Arc, time::Instant};

use async_trait::async_trait;
use engine::{Engine, backend, corrupt, db_error};
use kabar_domain::Pdu;
use kabar_store::*;
use ruma::{OwnedEventId, OwnedRoomId, UserId};
use sqlx::{Row, postgres::PgRow};

/// The PostgreSQL implementation of [`Store`].
#[derive(Clone)]
pub struct PostgresStore {
    engine: Arc<Engine>,
}

impl PostgresStore {
    /// Connects to the database at `url` (a `postgres://` URL), migrating
    /// its schema to this version. `pool_size` bounds the reading connections.
    pub async fn connect(url: &str, pool_size: u32) -> StoreResult<Self> {
        Self::connect_observed(url, pool_size, None).await
    }

    /// Connects, telling `observer` how long every read and write takes.
    pub async fn connect_observed(url: &str, pool_size: u32, observer: Option<Arc<dyn StoreObserver>>) -> StoreResult<Self> {
        Ok(Self {
            engine: Arc::new(Engine::connect(url, pool_size, observer).await?),
        })
    }

    /// Runs a read on the pool, timed for the observer.
    async fn read<T>(&self, read: impl Future<Output = Result<T, sqlx::Error>>) -> StoreResult<T> {
        let started = Instant::now();
        let out = read.await.map_err(backend);
        self.engine.observe(StoreOp::Read, started);
        out
    }
}

fn parse<T: TryFrom<String>>(s: String) -> StoreResult<T>
where
    T::Error: std::fmt::Display,
{
    T::try_from(s).map_err(corrupt)
}

fn get<'r, T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(row: &'r PgRow, i: usize) -> StoreResult<T> {
    row.try_get(i).map_err(corrupt)
}

fn pos(p: StreamPos) -> i64 {
    p.min(i64::MAX as u64) as i64
}

/// The columns [`event_from_row`] reads, in its order; prefixed with `e.`
/// so a query may join other tables.
const EVENT_COLUMNS: &str = "e.pos, e.event_id, e.room_id, e.json, e.txn_device, e.txn_id, e.redacted_by, e.txn_scope, e.replaces_state, e.prev_sender, e.prev_content";

fn event_from_row(row: &PgRow) -> StoreResult<StoredEvent> {
    let event_id: OwnedEventId = parse(get(row, 1)?)?;
    let room_id: OwnedRoomId = parse(get(row, 2)?)?;
    let json: String = get(row, 3)?;
    let txn_device: Option<String> = get(row, 4)?;
    let txn_id: Option<String> = get(row, 5)?;
    let redacted_by: Option<String> = get(row, 6)?;
    let txn_scope: Option<String> = get(row, 7)?;
    let replaces: Option<String> = get(row, 8)?;
    let prev_sender: Option<String> = get(row, 9)?;
    let prev_content: Option<String> = get(row, 10)?;
    let pdu = Pdu::from_stored(event_id, room_id, &json).map_err(corrupt)?;
    let prev = match (replaces, prev_sender, prev_content) {
        (Some(event_id), Some(sender), Some(content)) => Some(PrevState {
            event_id: parse(event_id)?,
            sender: parse(sender)?,
            content,
        }),
        _ => None,
    };
    Ok(StoredEvent {
        pos: get::<i64>(row, 0)? as u64,
        pdu,
        txn: txn_device.zip(txn_id).map(|(device_id, txn_id)| TxnRef {
            device_id,
            txn_id,
            scope: txn_scope.unwrap_or_default(),
        }),
        redacted_by: redacted_by.map(parse).transpose()?,
        prev,
    })
}

fn events_from_rows(rows: Vec<PgRow>) -> StoreResult<Vec<StoredEvent>> {
    rows.iter().map(event_from_row).collect()
}

const USER_COLUMNS: &str = "user_id, password_hash, deactivated, displayname, avatar_url";

fn user_from_row(row: &PgRow) -> StoreResult<UserRecord> {
    Ok(UserRecord {
        user_id: parse(get(row, 0)?)?,
        password_hash: get(row, 1)?,
        deactivated: get(row, 2)?,
        displayname: get(row, 3)?,
        avatar_url: get(row, 4)?,
    })
}

fn change_from_row(row: &PgRow) -> StoreResult<StreamUpdate> {
    let kind: String = get(row, 1)?;
    Ok(StreamUpdate {
        pos: get::<i64>(row, 0)? as StreamPos,
        change: Change::from_record(&kind, get(row, 2)?, get(row, 3)?, get(row, 4)?).map_err(corrupt)?,
    })
}

#[async_trait]
impl StreamStore for PostgresStore {
    fn current_position(&self) -> StreamPos {
        self.engine.committed()
    }

    async fn committed_position(&self) -> StoreResult<StreamPos> {
        let row = self
            .read(sqlx::query("SELECT pos FROM stream_head").fetch_one(&self.engine.pool))
            .await?;
        let head = get::<i64>(&row, 0)? as StreamPos;
        self.engine.saw_head(head);
        Ok(head)
    }

    async fn updates_after(&self, after: StreamPos, limit: usize) -> StoreResult<CommittedBatch> {
        // The head first: every position up to it is committed, so the rows
        // read next cannot have a gap a write in flight would fill later.
        let head = self.committed_position().await?;
        let limit = limit.clamp(1, 10_000);
        if after >= head {
            return Ok(CommittedBatch {
                after,
                head: after,
                updates: vec![],
            });
        }
        let events = self
            .read(
                sqlx::query(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events e WHERE pos > $1 AND pos <= $2 ORDER BY pos LIMIT $3"
                ))
                .bind(pos(after))
                .bind(pos(head))
                .bind(limit as i64)
                .fetch_all(&self.engine.pool),
            )
            .await?;
        let events = events_from_rows(events)?;
        let changes = self
            .read(
                sqlx::query(
                    "SELECT pos, kind, user_id, room_id, device_id FROM stream_changes WHERE pos > $1 AND pos <= $2 ORDER BY pos, id LIMIT $3",
                )
                .bind(pos(after))
                .bind(pos(head))
                .bind(limit as i64)
                .fetch_all(&self.engine.pool),
            )
            .await?;
        let changes: Vec<StreamUpdate> = changes.iter().map(change_from_row).collect::<StoreResult<_>>()?;
        Ok(replay_batch(after, head, limit, events, changes))
    }

    fn set_commit_listener(&self, listener: Arc<dyn CommitListener>) {
        self.engine.set_listener(listener);
    }
}

#[async_trait]
impl AccountStore for PostgresStore {
    async fn create_user(&self, user: NewUser) -> StoreResult<()> {
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO users (user_id, password_hash, created_ms) VALUES ($1, $2, $3)")
                        .bind(user.user_id.as_str())
                        .bind(user.password_hash)
                        .bind(user.created_ms as i64)
                        .execute(&mut *c)
                        .await
                        .map_err(db_error("user id taken"))?;
                    Ok(())
                })
            })
            .await
    }

    async fn user(&self, user_id: &UserId) -> StoreResult<Option<UserRecord>> {
        let row = self
            .read(
                sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE user_id = $1"))
                    .bind(user_id.as_str())
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.as_ref().map(user_from_row).transpose()
    }

    async fn set_password_hash(&self, user_id: &UserId, hash: &str) -> StoreResult<()> {
        let (id, hash) = (user_id.to_string(), hash.to_owned());
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    sqlx::query("UPDATE users SET password_hash = $2 WHERE user_id = $1")
                        .bind(id)
                        .bind(hash)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    Ok(())
                })
            })
            .await
    }

    async fn deactivate_user(&self, user_id: &UserId) -> StoreResult<DevicesRemoved> {
        let id = user_id.to_string();
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    sqlx::query("UPDATE users SET deactivated = TRUE, password_hash = NULL WHERE user_id = $1")
                        .bind(&id)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    let devices = e2ee::device_ids_except(c, &id, None).await?;
                    e2ee::remove_devices(c, positions, &id, &devices).await
                })
            })
            .await
    }

    async fn set_profile(&self, user_id: &UserId, field: ProfileField, value: Option<&str>) -> StoreResult<()> {
        let (id, value) = (user_id.to_string(), value.map(str::to_owned));
        let sql = match field {
            ProfileField::DisplayName => "UPDATE users SET displayname = $2 WHERE user_id = $1",
            ProfileField::AvatarUrl => "UPDATE users SET avatar_url = $2 WHERE user_id = $1",
        };
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    sqlx::query(sql).bind(id).bind(value).execute(&mut *c).await.map_err(backend)?;
                    Ok(())
                })
            })
            .await
    }

    async fn search_users(&self, term: &str, limit: usize, searcher: Option<&UserId>) -> StoreResult<Vec<UserRecord>> {
        let pattern = format!(
            "%{}%",
            term.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
        );
        let rows = self
            .read(
                sqlx::query(&format!(
                    "SELECT {USER_COLUMNS} FROM users u
                     WHERE NOT deactivated AND (lower(user_id) LIKE $1 ESCAPE '\\' OR lower(displayname) LIKE $1 ESCAPE '\\')
                     AND ($3::TEXT IS NULL OR u.user_id = $3
                          OR EXISTS (SELECT 1 FROM memberships mine JOIN memberships theirs ON theirs.room_id = mine.room_id
                                     WHERE mine.user_id = $3 AND mine.membership = 'join'
                                       AND theirs.user_id = u.user_id AND theirs.membership = 'join')
                          OR EXISTS (SELECT 1 FROM memberships m JOIN rooms r ON r.room_id = m.room_id
                                     WHERE m.user_id = u.user_id AND m.membership = 'join' AND (r.join_rule = 'public' OR r.is_public)))
                     ORDER BY user_id LIMIT $2"
                ))
                .bind(pattern)
                .bind(limit.min(10_000) as i64)
                .bind(searcher.map(|s| s.to_string()))
                .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter().map(user_from_row).collect()
    }

    async fn upsert_device(&self, d: NewDevice) -> StoreResult<StreamPos> {
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    let existed = sqlx::query("SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $2")
                        .bind(d.user_id.as_str())
                        .bind(&d.device_id)
                        .fetch_optional(&mut *c)
                        .await
                        .map_err(backend)?
                        .is_some();
                    sqlx::query(
                        "INSERT INTO devices (user_id, device_id, display_name, token_hash, last_seen_ms, last_seen_ip) VALUES ($1, $2, $3, $4, $5, $6)
                         ON CONFLICT (user_id, device_id) DO UPDATE SET token_hash = excluded.token_hash,
                            display_name = COALESCE(excluded.display_name, devices.display_name), last_seen_ms = excluded.last_seen_ms,
                            last_seen_ip = COALESCE(excluded.last_seen_ip, devices.last_seen_ip)",
                    )
                    .bind(d.user_id.as_str())
                    .bind(&d.device_id)
                    .bind(&d.display_name)
                    .bind(&d.token_hash)
                    .bind(d.now_ms as i64)
                    .bind(&d.ip)
                    .execute(&mut *c)
                    .await
                    .map_err(db_error("token exists"))?;
                    let pos = positions.allocate();
                    if !existed {
                        e2ee::record_list_change_at(c, positions, d.user_id.as_str(), pos).await?;
                    }
                    positions.change(c, pos, Change::Sessions { user_id: d.user_id }).await?;
                    Ok(pos)
                })
            })
            .await
    }

    async fn session_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<Session>> {
        let row = self
            .read(
                sqlx::query("SELECT user_id, device_id FROM devices WHERE token_hash = $1")
                    .bind(token_hash)
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.map(|r| {
            Ok(Session {
                user_id: parse(get(&r, 0)?)?,
                device_id: get(&r, 1)?,
            })
        })
        .transpose()
    }

    async fn devices(&self, user_id: &UserId) -> StoreResult<Vec<DeviceRecord>> {
        let rows = self
            .read(
                sqlx::query(
                    "SELECT device_id, display_name, last_seen_ms, last_seen_ip FROM devices WHERE user_id = $1 ORDER BY device_id",
                )
                .bind(user_id.as_str())
                .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(DeviceRecord {
                    device_id: get(r, 0)?,
                    display_name: get(r, 1)?,
                    last_seen_ms: get::<Option<i64>>(r, 2)?.map(|v| v as u64),
                    last_seen_ip: get(r, 3)?,
                })
            })
            .collect()
    }

    async fn rename_device(&self, user_id: &UserId, device_id: &str, name: Option<&str>) -> StoreResult<Option<StreamPos>> {
        let (id, dev, name) = (user_id.to_string(), device_id.to_owned(), name.map(str::to_owned));
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    let renamed = sqlx::query("UPDATE devices SET display_name = $3 WHERE user_id = $1 AND device_id = $2")
                        .bind(&id)
                        .bind(dev)
                        .bind(name)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?
                        .rows_affected();
                    if renamed == 0 {
                        return Ok(None);
                    }
                    e2ee::record_list_change(c, positions, &id).await.map(Some)
                })
            })
            .await
    }

    async fn touch_device(&self, user_id: &UserId, device_id: &str, ip: &str, now_ms: u64) -> StoreResult<()> {
        let (id, dev, ip) = (user_id.to_string(), device_id.to_owned(), ip.to_owned());
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    sqlx::query("UPDATE devices SET last_seen_ms = $3, last_seen_ip = $4 WHERE user_id = $1 AND device_id = $2")
                        .bind(id)
                        .bind(dev)
                        .bind(now_ms as i64)
                        .bind(ip)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    Ok(())
                })
            })
            .await
    }

    async fn delete_devices(&self, user_id: &UserId, device_ids: &[String]) -> StoreResult<DevicesRemoved> {
        let (id, devs) = (user_id.to_string(), device_ids.to_vec());
        self.engine
            .write(move |c, positions| Box::pin(async move { e2ee::remove_devices(c, positions, &id, &devs).await }))
            .await
    }

    async fn delete_all_devices(&self, user_id: &UserId, keep: Option<&str>) -> StoreResult<DevicesRemoved> {
        let (id, keep) = (user_id.to_string(), keep.map(str::to_owned));
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    let devices = e2ee::device_ids_except(c, &id, keep.as_deref()).await?;
                    e2ee::remove_devices(c, positions, &id, &devices).await
                })
            })
            .await
    }
}

#[async_trait]
impl AuthSessionStore for PostgresStore {
    async fn create_uia_session(&self, session_id: &str, request: &str, now_ms: u64) -> StoreResult<()> {
        let (id, request) = (session_id.to_owned(), request.to_owned());
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO uia_sessions (session_id, request, completed, created_ms) VALUES ($1, $2, '[]', $3)")
                        .bind(id)
                        .bind(request)
                        .bind(now_ms as i64)
                        .execute(&mut *c)
                        .await
                        .map_err(db_error("session id taken"))?;
                    Ok(())
                })
            })
            .await
    }

    async fn uia_session(&self, session_id: &str) -> StoreResult<Option<UiaSessionRecord>> {
        let row = self
            .read(
                sqlx::query("SELECT request, completed, created_ms FROM uia_sessions WHERE session_id = $1")
                    .bind(session_id)
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.map(|r| {
            Ok(UiaSessionRecord {
                request: get(&r, 0)?,
                completed: serde_json::from_str(&get::<String>(&r, 1)?).map_err(corrupt)?,
                created_ms: get::<i64>(&r, 2)? as u64,
            })
        })
        .transpose()
    }

    async fn complete_uia_stage(&self, session_id: &str, stage: &str) -> StoreResult<Option<Vec<String>>> {
        let (id, stage) = (session_id.to_owned(), stage.to_owned());
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let stored = sqlx::query("SELECT completed FROM uia_sessions WHERE session_id = $1 FOR UPDATE")
                        .bind(&id)
                        .fetch_optional(&mut *c)
                        .await
                        .map_err(backend)?;
                    let Some(stored) = stored else { return Ok(None) };
                    let mut completed: Vec<String> = serde_json::from_str(&get::<String>(&stored, 0)?).map_err(corrupt)?;
                    if !completed.contains(&stage) {
                        completed.push(stage);
                        let json = serde_json::to_string(&completed).map_err(corrupt)?;
                        sqlx::query("UPDATE uia_sessions SET completed = $2 WHERE session_id = $1")
                            .bind(&id)
                            .bind(json)
                            .execute(&mut *c)
                            .await
                            .map_err(backend)?;
                    }
                    Ok(Some(completed))
                })
            })
            .await
    }

    async fn delete_uia_session(&self, session_id: &str) -> StoreResult<bool> {
        let id = session_id.to_owned();
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let n = sqlx::query("DELETE FROM uia_sessions WHERE session_id = $1")
                        .bind(id)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?
                        .rows_affected();
                    Ok(n > 0)
                })
            })
            .await
    }

    async fn expire_uia_sessions(&self, before_ms: u64) -> StoreResult<usize> {
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let n = sqlx::query("DELETE FROM uia_sessions WHERE created_ms < $1")
                        .bind(pos(before_ms))
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?
                        .rows_affected();
                    Ok(n as usize)
                })
            })
            .await
    }
}

#[async_trait]
impl UserDataStore for PostgresStore {
    async fn put_account_data(&self, user_id: &UserId, room_id: Option<&RoomId>, kind: &str, content: &str) -> StoreResult<StreamPos> {
        let (u, r, k, v) = (
            user_id.to_owned(),
            room_id.map(|r| r.to_string()).unwrap_or_default(),
            kind.to_owned(),
            content.to_owned(),
        );
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    let p = positions.allocate();
                    sqlx::query(
                        "INSERT INTO account_data (user_id, room_id, kind, content, pos) VALUES ($1, $2, $3, $4, $5)
                         ON CONFLICT (user_id, room_id, kind) DO UPDATE SET content = excluded.content, pos = excluded.pos",
                    )
                    .bind(u.as_str())
                    .bind(r)
                    .bind(k)
                    .bind(v)
                    .bind(p as i64)
                    .execute(&mut *c)
                    .await
                    .map_err(backend)?;
                    positions.change(c, p, Change::AccountData { user_id: u }).await?;
                    Ok(p)
                })
            })
            .await
    }

    async fn account_data(&self, user_id: &UserId, room_id: Option<&RoomId>, kind: &str) -> StoreResult<Option<String>> {
        let row = self
            .read(
                sqlx::query("SELECT content FROM account_data WHERE user_id = $1 AND room_id = $2 AND kind = $3")
                    .bind(user_id.as_str())
                    .bind(room_id.map(|r| r.to_string()).unwrap_or_default())
                    .bind(kind)
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.map(|r| get(&r, 0)).transpose()
    }

    async fn account_data_since(&self, user_id: &UserId, since: StreamPos) -> StoreResult<Vec<AccountDataRecord>> {
        let rows = self
            .read(
                sqlx::query("SELECT room_id, kind, content, pos FROM account_data WHERE user_id = $1 AND pos > $2 ORDER BY pos")
                    .bind(user_id.as_str())
                    .bind(pos(since))
                    .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                let room: String = get(r, 0)?;
                Ok(AccountDataRecord {
                    room_id: if room.is_empty() { None } else { Some(parse(room)?) },
                    kind: get(r, 1)?,
                    content: get::<String>(r, 2)?.into(),
                    pos: get::<i64>(r, 3)? as u64,
                })
            })
            .collect()
    }

    async fn put_receipt(&self, rc: ReceiptRecord) -> StoreResult<StreamPos> {
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    let p = positions.allocate();
                    sqlx::query(
                        "INSERT INTO receipts (room_id, user_id, receipt_type, thread_id, event_id, ts_ms, pos) VALUES ($1, $2, $3, $4, $5, $6, $7)
                         ON CONFLICT (room_id, user_id, receipt_type, thread_id) DO UPDATE SET event_id = excluded.event_id,
                            ts_ms = excluded.ts_ms, pos = excluded.pos",
                    )
                    .bind(rc.room_id.as_str())
                    .bind(rc.user_id.as_str())
                    .bind(&rc.receipt_type)
                    .bind(rc.thread_id.clone().unwrap_or_default())
                    .bind(rc.event_id.as_str())
                    .bind(rc.ts_ms as i64)
                    .bind(p as i64)
                    .execute(&mut *c)
                    .await
                    .map_err(backend)?;
                    positions.change(c, p, Change::Receipt {
                            room_id: rc.room_id,
                            user_id: Some(rc.user_id),
                        }).await?;
                    Ok(p)
                })
            })
            .await
    }

    async fn receipt(&self, room_id: &RoomId, user_id: &UserId, receipt_type: &str) -> StoreResult<Option<ReceiptRecord>> {
        let row = self
            .read(
                sqlx::query(
                    "SELECT room_id, user_id, receipt_type, thread_id, event_id, ts_ms, pos FROM receipts
                     WHERE room_id = $1 AND user_id = $2 AND receipt_type = $3 AND thread_id = ''",
                )
                .bind(room_id.as_str())
                .bind(user_id.as_str())
                .bind(receipt_type)
                .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.as_ref().map(receipt_from_row).transpose()
    }

    async fn receipts_since(&self, room_id: &RoomId, since: StreamPos, by: Option<&UserId>) -> StoreResult<Vec<ReceiptRecord>> {
        // One user's receipts are a few rows of the primary key; one query
        // for both cases (`$3 IS NULL OR ...`) would read the room's whole
        // index by position.
        let pool = &self.engine.pool;
        let rows = match by {
            Some(user) => {
                let query = "SELECT room_id, user_id, receipt_type, thread_id, event_id, ts_ms, pos FROM receipts
                             WHERE room_id = $1 AND pos > $2 AND user_id = $3 ORDER BY pos";
                let query = sqlx::query(query).bind(room_id.as_str()).bind(pos(since)).bind(user.as_str());
                self.read(query.fetch_all(pool)).await?
            }
            None => {
                let query = "SELECT room_id, user_id, receipt_type, thread_id, event_id, ts_ms, pos FROM receipts WHERE room_id = $1 AND pos > $2 ORDER BY pos";
                self.read(sqlx::query(query).bind(room_id.as_str()).bind(pos(since)).fetch_all(pool))
                    .await?
            }
        };
        rows.iter().map(receipt_from_row).collect()
    }

    async fn put_filter(&self, user_id: &UserId, filter_json: &str) -> StoreResult<String> {
        let (u, j) = (user_id.to_string(), filter_json.to_owned());
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let next: i64 = sqlx::query("SELECT COALESCE(MAX(filter_id), -1) + 1 FROM filters WHERE user_id = $1")
                        .bind(&u)
                        .fetch_one(&mut *c)
                        .await
                        .map_err(backend)?
                        .try_get(0)
                        .map_err(corrupt)?;
                    sqlx::query("INSERT INTO filters (user_id, filter_id, json) VALUES ($1, $2, $3)")
                        .bind(u)
                        .bind(next)
                        .bind(j)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    Ok(next.to_string())
                })
            })
            .await
    }

    async fn filter(&self, user_id: &UserId, filter_id: &str) -> StoreResult<Option<String>> {
        let Ok(id) = filter_id.parse::<i64>() else {
            return Ok(None);
        };
        let row = self
            .read(
                sqlx::query("SELECT json FROM filters WHERE user_id = $1 AND filter_id = $2")
                    .bind(user_id.as_str())
                    .bind(id)
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.map(|r| get(&r, 0)).transpose()
    }

    async fn set_pusher(&self, user_id: &UserId, app_id: &str, pushkey: &str, json: &str, replace_others: bool) -> StoreResult<()> {
        let (u, a, k, j) = (user_id.to_string(), app_id.to_owned(), pushkey.to_owned(), json.to_owned());
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    if replace_others {
                        sqlx::query("DELETE FROM pushers WHERE app_id = $1 AND pushkey = $2 AND user_id <> $3")
                            .bind(&a)
                            .bind(&k)
                            .bind(&u)
                            .execute(&mut *c)
                            .await
                            .map_err(backend)?;
                    }
                    // A replaced pusher keeps its place (its `created`).
                    sqlx::query(
                        "INSERT INTO pushers (user_id, app_id, pushkey, json, created) \
                         VALUES ($1, $2, $3, $4, (SELECT COALESCE(MAX(created), 0) + 1 FROM pushers)) \
                         ON CONFLICT (user_id, app_id, pushkey) DO UPDATE SET json = excluded.json",
                    )
                    .bind(u)
                    .bind(a)
                    .bind(k)
                    .bind(j)
                    .execute(&mut *c)
                    .await
                    .map_err(backend)?;
                    Ok(())
                })
            })
            .await
    }

    async fn delete_pusher(&self, user_id: &UserId, app_id: &str, pushkey: &str) -> StoreResult<bool> {
        let (u, a, k) = (user_id.to_string(), app_id.to_owned(), pushkey.to_owned());
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let done = sqlx::query("DELETE FROM pushers WHERE user_id = $1 AND app_id = $2 AND pushkey = $3")
                        .bind(u)
                        .bind(a)
                        .bind(k)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    Ok(done.rows_affected() > 0)
                })
            })
            .await
    }

    async fn pushers(&self, user_id: &UserId) -> StoreResult<Vec<String>> {
        let rows = self
            .read(
                sqlx::query("SELECT json FROM pushers WHERE user_id = $1 ORDER BY created")
                    .bind(user_id.as_str())
                    .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter().map(|r| get(r, 0)).collect()
    }
}

fn receipt_from_row(r: &PgRow) -> StoreResult<ReceiptRecord> {
    let thread: String = get(r, 3)?;
    Ok(ReceiptRecord {
        room_id: parse(get(r, 0)?)?,
        user_id: parse(get(r, 1)?)?,
        receipt_type: get(r, 2)?,
        thread_id: if thread.is_empty() { None } else { Some(thread) },
        event_id: parse(get(r, 4)?)?,
        ts_ms: get::<i64>(r, 5)? as u64,
        pos: get::<i64>(r, 6)? as u64,
    })
}

#[async_trait]
impl MediaContent for PostgresStore {
    async fn put_content(&self, sha256: &str, bytes: Vec<u8>) -> StoreResult<()> {
        // Not a stream write: a plain committed insert on a pooled connection.
        let started = std::time::Instant::now();
        let outcome = sqlx::query("INSERT INTO media_content (sha256, bytes) VALUES ($1, $2) ON CONFLICT (sha256) DO NOTHING")
            .bind(sha256)
            .bind(bytes)
            .execute(&self.engine.pool)
            .await
            .map(|_| ())
            .map_err(backend);
        self.engine.observe(StoreOp::Write, started);
        outcome
    }

    async fn content(&self, sha256: &str) -> StoreResult<Option<kabar_store::media_content::ContentReader>> {
        let row = self
            .read(
                sqlx::query("SELECT bytes FROM media_content WHERE sha256 = $1")
                    .bind(sha256)
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.map(|r| {
            let bytes: Vec<u8> = get(&r, 0)?;
            Ok(Box::pin(std::io::Cursor::new(bytes)) as kabar_store::media_content::ContentReader)
        })
        .transpose()
    }
}

#[async_trait]
impl MediaStore for PostgresStore {
    async fn put_media(&self, m: MediaRecord) -> StoreResult<()> {
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO media (media_id, content_type, filename, sha256, size, uploader, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    )
                    .bind(&m.media_id)
                    .bind(&m.content_type)
                    .bind(&m.filename)
                    .bind(&m.sha256)
                    .bind(m.size as i64)
                    .bind(m.uploader.as_str())
                    .bind(m.created_ms as i64)
                    .execute(&mut *c)
                    .await
                    .map_err(db_error("media id exists"))?;
                    Ok(())
                })
            })
            .await
    }

    async fn media(&self, media_id: &str) -> StoreResult<Option<MediaRecord>> {
        let row = self
            .read(
                sqlx::query("SELECT media_id, content_type, filename, sha256, size, uploader, created_ms FROM media WHERE media_id = $1")
                    .bind(media_id)
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.map(|r| {
            Ok(MediaRecord {
                media_id: get(&r, 0)?,
                content_type: get(&r, 1)?,
                filename: get(&r, 2)?,
                sha256: get(&r, 3)?,
                size: get::<i64>(&r, 4)? as u64,
                uploader: parse(get(&r, 5)?)?,
                created_ms: get::<i64>(&r, 6)? as u64,
            })
        })
        .transpose()
    }

    async fn media_freeze_ms(&self) -> StoreResult<u64> {
        let row = self
            .read(sqlx::query("SELECT value FROM meta WHERE key = 'media_freeze_ms'").fetch_optional(&self.engine.pool))
            .await?;
        Ok(row
            .map(|r| get::<String>(&r, 0))
            .transpose()?
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0))
    }
}

#[async_trait]
impl ServerStore for PostgresStore {
    async fn signing_key(&self, generate: Vec<u8>) -> StoreResult<Vec<u8>> {
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO signing_key (key) VALUES ($1) ON CONFLICT DO NOTHING")
                        .bind(generate)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    sqlx::query("SELECT key FROM signing_key")
                        .fetch_one(&mut *c)
                        .await
                        .map_err(backend)?
                        .try_get(0)
                        .map_err(corrupt)
                })
            })
            .await
    }

    async fn create_registration_token(&self, token: &str, uses_allowed: Option<u32>, expiry_ms: Option<u64>) -> StoreResult<()> {
        let t = token.to_owned();
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO registration_tokens (token, uses_allowed, expiry_ms) VALUES ($1, $2, $3)")
                        .bind(t)
                        .bind(uses_allowed.map(i64::from))
                        .bind(expiry_ms.map(pos))
                        .execute(&mut *c)
                        .await
                        .map_err(db_error("token exists"))?;
                    Ok(())
                })
            })
            .await
    }

    async fn use_registration_token(&self, token: &str, now_ms: u64) -> StoreResult<bool> {
        let t = token.to_owned();
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let n = sqlx::query(
                        "UPDATE registration_tokens SET completed = completed + 1 WHERE token = $1
                         AND (uses_allowed IS NULL OR completed < uses_allowed) AND (expiry_ms IS NULL OR expiry_ms > $2)",
                    )
                    .bind(t)
                    .bind(pos(now_ms))
                    .execute(&mut *c)
                    .await
                    .map_err(backend)?
                    .rows_affected();
                    Ok(n > 0)
                })
            })
            .await
    }

    async fn registration_token_valid(&self, token: &str, now_ms: u64) -> StoreResult<bool> {
        let row = self
            .read(
                sqlx::query(
                    "SELECT 1 FROM registration_tokens WHERE token = $1 AND (uses_allowed IS NULL OR completed < uses_allowed)
                     AND (expiry_ms IS NULL OR expiry_ms > $2)",
                )
                .bind(token)
                .bind(pos(now_ms))
                .fetch_optional(&self.engine.pool),
            )
            .await?;
        Ok(row.is_some())
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read(sqlx::query("SELECT 1").fetch_one(&self.engine.pool)).await?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis().to_string())
            .unwrap_or_default();
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO meta (key, value) VALUES ('last_ping_ms', $1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    )
                    .bind(now)
                    .execute(&mut *c)
                    .await
                    .map_err(backend)?;
                    Ok(())
                })
            })
            .await
    }
}

use ruma::RoomId;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_cluster::TestCluster;

    #[tokio::test]
    async fn conformance() {
        let cluster = TestCluster::start().expect("start a PostgreSQL cluster");
        let url = cluster.create_database("conformance").unwrap();
        let store = PostgresStore::connect(&url, 8).await.unwrap();
        kabar_store::conformance::media_content(&store).await;
        kabar_store::conformance::run_all(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn two_handles_share_one_stream() {
        let cluster = TestCluster::start().expect("start a PostgreSQL cluster");
        let url = cluster.create_database("shared").unwrap();
        let a = PostgresStore::connect(&url, 4).await.unwrap();
        let b = PostgresStore::connect(&url, 4).await.unwrap();
        kabar_store::conformance::run_shared(Arc::new(a), Arc::new(b)).await;
    }

    #[tokio::test]
    async fn positions_and_data_survive_a_restart_of_either_side() {
        let cluster = TestCluster::start().expect("start a PostgreSQL cluster");
        let url = cluster.create_database("restart").unwrap();
        let user = ruma::owned_user_id!("@a:localhost");
        let first = {
            let store = PostgresStore::connect(&url, 2).await.unwrap();
            store.put_account_data(&user, None, "x", "{}").await.unwrap()
        };
        // Kabar restarted: the head and the data are where they were.
        let store = PostgresStore::connect(&url, 2).await.unwrap();
        assert_eq!(store.current_position(), first);
        let second = store.put_account_data(&user, None, "y", "{}").await.unwrap();
        assert!(second > first, "positions are never reused after a restart");

        // PostgreSQL stopped: writes and reads say so, nothing is half-written.
        cluster.stop().unwrap();
        let down = store.put_account_data(&user, None, "z", "{}").await;
        assert!(matches!(down, Err(StoreError::Unavailable(_))), "{down:?}");
        let read = store.account_data(&user, None, "x").await;
        assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
        // And when it is back, the same handle works again.
        cluster.restart().unwrap();
        let mut back = None;
        for _ in 0..50 {
            match store.put_account_data(&user, None, "z", "{}").await {
                Ok(p) => {
                    back = Some(p);
                    break;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        }
        let third = back.expect("writes work again once PostgreSQL is back");
        assert!(third > second);
        assert_eq!(store.committed_position().await.unwrap(), third);
        assert_eq!(store.account_data(&user, None, "y").await.unwrap().as_deref(), Some("{}"));
    }
}
