//! The embedded storage engine: SQLite in the data directory.
//!
//! Chosen over a pure-Rust key-value engine because the queries Kabar needs
//! (range scans by room and position, secondary indexes for transactions,
//! relations and memberships, atomic multi-table updates) are what SQL does,
//! and SQLite's WAL mode gives durable group commits with one file to back up.

mod e2ee;
mod engine;
mod export;

pub use export::SqliteExport;

use std::{path::Path, sync::Arc};

use async_trait::async_trait;
use engine::{Engine, Positions, backend, exec};
use kabar_domain::Pdu;
use kabar_store::*;
use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId};
use rusqlite::{Connection, OptionalExtension, Row, params};

/// The SQLite implementation of [`Store`].
#[derive(Clone)]
pub struct SqliteStore {
    engine: Arc<Engine>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Self::open_observed(path, None)
    }

    /// Opens the database, telling `observer` how long every read and write takes.
    pub fn open_observed(path: &Path, observer: Option<Arc<dyn StoreObserver>>) -> StoreResult<Self> {
        Ok(Self {
            engine: Arc::new(Engine::open(path, observer)?),
        })
    }

    /// Stops taking writes; queued writes still commit.
    pub fn close(&self) {
        self.engine.close();
    }
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
        || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
}

/// Maps a uniqueness violation to `Conflict(what)` and anything else to `Backend`.
fn conflict_or_backend(what: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> StoreError {
    let what = what.into();
    move |e| {
        if is_unique_violation(&e) {
            StoreError::Conflict(what)
        } else {
            backend(e)
        }
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn parse<T: TryFrom<String>>(s: String) -> rusqlite::Result<T>
where
    T::Error: std::fmt::Display,
{
    T::try_from(s).map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.to_string().into()))
}

/// The columns [`event_from_row`] reads, in its order; prefixed with `e.`
/// so a query may join other tables.
const EVENT_COLUMNS: &str = "e.pos, e.event_id, e.room_id, e.json, e.txn_device, e.txn_id, e.redacted_by, e.txn_scope, e.replaces_state, e.prev_sender, e.prev_content";

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<StoredEvent> {
    let pos: i64 = row.get(0)?;
    let event_id: OwnedEventId = parse(row.get(1)?)?;
    let room_id: OwnedRoomId = parse(row.get(2)?)?;
    let json: String = row.get(3)?;
    let txn_device: Option<String> = row.get(4)?;
    let txn_id: Option<String> = row.get(5)?;
    let redacted_by: Option<String> = row.get(6)?;
    let txn_scope: Option<String> = row.get(7)?;
    let replaces: Option<String> = row.get(8)?;
    let prev_sender: Option<String> = row.get(9)?;
    let prev_content: Option<String> = row.get(10)?;
    let pdu = Pdu::from_stored(event_id, room_id, &json)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, e.to_string().into()))?;
    let prev = match (replaces, prev_sender, prev_content) {
        (Some(event_id), Some(sender), Some(content)) => Some(PrevState {
            event_id: parse(event_id)?,
            sender: parse(sender)?,
            content,
        }),
        _ => None,
    };
    Ok(StoredEvent {
        pos: pos as u64,
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

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        user_id: parse(row.get(0)?)?,
        password_hash: row.get(1)?,
        deactivated: row.get::<_, i64>(2)? != 0,
        displayname: row.get(3)?,
        avatar_url: row.get(4)?,
    })
}

fn receipt_from_row(r: &Row<'_>) -> rusqlite::Result<ReceiptRecord> {
    let thread: String = r.get(3)?;
    Ok(ReceiptRecord {
        room_id: parse(r.get(0)?)?,
        user_id: parse(r.get(1)?)?,
        receipt_type: r.get(2)?,
        thread_id: if thread.is_empty() { None } else { Some(thread) },
        event_id: parse(r.get(4)?)?,
        ts_ms: r.get::<_, i64>(5)? as u64,
        pos: r.get::<_, i64>(6)? as u64,
    })
}

fn membership_from_row(row: &Row<'_>) -> rusqlite::Result<MembershipRecord> {
    let m: String = row.get(1)?;
    Ok(MembershipRecord {
        room_id: parse(row.get(0)?)?,
        membership: Membership::parse(&m).unwrap_or(Membership::Leave),
        pos: row.get::<_, i64>(2)? as u64,
        event_id: parse(row.get(3)?)?,
    })
}

const EVENT_BY_TXN: &str =
    "SELECT event_id FROM events WHERE sender = ?1 AND txn_device = ?2 AND room_id = ?3 AND txn_scope = ?4 AND txn_id = ?5";

/// Inserts one event and applies its effects. Runs on the writer thread.
fn insert_event(conn: &Connection, positions: &mut Positions, w: EventWrite) -> StoreResult<AppendOutcome> {
    let pdu = &w.pdu;
    if let Some(txn) = &w.txn {
        let existing: Option<String> = conn
            .prepare_cached(EVENT_BY_TXN)
            .and_then(|mut stmt| {
                stmt.query_row(
                    params![pdu.sender.as_str(), txn.device_id, pdu.room_id.as_str(), txn.scope, txn.txn_id],
                    |r| r.get(0),
                )
            })
            .optional()
            .map_err(backend)?;
        if let Some(id) = existing {
            return Ok(AppendOutcome::Duplicate(OwnedEventId::try_from(id).map_err(corrupt)?));
        }
    }
    if let Some(expected) = &w.expected_head {
        let (head, newest) = room_head(conn, pdu.room_id.as_str())?;
        if newest.as_deref() != Some(expected.as_str()) {
            return Ok(AppendOutcome::HeadMoved { head });
        }
    }
    let pos = positions.allocate();
    let (rel_to, rel_type) = match &w.relation {
        Some((id, t)) => (Some(id.as_str()), Some(t.as_str())),
        None => (None, None),
    };
    exec(
        conn,
        "INSERT INTO events (pos, event_id, room_id, sender, kind, state_key, json, txn_device, txn_id, txn_scope, relates_to, rel_type,
                             replaces_state, prev_sender, prev_content)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            pos as i64,
            pdu.event_id.as_str(),
            pdu.room_id.as_str(),
            pdu.sender.as_str(),
            pdu.kind.to_string(),
            pdu.state_key,
            &*pdu.json,
            w.txn.as_ref().map(|t| &t.device_id),
            w.txn.as_ref().map(|t| &t.txn_id),
            w.txn.as_ref().map(|t| &t.scope),
            rel_to,
            rel_type,
            w.prev.as_ref().map(|p| p.event_id.as_str()),
            w.prev.as_ref().map(|p| p.sender.as_str()),
            w.prev.as_ref().map(|p| &p.content),
        ],
    )
    .map_err(conflict_or_backend(format!("event {} exists", pdu.event_id)))?;
    if let Some(state_key) = &pdu.state_key {
        exec(
            conn,
            "INSERT INTO current_state (room_id, kind, state_key, pos) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (room_id, kind, state_key) DO UPDATE SET pos = excluded.pos",
            params![pdu.room_id.as_str(), pdu.kind.to_string(), state_key, pos as i64],
        )
        .map_err(backend)?;
        if pdu.kind == ruma::events::TimelineEventType::RoomMember {
            let membership = Membership::from_content(pdu.content.get()).unwrap_or(Membership::Leave);
            // The position moves only when the membership does: a profile
            // change is not a new join (a sync would resend the whole room).
            exec(
                conn,
                "INSERT INTO memberships (user_id, room_id, membership, pos, event_id) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (user_id, room_id) DO UPDATE SET
                    pos = CASE WHEN memberships.membership = excluded.membership THEN memberships.pos ELSE excluded.pos END,
                    membership = excluded.membership, event_id = excluded.event_id",
                params![
                    state_key,
                    pdu.room_id.as_str(),
                    membership.as_str(),
                    pos as i64,
                    pdu.event_id.as_str()
                ],
            )
            .map_err(backend)?;
        }
        if pdu.kind == ruma::events::TimelineEventType::RoomJoinRules {
            let rule = serde_json::from_str::<serde_json::Value>(pdu.content.get())
                .ok()
                .and_then(|c| c.get("join_rule").and_then(|r| r.as_str()).map(str::to_owned));
            exec(
                conn,
                "UPDATE rooms SET join_rule = ?2 WHERE room_id = ?1",
                params![pdu.room_id.as_str(), rule],
            )
            .map_err(backend)?;
        }
    }
    if let Some((target, redacted_json)) = &w.redacted_target {
        exec(
            conn,
            "UPDATE events SET json = ?2, redacted_by = ?3 WHERE event_id = ?1 AND room_id = ?4",
            params![target.as_str(), redacted_json, pdu.event_id.as_str(), pdu.room_id.as_str()],
        )
        .map_err(backend)?;
        // The state events that replaced the target show its content as it is now.
        exec(
            conn,
            "UPDATE events SET prev_content = json_extract(?2, '$.content') WHERE replaces_state = ?1 AND room_id = ?3",
            params![target.as_str(), redacted_json, pdu.room_id.as_str()],
        )
        .map_err(backend)?;
    }
    positions.event(StoredEvent {
        pos,
        pdu: w.pdu,
        txn: w.txn,
        redacted_by: None,
        prev: w.prev,
    });
    Ok(AppendOutcome::Appended(pos))
}

/// The position and id of the room's newest event (0 and `None` for none).
fn room_head(conn: &Connection, room_id: &str) -> StoreResult<(StreamPos, Option<String>)> {
    conn.prepare_cached("SELECT pos, event_id FROM events WHERE room_id = ?1 ORDER BY pos DESC LIMIT 1")
        .and_then(|mut st| {
            st.query_row([room_id], |r| Ok((r.get::<_, i64>(0)? as StreamPos, Some(r.get::<_, String>(1)?))))
                .optional()
        })
        .map(|head| head.unwrap_or((0, None)))
        .map_err(backend)
}

#[async_trait]
impl AccountStore for SqliteStore {
    async fn create_user(&self, user: NewUser) -> StoreResult<()> {
        self.engine
            .write(move |c, _| {
                exec(
                    c,
                    "INSERT INTO users (user_id, password_hash, created_ms) VALUES (?1, ?2, ?3)",
                    params![user.user_id.as_str(), user.password_hash, user.created_ms as i64],
                )
                .map_err(conflict_or_backend("user id taken"))?;
                Ok(())
            })
            .await
    }

    async fn user(&self, user_id: &UserId) -> StoreResult<Option<UserRecord>> {
        let id = user_id.to_string();
        self.engine
            .read(move |c| {
                c.query_row(
                    "SELECT user_id, password_hash, deactivated, displayname, avatar_url FROM users WHERE user_id = ?1",
                    [id],
                    user_from_row,
                )
                .optional()
                .map_err(corrupt)
            })
            .await
    }

    async fn set_password_hash(&self, user_id: &UserId, hash: &str) -> StoreResult<()> {
        let (id, hash) = (user_id.to_string(), hash.to_owned());
        self.engine
            .write(move |c, _| {
                exec(c, "UPDATE users SET password_hash = ?2 WHERE user_id = ?1", [id, hash])
                    .map(|_| ())
                    .map_err(backend)
            })
            .await
    }

    async fn deactivate_user(&self, user_id: &UserId) -> StoreResult<DevicesRemoved> {
        let id = user_id.to_string();
        self.engine
            .write(move |c, positions| {
                exec(
                    c,
                    "UPDATE users SET deactivated = 1, password_hash = NULL WHERE user_id = ?1",
                    [&id],
                )
                .map_err(backend)?;
                let devices = e2ee::device_ids_except(c, &id, None)?;
                e2ee::remove_devices(c, positions, &id, &devices)
            })
            .await
    }

    async fn set_profile(&self, user_id: &UserId, field: ProfileField, value: Option<&str>) -> StoreResult<()> {
        let (id, value) = (user_id.to_string(), value.map(str::to_owned));
        let sql = match field {
            ProfileField::DisplayName => "UPDATE users SET displayname = ?2 WHERE user_id = ?1",
            ProfileField::AvatarUrl => "UPDATE users SET avatar_url = ?2 WHERE user_id = ?1",
        };
        self.engine
            .write(move |c, _| exec(c, sql, params![id, value]).map(|_| ()).map_err(backend))
            .await
    }

    async fn search_users(&self, term: &str, limit: usize, searcher: Option<&UserId>) -> StoreResult<Vec<UserRecord>> {
        let pattern = format!(
            "%{}%",
            term.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")
        );
        let searcher = searcher.map(|s| s.to_string());
        self.engine
            .read(move |c| {
                // With a searcher: only users sharing a room with them or in a
                // room anyone may join (Synapse's default), and themselves.
                let mut st = c
                    .prepare_cached(
                        "SELECT user_id, password_hash, deactivated, displayname, avatar_url FROM users u
                         WHERE deactivated = 0 AND (lower(user_id) LIKE ?1 ESCAPE '\\' OR lower(displayname) LIKE ?1 ESCAPE '\\')
                         AND (?3 IS NULL OR u.user_id = ?3
                              OR EXISTS (SELECT 1 FROM memberships mine JOIN memberships theirs ON theirs.room_id = mine.room_id
                                         WHERE mine.user_id = ?3 AND mine.membership = 'join'
                                           AND theirs.user_id = u.user_id AND theirs.membership = 'join')
                              OR EXISTS (SELECT 1 FROM memberships m JOIN rooms r ON r.room_id = m.room_id
                                         WHERE m.user_id = u.user_id AND m.membership = 'join' AND (r.join_rule = 'public' OR r.is_public = 1)))
                         ORDER BY user_id LIMIT ?2",
                    )
                    .map_err(backend)?;
                st.query_map(params![pattern, limit as i64, searcher], user_from_row)
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)
            })
            .await
    }

    async fn upsert_device(&self, d: NewDevice) -> StoreResult<StreamPos> {
        self.engine
            .write(move |c, positions| {
                let existed = c
                    .prepare_cached("SELECT 1 FROM devices WHERE user_id = ?1 AND device_id = ?2")
                    .map_err(backend)?
                    .exists(params![d.user_id.as_str(), d.device_id])
                    .map_err(backend)?;
                exec(
                    c,
                    "INSERT INTO devices (user_id, device_id, display_name, token_hash, last_seen_ms, last_seen_ip) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (user_id, device_id) DO UPDATE SET token_hash = excluded.token_hash,
                        display_name = COALESCE(excluded.display_name, devices.display_name), last_seen_ms = excluded.last_seen_ms,
                        last_seen_ip = COALESCE(excluded.last_seen_ip, devices.last_seen_ip)",
                    params![d.user_id.as_str(), d.device_id, d.display_name, d.token_hash, d.now_ms as i64, d.ip],
                )
                .map_err(conflict_or_backend("token exists"))?;
                let pos = positions.allocate();
                if !existed {
                    e2ee::record_list_change_at(c, positions, d.user_id.as_str(), pos)?;
                }
                positions.change(c, pos, Change::Sessions { user_id: d.user_id })?;
                Ok(pos)
            })
            .await
    }

    async fn session_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<Session>> {
        let h = token_hash.to_owned();
        self.engine
            .read(move |c| {
                c.prepare_cached("SELECT user_id, device_id FROM devices WHERE token_hash = ?1")
                    .map_err(backend)?
                    .query_row([h], |r| {
                        Ok(Session {
                            user_id: parse(r.get(0)?)?,
                            device_id: r.get(1)?,
                        })
                    })
                    .optional()
                    .map_err(corrupt)
            })
            .await
    }

    async fn devices(&self, user_id: &UserId) -> StoreResult<Vec<DeviceRecord>> {
        let id = user_id.to_string();
        self.engine
            .read(move |c| {
                let mut st = c
                    .prepare_cached(
                        "SELECT device_id, display_name, last_seen_ms, last_seen_ip FROM devices WHERE user_id = ?1 ORDER BY device_id",
                    )
                    .map_err(backend)?;
                st.query_map([id], |r| {
                    Ok(DeviceRecord {
                        device_id: r.get(0)?,
                        display_name: r.get(1)?,
                        last_seen_ms: r.get::<_, Option<i64>>(2)?.map(|v| v as u64),
                        last_seen_ip: r.get(3)?,
                    })
                })
                .map_err(backend)?
                .collect::<Result<_, _>>()
                .map_err(corrupt)
            })
            .await
    }

    async fn rename_device(&self, user_id: &UserId, device_id: &str, name: Option<&str>) -> StoreResult<Option<StreamPos>> {
        let (id, dev, name) = (user_id.to_string(), device_id.to_owned(), name.map(str::to_owned));
        self.engine
            .write(move |c, positions| {
                let renamed = exec(
                    c,
                    "UPDATE devices SET display_name = ?3 WHERE user_id = ?1 AND device_id = ?2",
                    params![id, dev, name],
                )
                .map_err(backend)?;
                if renamed == 0 {
                    return Ok(None);
                }
                e2ee::record_list_change(c, positions, &id).map(Some)
            })
            .await
    }

    async fn touch_device(&self, user_id: &UserId, device_id: &str, ip: &str, now_ms: u64) -> StoreResult<()> {
        let (id, dev, ip) = (user_id.to_string(), device_id.to_owned(), ip.to_owned());
        self.engine
            .write(move |c, _| {
                exec(
                    c,
                    "UPDATE devices SET last_seen_ms = ?3, last_seen_ip = ?4 WHERE user_id = ?1 AND device_id = ?2",
                    params![id, dev, now_ms as i64, ip],
                )
                .map(|_| ())
                .map_err(backend)
            })
            .await
    }

    async fn delete_devices(&self, user_id: &UserId, device_ids: &[String]) -> StoreResult<DevicesRemoved> {
        let (id, devs) = (user_id.to_string(), device_ids.to_vec());
        self.engine
            .write(move |c, positions| e2ee::remove_devices(c, positions, &id, &devs))
            .await
    }

    async fn delete_all_devices(&self, user_id: &UserId, keep: Option<&str>) -> StoreResult<DevicesRemoved> {
        let (id, keep) = (user_id.to_string(), keep.map(str::to_owned));
        self.engine
            .write(move |c, positions| {
                let devices = e2ee::device_ids_except(c, &id, keep.as_deref())?;
                e2ee::remove_devices(c, positions, &id, &devices)
            })
            .await
    }
}

#[async_trait]
impl AuthSessionStore for SqliteStore {
    async fn create_uia_session(&self, session_id: &str, request: &str, now_ms: u64) -> StoreResult<()> {
        let (id, request) = (session_id.to_owned(), request.to_owned());
        self.engine
            .write(move |c, _| {
                exec(
                    c,
                    "INSERT INTO uia_sessions (session_id, request, completed, created_ms) VALUES (?1, ?2, '[]', ?3)",
                    params![id, request, now_ms as i64],
                )
                .map(|_| ())
                .map_err(conflict_or_backend("session id taken"))
            })
            .await
    }

    async fn uia_session(&self, session_id: &str) -> StoreResult<Option<UiaSessionRecord>> {
        let id = session_id.to_owned();
        self.engine
            .read(move |c| {
                let row: Option<(String, String, i64)> = c
                    .prepare_cached("SELECT request, completed, created_ms FROM uia_sessions WHERE session_id = ?1")
                    .map_err(backend)?
                    .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
                    .map_err(corrupt)?;
                row.map(|(request, completed, created_ms)| {
                    Ok(UiaSessionRecord {
                        request,
                        completed: serde_json::from_str(&completed).map_err(corrupt)?,
                        created_ms: created_ms as u64,
                    })
                })
                .transpose()
            })
            .await
    }

    async fn complete_uia_stage(&self, session_id: &str, stage: &str) -> StoreResult<Option<Vec<String>>> {
        let (id, stage) = (session_id.to_owned(), stage.to_owned());
        self.engine
            .write(move |c, _| {
                let stored: Option<String> = c
                    .prepare_cached("SELECT completed FROM uia_sessions WHERE session_id = ?1")
                    .map_err(backend)?
                    .query_row([&id], |r| r.get(0))
                    .optional()
                    .map_err(backend)?;
                let Some(stored) = stored else { return Ok(None) };
                let mut completed: Vec<String> = serde_json::from_str(&stored).map_err(corrupt)?;
                if !completed.contains(&stage) {
                    completed.push(stage);
                    let json = serde_json::to_string(&completed).map_err(corrupt)?;
                    exec(c, "UPDATE uia_sessions SET completed = ?2 WHERE session_id = ?1", params![id, json]).map_err(backend)?;
                }
                Ok(Some(completed))
            })
            .await
    }

    async fn delete_uia_session(&self, session_id: &str) -> StoreResult<bool> {
        let id = session_id.to_owned();
        self.engine
            .write(move |c, _| {
                exec(c, "DELETE FROM uia_sessions WHERE session_id = ?1", [id])
                    .map(|n| n > 0)
                    .map_err(backend)
            })
            .await
    }

    async fn expire_uia_sessions(&self, before_ms: u64) -> StoreResult<usize> {
        self.engine
            .write(move |c, _| {
                exec(
                    c,
                    "DELETE FROM uia_sessions WHERE created_ms < ?1",
                    [before_ms.min(i64::MAX as u64) as i64],
                )
                .map_err(backend)
            })
            .await
    }
}

#[async_trait]
impl RoomStore for SqliteStore {
    async fn create_room(&self, room: RoomRecord, events: Vec<EventWrite>) -> StoreResult<Vec<StreamPos>> {
        self.engine
            .write(move |c, positions| {
                exec(
                    c,
                    "INSERT INTO rooms (room_id, version, creator, is_public) VALUES (?1, ?2, ?3, ?4)",
                    params![
                        room.room_id.as_str(),
                        room.version.as_str(),
                        room.creator.as_str(),
                        room.is_public as i64
                    ],
                )
                .map_err(conflict_or_backend("room exists"))?;
                let mut out = Vec::with_capacity(events.len());
                for w in events {
                    match insert_event(c, positions, w)? {
                        AppendOutcome::Appended(p) => out.push(p),
                        AppendOutcome::Duplicate(_) | AppendOutcome::HeadMoved { .. } => {
                            return Err(StoreError::Conflict("room creation must start the room's chain".into()));
                        }
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn room(&self, room_id: &RoomId) -> StoreResult<Option<RoomRecord>> {
        let id = room_id.to_string();
        self.engine
            .read(move |c| {
                c.prepare_cached("SELECT room_id, version, creator, is_public FROM rooms WHERE room_id = ?1")
                    .map_err(backend)?
                    .query_row([id], |r| {
                        Ok(RoomRecord {
                            room_id: parse(r.get(0)?)?,
                            version: RoomVersionId::try_from(r.get::<_, String>(1)?).map_err(|e| {
                                rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.to_string().into())
                            })?,
                            creator: parse(r.get(2)?)?,
                            is_public: r.get::<_, i64>(3)? != 0,
                        })
                    })
                    .optional()
                    .map_err(corrupt)
            })
            .await
    }

    async fn set_room_public(&self, room_id: &RoomId, public: bool) -> StoreResult<()> {
        let id = room_id.to_string();
        self.engine
            .write(move |c, _| {
                exec(c, "UPDATE rooms SET is_public = ?2 WHERE room_id = ?1", params![id, public as i64])
                    .map(|_| ())
                    .map_err(backend)
            })
            .await
    }

    async fn public_rooms(&self) -> StoreResult<Vec<OwnedRoomId>> {
        self.engine
            .read(|c| {
                let mut st = c
                    .prepare_cached("SELECT room_id FROM rooms WHERE is_public = 1 ORDER BY room_id")
                    .map_err(backend)?;
                st.query_map([], |r| parse(r.get(0)?))
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)
            })
            .await
    }

    async fn room_list_entries(&self, room_ids: &[OwnedRoomId], bump_kinds: &[&str]) -> StoreResult<Vec<RoomListEntry>> {
        let ids = serde_json::to_string(&room_ids.iter().map(|r| r.as_str()).collect::<Vec<_>>()).map_err(corrupt)?;
        let kinds = serde_json::to_string(bump_kinds).map_err(corrupt)?;
        self.engine
            .read(move |c| {
                // One statement for every room: index lookups per room (the
                // newest events of the room are walked backwards until one
                // bumps), without a round of statement calls per room.
                let mut st = c
                    .prepare_cached(
                        "SELECT r.value, \
                            (SELECT pos FROM events e WHERE e.room_id = r.value \
                               AND e.kind IN (SELECT value FROM json_each(?2)) ORDER BY pos DESC LIMIT 1), \
                            (SELECT MAX(pos) FROM events e WHERE e.room_id = r.value), \
                            EXISTS (SELECT 1 FROM events e WHERE e.room_id = r.value AND e.kind = 'm.room.encryption' AND e.state_key = ''), \
                            (SELECT json FROM events e WHERE e.room_id = r.value AND e.kind = 'm.room.create' AND e.state_key = '' LIMIT 1) \
                         FROM json_each(?1) AS r",
                    )
                    .map_err(backend)?;
                let rows = st
                    .query_map(params![ids, kinds], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, Option<i64>>(1)?,
                            r.get::<_, Option<i64>>(2)?,
                            r.get::<_, bool>(3)?,
                            r.get::<_, Option<String>>(4)?,
                        ))
                    })
                    .map_err(backend)?;
                let mut out = Vec::new();
                for row in rows {
                    let (room_id, bumped, last, encrypted, create) = row.map_err(corrupt)?;
                    let Some(last) = last else { continue };
                    out.push(RoomListEntry {
                        room_id: OwnedRoomId::try_from(room_id).map_err(corrupt)?,
                        bump: bumped.unwrap_or(last) as StreamPos,
                        encrypted,
                        room_type: create.as_deref().and_then(room_type_of_create),
                    });
                }
                Ok(out)
            })
            .await
    }

    fn queue_append(&self, event: EventWrite) -> AppendFuture {
        Box::pin(self.engine.queue(move |c, positions| insert_event(c, positions, event)))
    }

    async fn event(&self, event_id: &EventId) -> StoreResult<Option<StoredEvent>> {
        let id = event_id.to_string();
        self.engine
            .read(move |c| {
                c.prepare_cached(&format!("SELECT {EVENT_COLUMNS} FROM events e WHERE event_id = ?1"))
                    .map_err(backend)?
                    .query_row([id], event_from_row)
                    .optional()
                    .map_err(corrupt)
            })
            .await
    }

    async fn event_by_txn(&self, room_id: &RoomId, sender: &UserId, txn: &TxnRef) -> StoreResult<Option<OwnedEventId>> {
        let (r, u, txn) = (room_id.to_string(), sender.to_string(), txn.clone());
        self.engine
            .read(move |c| {
                c.prepare_cached(EVENT_BY_TXN)
                    .map_err(backend)?
                    .query_row(params![u, txn.device_id, r, txn.scope, txn.txn_id], |r| parse(r.get(0)?))
                    .optional()
                    .map_err(corrupt)
            })
            .await
    }

    async fn room_position(&self, room_id: &RoomId, from: StreamPos, direction: Direction, count: usize) -> StoreResult<Option<StreamPos>> {
        if count == 0 {
            return Ok(None);
        }
        let (room, from) = (room_id.to_string(), from.min(i64::MAX as u64) as i64);
        let offset = (count - 1).min(i64::MAX as usize) as i64;
        let sql = match direction {
            Direction::Backward => "SELECT pos FROM events WHERE room_id = ?1 AND pos <= ?2 ORDER BY pos DESC LIMIT 1 OFFSET ?3",
            Direction::Forward => "SELECT pos FROM events WHERE room_id = ?1 AND pos > ?2 ORDER BY pos ASC LIMIT 1 OFFSET ?3",
        };
        self.engine
            .read(move |c| {
                c.prepare_cached(sql)
                    .map_err(backend)?
                    .query_row(params![room, from, offset], |r| r.get::<_, i64>(0))
                    .optional()
                    .map(|p| p.map(|p| p as StreamPos))
                    .map_err(backend)
            })
            .await
    }

    async fn room_events(&self, range: EventRange<'_>) -> StoreResult<Vec<StoredEvent>> {
        let room = range.room_id.to_string();
        let after = range.after.min(i64::MAX as u64) as i64;
        let until = range.until.min(i64::MAX as u64) as i64;
        let limit = range.limit.min(10_000) as i64;
        let order = match range.direction {
            Direction::Forward => "ASC",
            Direction::Backward => "DESC",
        };
        // The types as one JSON array: one cached statement serves every list.
        let kinds = range.kinds.map(|k| serde_json::to_string(k).expect("strings serialize"));
        let not_kinds = serde_json::to_string(range.not_kinds).expect("strings serialize");
        self.engine
            .read(move |c| {
                // events_by_room holds the kind: others are skipped in the index.
                let mut st = c
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM events e WHERE room_id = ?1 AND pos > ?2 AND pos <= ?3 \
                         AND (?5 IS NULL OR kind IN (SELECT value FROM json_each(?5))) \
                         AND kind NOT IN (SELECT value FROM json_each(?6)) ORDER BY pos {order} LIMIT ?4"
                    ))
                    .map_err(backend)?;
                st.query_map(params![room, after, until, limit, kinds, not_kinds], event_from_row)
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)
            })
            .await
    }

    async fn relations(&self, room_id: &RoomId, event_id: &EventId, rel_type: Option<&str>, limit: usize) -> StoreResult<Vec<StoredEvent>> {
        let (room, id, rel) = (room_id.to_string(), event_id.to_string(), rel_type.map(str::to_owned));
        self.engine
            .read(move |c| {
                let mut st = c
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM events e WHERE relates_to = ?1 AND room_id = ?2 AND (?3 IS NULL OR rel_type = ?3) ORDER BY pos ASC LIMIT ?4"
                    ))
                    .map_err(backend)?;
                st.query_map(params![id, room, rel, limit.min(10_000) as i64], event_from_row).map_err(backend)?.collect::<Result<_, _>>().map_err(corrupt)
            })
            .await
    }

    async fn thread_roots(&self, room_id: &RoomId, limit: usize) -> StoreResult<Vec<(OwnedEventId, StreamPos)>> {
        let room = room_id.to_string();
        self.engine
            .read(move |c| {
                let mut st = c
                    .prepare_cached(
                        "SELECT relates_to, MAX(pos) AS latest FROM events WHERE room_id = ?1 AND rel_type = 'm.thread'
                         GROUP BY relates_to ORDER BY latest DESC LIMIT ?2",
                    )
                    .map_err(backend)?;
                st.query_map(params![room, limit.min(10_000) as i64], |r| {
                    Ok((parse(r.get(0)?)?, r.get::<_, i64>(1)? as u64))
                })
                .map_err(backend)?
                .collect::<Result<_, _>>()
                .map_err(corrupt)
            })
            .await
    }

    async fn current_state(&self, room_id: &RoomId) -> StoreResult<Vec<StoredEvent>> {
        let room = room_id.to_string();
        self.engine
            .read(move |c| {
                let mut st = c
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM current_state s JOIN events e ON e.pos = s.pos WHERE s.room_id = ?1 ORDER BY e.pos"
                    ))
                    .map_err(backend)?;
                st.query_map([room], event_from_row)
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)
            })
            .await
    }

    async fn state_at(&self, room_id: &RoomId, at: StreamPos) -> StoreResult<Vec<StoredEvent>> {
        let room = room_id.to_string();
        let at = at.min(i64::MAX as u64) as i64;
        self.engine
            .read(move |c| {
                // Every stored event passed the auth rules on top of the
                // state before it (one chain per room), so the newest state
                // event of each key up to `at` is the state there.
                let mut st = c
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM events e JOIN (
                            SELECT MAX(pos) AS pos FROM events
                            WHERE room_id = ?1 AND state_key IS NOT NULL AND pos <= ?2 GROUP BY kind, state_key
                         ) latest ON latest.pos = e.pos ORDER BY e.pos"
                    ))
                    .map_err(backend)?;
                st.query_map(params![room, at], event_from_row)
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)
            })
            .await
    }

    async fn state_at_page(
        &self,
        room_id: &RoomId,
        at: StreamPos,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        let room = room_id.to_string();
        let at = at.min(i64::MAX as u64) as i64;
        let limit = limit.min(i64::MAX as usize) as i64;
        let after = after.map(|(kind, key)| (kind.to_owned(), key.to_owned()));
        self.engine
            .read(move |c| {
                // As `state_at`, a range of the (room, type, state key, pos)
                // index at a time: each page walks its own keys only.
                // On the first page ?3 and ?4 are bound but unused.
                let (condition, (kind, key)) = match &after {
                    Some((kind, key)) => ("AND (kind, state_key) > (?3, ?4)", (kind.as_str(), key.as_str())),
                    None => ("", ("", "")),
                };
                let mut st = c
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM events e JOIN (
                            SELECT MAX(pos) AS pos FROM events
                            WHERE room_id = ?1 AND state_key IS NOT NULL AND pos <= ?2 {condition}
                            GROUP BY kind, state_key ORDER BY kind, state_key LIMIT ?5
                         ) latest ON latest.pos = e.pos ORDER BY e.kind, e.state_key"
                    ))
                    .map_err(backend)?;
                st.query_map(params![room, at, kind, key, limit], event_from_row)
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)
            })
            .await
    }

    async fn state_history(&self, room_id: &RoomId, kind: &str, state_key: &str) -> StoreResult<Vec<StoredEvent>> {
        let (room, kind, key) = (room_id.to_string(), kind.to_owned(), state_key.to_owned());
        self.engine
            .read(move |c| {
                let mut st = c
                    .prepare_cached(&format!(
                        "SELECT {EVENT_COLUMNS} FROM events e WHERE room_id = ?1 AND kind = ?2 AND state_key = ?3 ORDER BY pos"
                    ))
                    .map_err(backend)?;
                st.query_map(params![room, kind, key], event_from_row)
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)
            })
            .await
    }

    async fn member_joins(
        &self,
        room_id: &RoomId,
        after: StreamPos,
        until: StreamPos,
        limit: usize,
    ) -> StoreResult<Vec<(OwnedUserId, StreamPos)>> {
        let room = room_id.to_string();
        let (after, until) = (after.min(i64::MAX as u64) as i64, until.min(i64::MAX as u64) as i64);
        let limit = limit.min(i64::MAX as usize) as i64;
        self.engine
            .read(move |c| {
                // SQLite picks the membership out of the stored JSON: no
                // event is parsed whole on this side.
                let mut st = c
                    .prepare_cached(
                        "SELECT state_key, pos FROM events
                         WHERE room_id = ?1 AND pos > ?2 AND pos <= ?3 AND kind = 'm.room.member'
                           AND json_extract(json, '$.content.membership') = 'join'
                         ORDER BY pos LIMIT ?4",
                    )
                    .map_err(backend)?;
                let rows: Vec<(String, i64)> = st
                    .query_map(params![room, after, until, limit], |r| Ok((r.get(0)?, r.get(1)?)))
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)?;
                rows.into_iter()
                    .map(|(user, pos)| Ok((OwnedUserId::try_from(user).map_err(corrupt)?, pos as u64)))
                    .collect()
            })
            .await
    }

    async fn membership_history(&self, room_id: &RoomId, user_id: &UserId) -> StoreResult<Vec<MembershipRecord>> {
        let (room, user) = (room_id.to_string(), user_id.to_string());
        self.engine
            .read(move |c| {
                let mut st = c
                    .prepare_cached("SELECT pos, event_id, json FROM events WHERE room_id = ?1 AND kind = 'm.room.member' AND state_key = ?2 ORDER BY pos")
                    .map_err(backend)?;
                let rows: Vec<(i64, String, String)> =
                    st.query_map(params![room, user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).map_err(backend)?.collect::<Result<_, _>>().map_err(corrupt)?;
                rows.into_iter()
                    .map(|(pos, event_id, json)| {
                        let v: serde_json::Value = serde_json::from_str(&json).map_err(corrupt)?;
                        Ok(MembershipRecord {
                            room_id: OwnedRoomId::try_from(room.as_str()).map_err(corrupt)?,
                            membership: v["content"]["membership"].as_str().and_then(Membership::parse).unwrap_or(Membership::Leave),
                            pos: pos as u64,
                            event_id: OwnedEventId::try_from(event_id).map_err(corrupt)?,
                        })
                    })
                    .collect()
            })
            .await
    }

    async fn memberships(&self, user_id: &UserId) -> StoreResult<Vec<MembershipRecord>> {
        let user = user_id.to_string();
        self.engine
            .read(move |c| {
                let mut st = c
                    .prepare_cached("SELECT room_id, membership, pos, event_id FROM memberships WHERE user_id = ?1 ORDER BY pos")
                    .map_err(backend)?;
                st.query_map([user], membership_from_row)
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)
            })
            .await
    }

    async fn forget_room(&self, user_id: &UserId, room_id: &RoomId) -> StoreResult<StreamPos> {
        let (user, room) = (user_id.to_owned(), room_id.to_string());
        self.engine
            .write(move |c, positions| {
                exec(
                    c,
                    "DELETE FROM memberships WHERE user_id = ?1 AND room_id = ?2 AND membership IN ('leave', 'ban')",
                    [user.as_str(), &room],
                )
                .map_err(backend)?;
                let pos = positions.allocate();
                positions.change(c, pos, Change::Memberships { user_id: user })?;
                Ok(pos)
            })
            .await
    }

    async fn set_alias(&self, alias: &str, room_id: &RoomId, creator: &UserId) -> StoreResult<()> {
        let (a, r, u) = (alias.to_owned(), room_id.to_string(), creator.to_string());
        self.engine
            .write(move |c, _| {
                exec(c, "INSERT INTO aliases (alias, room_id, creator) VALUES (?1, ?2, ?3)", [a, r, u])
                    .map(|_| ())
                    .map_err(conflict_or_backend("alias exists"))
            })
            .await
    }

    async fn alias(&self, alias: &str) -> StoreResult<Option<(OwnedRoomId, OwnedUserId)>> {
        let a = alias.to_owned();
        self.engine
            .read(move |c| {
                c.query_row("SELECT room_id, creator FROM aliases WHERE alias = ?1", [a], |r| {
                    Ok((parse(r.get(0)?)?, parse(r.get(1)?)?))
                })
                .optional()
                .map_err(corrupt)
            })
            .await
    }

    async fn delete_alias(&self, alias: &str) -> StoreResult<bool> {
        let a = alias.to_owned();
        self.engine
            .write(move |c, _| exec(c, "DELETE FROM aliases WHERE alias = ?1", [a]).map(|n| n > 0).map_err(backend))
            .await
    }

    async fn room_aliases(&self, room_id: &RoomId) -> StoreResult<Vec<String>> {
        let r = room_id.to_string();
        self.engine
            .read(move |c| {
                let mut st = c
                    .prepare_cached("SELECT alias FROM aliases WHERE room_id = ?1 ORDER BY alias")
                    .map_err(backend)?;
                st.query_map([r], |r| r.get(0))
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)
            })
            .await
    }
}

#[async_trait]
impl StreamStore for SqliteStore {
    fn current_position(&self) -> StreamPos {
        self.engine.committed()
    }

    async fn committed_position(&self) -> StoreResult<StreamPos> {
        // One process writes an embedded database: what it committed is the head.
        Ok(self.engine.committed())
    }

    async fn updates_after(&self, after: StreamPos, limit: usize) -> StoreResult<CommittedBatch> {
        let head = self.engine.committed();
        let limit = limit.clamp(1, 10_000);
        if after >= head {
            return Ok(CommittedBatch {
                after,
                head: after,
                updates: vec![],
            });
        }
        self.engine
            .read(move |c| {
                let (from, to) = (after.min(i64::MAX as u64) as i64, head as i64);
                let mut st = c
                    .prepare_cached(&format!("SELECT {EVENT_COLUMNS} FROM events e WHERE pos > ?1 AND pos <= ?2 ORDER BY pos LIMIT ?3"))
                    .map_err(backend)?;
                let events: Vec<StoredEvent> = st
                    .query_map(params![from, to, limit as i64], event_from_row)
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)?;
                let mut st = c
                    .prepare_cached(
                        "SELECT pos, kind, user_id, room_id, device_id FROM stream_changes WHERE pos > ?1 AND pos <= ?2 ORDER BY pos, rowid LIMIT ?3",
                    )
                    .map_err(backend)?;
                let changes: Vec<StreamUpdate> = st
                    .query_map(params![from, to, limit as i64], change_from_row)
                    .map_err(backend)?
                    .collect::<Result<_, _>>()
                    .map_err(corrupt)?;
                Ok(replay_batch(after, head, limit, events, changes))
            })
            .await
    }

    fn set_commit_listener(&self, listener: Arc<dyn CommitListener>) {
        self.engine.set_listener(listener);
    }
}

fn change_from_row(r: &Row<'_>) -> rusqlite::Result<StreamUpdate> {
    let kind: String = r.get(1)?;
    let change = Change::from_record(&kind, r.get(2)?, r.get(3)?, r.get(4)?)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into()))?;
    Ok(StreamUpdate {
        pos: r.get::<_, i64>(0)? as StreamPos,
        change,
    })
}

#[async_trait]
impl UserDataStore for SqliteStore {
    async fn put_account_data(&self, user_id: &UserId, room_id: Option<&RoomId>, kind: &str, content: &str) -> StoreResult<StreamPos> {
        let (u, r, k, v) = (
            user_id.to_owned(),
            room_id.map(|r| r.to_string()).unwrap_or_default(),
            kind.to_owned(),
            content.to_owned(),
        );
        self.engine
            .write(move |c, positions| {
                let pos = positions.allocate();
                exec(
                    c,
                    "INSERT INTO account_data (user_id, room_id, kind, content, pos) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (user_id, room_id, kind) DO UPDATE SET content = excluded.content, pos = excluded.pos",
                    params![u.as_str(), r, k, v, pos as i64],
                )
                .map_err(backend)?;
                positions.change(c, pos, Change::AccountData { user_id: u })?;
                Ok(pos)
            })
            .await
    }

    async fn account_data(&self, user_id: &UserId, room_id: Option<&RoomId>, kind: &str) -> StoreResult<Option<String>> {
        let (u, r, k) = (
            user_id.to_string(),
            room_id.map(|r| r.to_string()).unwrap_or_default(),
            kind.to_owned(),
        );
        self.engine
            .read(move |c| {
                c.prepare_cached("SELECT content FROM account_data WHERE user_id = ?1 AND room_id = ?2 AND kind = ?3")
                    .map_err(backend)?
                    .query_row([u, r, k], |r| r.get(0))
                    .optional()
                    .map_err(corrupt)
            })
            .await
    }

    async fn account_data_since(&self, user_id: &UserId, since: StreamPos) -> StoreResult<Vec<AccountDataRecord>> {
        let u = user_id.to_string();
        self.engine
            .read(move |c| {
                let mut st = c
                    .prepare_cached("SELECT room_id, kind, content, pos FROM account_data WHERE user_id = ?1 AND pos > ?2 ORDER BY pos")
                    .map_err(backend)?;
                st.query_map(params![u, since.min(i64::MAX as u64) as i64], |r| {
                    let room: String = r.get(0)?;
                    Ok(AccountDataRecord {
                        room_id: if room.is_empty() { None } else { Some(parse(room)?) },
                        kind: r.get(1)?,
                        content: r.get::<_, String>(2)?.into(),
                        pos: r.get::<_, i64>(3)? as u64,
                    })
                })
                .map_err(backend)?
                .collect::<Result<_, _>>()
                .map_err(corrupt)
            })
            .await
    }

    async fn put_receipt(&self, rc: ReceiptRecord) -> StoreResult<StreamPos> {
        self.engine
            .write(move |c, positions| {
                let pos = positions.allocate();
                exec(c,
                    "INSERT INTO receipts (room_id, user_id, receipt_type, thread_id, event_id, ts_ms, pos) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (room_id, user_id, receipt_type, thread_id) DO UPDATE SET event_id = excluded.event_id, ts_ms = excluded.ts_ms, pos = excluded.pos",
                    params![
                        rc.room_id.as_str(),
                        rc.user_id.as_str(),
                        rc.receipt_type,
                        rc.thread_id.unwrap_or_default(),
                        rc.event_id.as_str(),
                        rc.ts_ms as i64,
                        pos as i64
                    ],
                )
                .map_err(backend)?;
                positions.change(c, pos, Change::Receipt {
                        room_id: rc.room_id,
                        user_id: Some(rc.user_id),
                    })?;
                Ok(pos)
            })
            .await
    }

    async fn receipt(&self, room_id: &RoomId, user_id: &UserId, receipt_type: &str) -> StoreResult<Option<ReceiptRecord>> {
        let (r, u, t) = (room_id.to_string(), user_id.to_string(), receipt_type.to_owned());
        self.engine
            .read(move |c| {
                c.prepare_cached(
                    "SELECT room_id, user_id, receipt_type, thread_id, event_id, ts_ms, pos FROM receipts
                     WHERE room_id = ?1 AND user_id = ?2 AND receipt_type = ?3 AND thread_id = ''",
                )
                .map_err(backend)?
                .query_row([r, u, t], receipt_from_row)
                .optional()
                .map_err(corrupt)
            })
            .await
    }

    async fn receipts_since(&self, room_id: &RoomId, since: StreamPos, by: Option<&UserId>) -> StoreResult<Vec<ReceiptRecord>> {
        let (r, by) = (room_id.to_string(), by.map(|u| u.to_string()));
        let since = since.min(i64::MAX as u64) as i64;
        self.engine
            .read(move |c| {
                let rows = match by {
                    // One user's receipts are a few rows of the primary key:
                    // `+pos` keeps SQLite from walking the room's index by
                    // position instead (every receipt in the room).
                    Some(user) => c
                        .prepare_cached(
                            "SELECT room_id, user_id, receipt_type, thread_id, event_id, ts_ms, pos FROM receipts
                             WHERE room_id = ?1 AND user_id = ?3 AND +pos > ?2 ORDER BY +pos",
                        )
                        .map_err(backend)?
                        .query_map(params![r, since, user], receipt_from_row)
                        .map_err(backend)?
                        .collect::<Result<_, _>>(),
                    None => c
                        .prepare_cached("SELECT room_id, user_id, receipt_type, thread_id, event_id, ts_ms, pos FROM receipts WHERE room_id = ?1 AND pos > ?2 ORDER BY pos")
                        .map_err(backend)?
                        .query_map(params![r, since], receipt_from_row)
                        .map_err(backend)?
                        .collect::<Result<_, _>>(),
                };
                rows.map_err(corrupt)
            })
            .await
    }

    async fn put_filter(&self, user_id: &UserId, filter_json: &str) -> StoreResult<String> {
        let (u, j) = (user_id.to_string(), filter_json.to_owned());
        self.engine
            .write(move |c, _| {
                let next: i64 = c
                    .prepare_cached("SELECT COALESCE(MAX(filter_id), -1) + 1 FROM filters WHERE user_id = ?1")
                    .and_then(|mut stmt| stmt.query_row([&u], |r| r.get(0)))
                    .map_err(backend)?;
                exec(
                    c,
                    "INSERT INTO filters (user_id, filter_id, json) VALUES (?1, ?2, ?3)",
                    params![u, next, j],
                )
                .map_err(backend)?;
                Ok(next.to_string())
            })
            .await
    }

    async fn filter(&self, user_id: &UserId, filter_id: &str) -> StoreResult<Option<String>> {
        let Ok(id) = filter_id.parse::<i64>() else {
            return Ok(None);
        };
        let u = user_id.to_string();
        self.engine
            .read(move |c| {
                c.query_row(
                    "SELECT json FROM filters WHERE user_id = ?1 AND filter_id = ?2",
                    params![u, id],
                    |r| r.get(0),
                )
                .optional()
                .map_err(corrupt)
            })
            .await
    }
    async fn set_pusher(&self, user_id: &UserId, app_id: &str, pushkey: &str, json: &str, replace_others: bool) -> StoreResult<()> {
        let (u, a, k, j) = (user_id.to_string(), app_id.to_owned(), pushkey.to_owned(), json.to_owned());
        self.engine
            .write(move |c, _| {
                if replace_others {
                    exec(
                        c,
                        "DELETE FROM pushers WHERE app_id = ?1 AND pushkey = ?2 AND user_id <> ?3",
                        params![a, k, u],
                    )
                    .map_err(backend)?;
                }
                // A replaced pusher keeps its place (its `created`).
                exec(
                    c,
                    "INSERT INTO pushers (user_id, app_id, pushkey, json, created) \
                     VALUES (?1, ?2, ?3, ?4, (SELECT COALESCE(MAX(created), 0) + 1 FROM pushers)) \
                     ON CONFLICT (user_id, app_id, pushkey) DO UPDATE SET json = excluded.json",
                    params![u, a, k, j],
                )
                .map_err(backend)?;
                Ok(())
            })
            .await
    }

    async fn delete_pusher(&self, user_id: &UserId, app_id: &str, pushkey: &str) -> StoreResult<bool> {
        let (u, a, k) = (user_id.to_string(), app_id.to_owned(), pushkey.to_owned());
        self.engine
            .write(move |c, _| {
                let n = exec(
                    c,
                    "DELETE FROM pushers WHERE user_id = ?1 AND app_id = ?2 AND pushkey = ?3",
                    params![u, a, k],
                )
                .map_err(backend)?;
                Ok(n > 0)
            })
            .await
    }

    async fn pushers(&self, user_id: &UserId) -> StoreResult<Vec<String>> {
        let u = user_id.to_string();
        self.engine
            .read(move |c| {
                let mut stmt = c
                    .prepare_cached("SELECT json FROM pushers WHERE user_id = ?1 ORDER BY created")
                    .map_err(corrupt)?;
                let rows = stmt.query_map([u], |r| r.get::<_, String>(0)).map_err(corrupt)?;
                rows.collect::<Result<Vec<_>, _>>().map_err(corrupt)
            })
            .await
    }
}

#[async_trait]
impl MediaStore for SqliteStore {
    async fn put_media(&self, m: MediaRecord) -> StoreResult<()> {
        self.engine
            .write(move |c, _| {
                exec(c,
                    "INSERT INTO media (media_id, content_type, filename, sha256, size, uploader, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![m.media_id, m.content_type, m.filename, m.sha256, m.size as i64, m.uploader.as_str(), m.created_ms as i64],
                )
                .map(|_| ())
                .map_err(conflict_or_backend("media id exists"))
            })
            .await
    }

    async fn media_freeze_ms(&self) -> StoreResult<u64> {
        self.engine
            .read(|c| {
                c.query_row(
                    "SELECT COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'media_freeze_ms'), 0)",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map(|v| v.max(0) as u64)
                .map_err(backend)
            })
            .await
    }

    async fn media(&self, media_id: &str) -> StoreResult<Option<MediaRecord>> {
        let id = media_id.to_owned();
        self.engine
            .read(move |c| {
                c.query_row(
                    "SELECT media_id, content_type, filename, sha256, size, uploader, created_ms FROM media WHERE media_id = ?1",
                    [id],
                    |r| {
                        Ok(MediaRecord {
                            media_id: r.get(0)?,
                            content_type: r.get(1)?,
                            filename: r.get(2)?,
                            sha256: r.get(3)?,
                            size: r.get::<_, i64>(4)? as u64,
                            uploader: parse(r.get(5)?)?,
                            created_ms: r.get::<_, i64>(6)? as u64,
                        })
                    },
                )
                .optional()
                .map_err(corrupt)
            })
            .await
    }
}

#[async_trait]
impl ServerStore for SqliteStore {
    async fn ping(&self) -> StoreResult<()> {
        self.engine
            .read(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(backend))
            .await?;
        self.engine
            .write(|conn, _| {
                exec(
                    conn,
                    "INSERT INTO meta (key, value) VALUES ('last_ping_ms', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    [std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(0)],
                )
                .map(|_| ())
                .map_err(backend)
            })
            .await
    }

    async fn signing_key(&self, generate: Vec<u8>) -> StoreResult<Vec<u8>> {
        self.engine
            .write(move |c, _| {
                exec(c, "INSERT OR IGNORE INTO meta (key, value) VALUES ('signing_key', ?1)", [&generate]).map_err(backend)?;
                c.query_row("SELECT value FROM meta WHERE key = 'signing_key'", [], |r| r.get(0))
                    .map_err(backend)
            })
            .await
    }

    async fn create_registration_token(&self, token: &str, uses_allowed: Option<u32>, expiry_ms: Option<u64>) -> StoreResult<()> {
        let t = token.to_owned();
        self.engine
            .write(move |c, _| {
                exec(
                    c,
                    "INSERT INTO registration_tokens (token, uses_allowed, expiry_ms) VALUES (?1, ?2, ?3)",
                    params![t, uses_allowed.map(i64::from), expiry_ms.map(|v| v as i64)],
                )
                .map(|_| ())
                .map_err(conflict_or_backend("token exists"))
            })
            .await
    }

    async fn use_registration_token(&self, token: &str, now_ms: u64) -> StoreResult<bool> {
        let t = token.to_owned();
        self.engine
            .write(move |c, _| {
                exec(
                    c,
                    "UPDATE registration_tokens SET completed = completed + 1 WHERE token = ?1
                     AND (uses_allowed IS NULL OR completed < uses_allowed) AND (expiry_ms IS NULL OR expiry_ms > ?2)",
                    params![t, now_ms as i64],
                )
                .map(|n| n > 0)
                .map_err(backend)
            })
            .await
    }

    async fn registration_token_valid(&self, token: &str, now_ms: u64) -> StoreResult<bool> {
        let t = token.to_owned();
        self.engine
            .read(move |c| {
                c.query_row(
                    "SELECT COUNT(*) FROM registration_tokens WHERE token = ?1 AND (uses_allowed IS NULL OR completed < uses_allowed) AND (expiry_ms IS NULL OR expiry_ms > ?2)",
                    params![t, now_ms as i64],
                    |r| r.get::<_, i64>(0),
                )
                .map(|n| n > 0)
                .map_err(backend)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("kabar.db")).unwrap();
        kabar_store::conformance::run_all(Arc::new(store)).await;
    }

    #[tokio::test]
    async fn positions_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kabar.db");
        let u = ruma::owned_user_id!("@a:localhost");
        let first = {
            let store = SqliteStore::open(&path).unwrap();
            let p = store.put_account_data(&u, None, "x", "{}").await.unwrap();
            store.close();
            p
        };
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.current_position(), first);
        let second = store.put_account_data(&u, None, "y", "{}").await.unwrap();
        assert!(second > first, "positions are never reused after a restart");
    }

    #[tokio::test]
    async fn a_version_one_database_is_migrated_and_keeps_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kabar.db");
        {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(&format!("{} PRAGMA user_version = 1;", include_str!("schema.sql")))
                .unwrap();
            c.execute("INSERT INTO users (user_id, created_ms) VALUES ('@old:localhost', 1)", [])
                .unwrap();
            c.execute(
                "INSERT INTO events (pos, event_id, room_id, sender, kind, json, txn_device, txn_id)
                 VALUES (1, '$old', '!r:localhost', '@old:localhost', 'm.room.message', '{}', 'D', 't1')",
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let old = ruma::owned_user_id!("@old:localhost");
        assert!(store.user(&old).await.unwrap().is_some(), "data from before the migration stays");
        assert!(store.put_device_keys(&old, "D", "{}").await.unwrap().is_some(), "new tables exist");
        let retried = TxnRef {
            device_id: "D".into(),
            txn_id: "t1".into(),
            scope: "send/m.room.message".into(),
        };
        assert_eq!(
            store
                .event_by_txn(ruma::room_id!("!r:localhost"), &old, &retried)
                .await
                .unwrap()
                .map(|id| id.to_string()),
            Some("$old".to_owned()),
            "a transaction from before the migration is still recognised on its path"
        );
        assert!(store.media_freeze_ms().await.unwrap() > 0);
        store.close();
        let version: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, engine::SCHEMA_VERSION);
    }

    #[tokio::test]
    async fn concurrent_writes_share_commits_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("kabar.db")).unwrap();
        let u = ruma::owned_user_id!("@a:localhost");
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let s = store.clone();
                let u = u.clone();
                tokio::spawn(async move { s.put_account_data(&u, None, &format!("k{i}"), "{}").await.unwrap() })
            })
            .collect();
        let mut positions = Vec::new();
        for t in tasks {
            positions.push(t.await.unwrap());
        }
        positions.sort();
        positions.dedup();
        assert_eq!(positions.len(), 200, "every write got its own position");
        assert_eq!(store.account_data_since(&u, 0).await.unwrap().len(), 200);
    }
}
