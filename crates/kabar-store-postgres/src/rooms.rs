//! Rooms, events, state and memberships.

use async_trait::async_trait;
use kabar_store::*;
use ruma::{EventId, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId};
use sqlx::PgConnection;

use crate::{
    EVENT_COLUMNS, PostgresStore,
    engine::{Positions, backend, corrupt, db_error},
    event_from_row, events_from_rows, get, parse, pos,
};

const EVENT_BY_TXN: &str =
    "SELECT event_id FROM events WHERE sender = $1 AND txn_device = $2 AND room_id = $3 AND txn_scope = $4 AND txn_id = $5";

/// The position and id of the room's newest event (0 and `None` for none).
async fn room_head(c: &mut PgConnection, room_id: &str) -> StoreResult<(StreamPos, Option<String>)> {
    let row = sqlx::query("SELECT pos, event_id FROM events WHERE room_id = $1 ORDER BY pos DESC LIMIT 1")
        .bind(room_id)
        .fetch_optional(&mut *c)
        .await
        .map_err(backend)?;
    match row {
        Some(row) => Ok((get::<i64>(&row, 0)? as StreamPos, Some(get(&row, 1)?))),
        None => Ok((0, None)),
    }
}

/// Whether an append is one statement: an event that is neither state nor
/// a redaction touches no table but `events` (most of what is sent).
fn is_plain(w: &EventWrite) -> bool {
    w.pdu.state_key.is_none() && w.redacted_target.is_none()
}

/// Appends plain events (see [`is_plain`]) of different rooms in one
/// statement: for each, the transaction-id lookup, the room-head check and
/// the insert, so a batch of messages costs one round trip to the database.
/// The accepted ones take the batch's next positions in order; the others
/// take none. One outcome per write, in order.
pub(crate) async fn insert_plain_events(
    c: &mut PgConnection,
    positions: &mut Positions,
    writes: Vec<EventWrite>,
) -> StoreResult<Vec<AppendOutcome>> {
    let n = writes.len();
    let mut event_ids = Vec::with_capacity(n);
    let mut room_ids = Vec::with_capacity(n);
    let mut senders = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut jsons = Vec::with_capacity(n);
    let mut expected = Vec::with_capacity(n);
    let (mut txn_devices, mut txn_ids, mut txn_scopes) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let (mut relates_to, mut rel_types) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for w in &writes {
        event_ids.push(w.pdu.event_id.as_str());
        room_ids.push(w.pdu.room_id.as_str());
        senders.push(w.pdu.sender.as_str());
        kinds.push(w.pdu.kind.to_string());
        jsons.push(&*w.pdu.json);
        expected.push(w.expected_head.as_ref().map(|h| h.as_str()));
        txn_devices.push(w.txn.as_ref().map(|t| t.device_id.as_str()));
        txn_ids.push(w.txn.as_ref().map(|t| t.txn_id.as_str()));
        txn_scopes.push(w.txn.as_ref().map(|t| t.scope.as_str()));
        relates_to.push(w.relation.as_ref().map(|(id, _)| id.as_str()));
        rel_types.push(w.relation.as_ref().map(|(_, t)| t.as_str()));
    }
    let rows = sqlx::query(
        "WITH input AS (
            SELECT * FROM unnest($2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[], $7::TEXT[],
                                 $8::TEXT[], $9::TEXT[], $10::TEXT[], $11::TEXT[], $12::TEXT[])
            WITH ORDINALITY AS i(event_id, room_id, sender, kind, json, expected, txn_device, txn_id, txn_scope, relates_to, rel_type, ord)
         ), checked AS (
            SELECT i.*,
                (SELECT e.event_id FROM events e
                 WHERE i.txn_device IS NOT NULL AND e.sender = i.sender AND e.txn_device = i.txn_device
                   AND e.room_id = i.room_id AND e.txn_scope = i.txn_scope AND e.txn_id = i.txn_id) AS dup,
                COALESCE(h.pos, 0) AS head, h.event_id AS head_id
            FROM input i
            LEFT JOIN LATERAL (SELECT e.pos, e.event_id FROM events e WHERE e.room_id = i.room_id ORDER BY e.pos DESC LIMIT 1) h ON TRUE
         ), accepted AS (
            SELECT c.*, $1::BIGINT + ROW_NUMBER() OVER (ORDER BY c.ord) - 1 AS pos FROM checked c
            WHERE c.dup IS NULL AND (c.expected IS NULL OR c.head_id = c.expected)
         ), ins AS (
            INSERT INTO events (pos, event_id, room_id, sender, kind, state_key, json, txn_device, txn_id, txn_scope, relates_to, rel_type)
            SELECT pos, event_id, room_id, sender, kind, NULL, json, txn_device, txn_id, txn_scope, relates_to, rel_type FROM accepted
         )
         SELECT c.dup, c.head, a.pos FROM checked c LEFT JOIN accepted a ON a.ord = c.ord ORDER BY c.ord",
    )
    .bind(positions.peek() as i64)
    .bind(&event_ids)
    .bind(&room_ids)
    .bind(&senders)
    .bind(&kinds)
    .bind(&jsons)
    .bind(&expected)
    .bind(&txn_devices)
    .bind(&txn_ids)
    .bind(&txn_scopes)
    .bind(&relates_to)
    .bind(&rel_types)
    .fetch_all(&mut *c)
    .await
    .map_err(db_error("an event of this batch exists"))?;
    if rows.len() != n {
        return Err(StoreError::Corrupt(format!("{n} appends answered with {} rows", rows.len())));
    }
    let mut outcomes = Vec::with_capacity(n);
    for (w, row) in writes.into_iter().zip(rows) {
        if let Some(existing) = get::<Option<String>>(&row, 0)? {
            outcomes.push(AppendOutcome::Duplicate(parse(existing)?));
            continue;
        }
        let Some(at) = get::<Option<i64>>(&row, 2)? else {
            outcomes.push(AppendOutcome::HeadMoved {
                head: get::<i64>(&row, 1)? as StreamPos,
            });
            continue;
        };
        let p = positions.allocate();
        if p != at as StreamPos {
            return Err(StoreError::Corrupt(format!("an append landed at {at}, expected {p}")));
        }
        positions.appended(p, w);
        outcomes.push(AppendOutcome::Appended(p));
    }
    Ok(outcomes)
}

/// Inserts one event and applies its effects, inside the batch.
async fn insert_event(c: &mut PgConnection, positions: &mut Positions, w: EventWrite) -> StoreResult<AppendOutcome> {
    let pdu = &w.pdu;
    if let Some(txn) = &w.txn {
        let existing = sqlx::query(EVENT_BY_TXN)
            .bind(pdu.sender.as_str())
            .bind(&txn.device_id)
            .bind(pdu.room_id.as_str())
            .bind(&txn.scope)
            .bind(&txn.txn_id)
            .fetch_optional(&mut *c)
            .await
            .map_err(backend)?;
        if let Some(row) = existing {
            return Ok(AppendOutcome::Duplicate(parse(get(&row, 0)?)?));
        }
    }
    if let Some(expected) = &w.expected_head {
        // Under the stream-head lock every process's batches run one at a
        // time, so the head read here is the head the insert lands on.
        let (head, newest) = room_head(c, pdu.room_id.as_str()).await?;
        if newest.as_deref() != Some(expected.as_str()) {
            return Ok(AppendOutcome::HeadMoved { head });
        }
    }
    let p = positions.allocate();
    let (rel_to, rel_type) = match &w.relation {
        Some((id, t)) => (Some(id.as_str()), Some(t.as_str())),
        None => (None, None),
    };
    sqlx::query(
        "INSERT INTO events (pos, event_id, room_id, sender, kind, state_key, json, txn_device, txn_id, txn_scope, relates_to, rel_type,
                             replaces_state, prev_sender, prev_content)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(p as i64)
    .bind(pdu.event_id.as_str())
    .bind(pdu.room_id.as_str())
    .bind(pdu.sender.as_str())
    .bind(pdu.kind.to_string())
    .bind(&pdu.state_key)
    .bind(&*pdu.json)
    .bind(w.txn.as_ref().map(|t| t.device_id.as_str()))
    .bind(w.txn.as_ref().map(|t| t.txn_id.as_str()))
    .bind(w.txn.as_ref().map(|t| t.scope.as_str()))
    .bind(rel_to)
    .bind(rel_type)
    .bind(w.prev.as_ref().map(|p| p.event_id.as_str()))
    .bind(w.prev.as_ref().map(|p| p.sender.as_str()))
    .bind(w.prev.as_ref().map(|p| p.content.as_str()))
    .execute(&mut *c)
    .await
    .map_err(db_error(&format!("event {} exists", pdu.event_id)))?;
    if let Some(state_key) = &pdu.state_key {
        sqlx::query(
            "INSERT INTO current_state (room_id, kind, state_key, pos) VALUES ($1, $2, $3, $4)
             ON CONFLICT (room_id, kind, state_key) DO UPDATE SET pos = excluded.pos",
        )
        .bind(pdu.room_id.as_str())
        .bind(pdu.kind.to_string())
        .bind(state_key)
        .bind(p as i64)
        .execute(&mut *c)
        .await
        .map_err(backend)?;
        if pdu.kind == ruma::events::TimelineEventType::RoomMember {
            let membership = Membership::from_content(pdu.content.get()).unwrap_or(Membership::Leave);
            // The position moves only when the membership does: a profile
            // change is not a new join.
            sqlx::query(
                "INSERT INTO memberships (user_id, room_id, membership, pos, event_id) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_id, room_id) DO UPDATE SET
                    pos = CASE WHEN memberships.membership = excluded.membership THEN memberships.pos ELSE excluded.pos END,
                    membership = excluded.membership, event_id = excluded.event_id",
            )
            .bind(state_key)
            .bind(pdu.room_id.as_str())
            .bind(membership.as_str())
            .bind(p as i64)
            .bind(pdu.event_id.as_str())
            .execute(&mut *c)
            .await
            .map_err(backend)?;
        }
        if pdu.kind == ruma::events::TimelineEventType::RoomJoinRules {
            let rule = serde_json::from_str::<serde_json::Value>(pdu.content.get())
                .ok()
                .and_then(|c| c.get("join_rule").and_then(|r| r.as_str()).map(str::to_owned));
            sqlx::query("UPDATE rooms SET join_rule = $2 WHERE room_id = $1")
                .bind(pdu.room_id.as_str())
                .bind(rule)
                .execute(&mut *c)
                .await
                .map_err(backend)?;
        }
    }
    if let Some((target, redacted_json)) = &w.redacted_target {
        sqlx::query("UPDATE events SET json = $2, redacted_by = $3 WHERE event_id = $1 AND room_id = $4")
            .bind(target.as_str())
            .bind(redacted_json)
            .bind(pdu.event_id.as_str())
            .bind(pdu.room_id.as_str())
            .execute(&mut *c)
            .await
            .map_err(backend)?;
        // The state events that replaced the target show its content as it
        // is now (`json`, not `jsonb`: the text is kept as written).
        sqlx::query("UPDATE events SET prev_content = ($2::json -> 'content')::text WHERE replaces_state = $1 AND room_id = $3")
            .bind(target.as_str())
            .bind(redacted_json)
            .bind(pdu.room_id.as_str())
            .execute(&mut *c)
            .await
            .map_err(backend)?;
    }
    positions.appended(p, w);
    Ok(AppendOutcome::Appended(p))
}

fn membership_from_row(row: &sqlx::postgres::PgRow) -> StoreResult<MembershipRecord> {
    let m: String = get(row, 1)?;
    Ok(MembershipRecord {
        room_id: parse(get(row, 0)?)?,
        membership: Membership::parse(&m).unwrap_or(Membership::Leave),
        pos: get::<i64>(row, 2)? as u64,
        event_id: parse(get(row, 3)?)?,
    })
}

#[async_trait]
impl RoomStore for PostgresStore {
    async fn create_room(&self, room: RoomRecord, events: Vec<EventWrite>) -> StoreResult<Vec<StreamPos>> {
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO rooms (room_id, version, creator, is_public) VALUES ($1, $2, $3, $4)")
                        .bind(room.room_id.as_str())
                        .bind(room.version.as_str())
                        .bind(room.creator.as_str())
                        .bind(room.is_public)
                        .execute(&mut *c)
                        .await
                        .map_err(db_error("room exists"))?;
                    let mut out = Vec::with_capacity(events.len());
                    for w in events {
                        match insert_event(c, positions, w).await? {
                            AppendOutcome::Appended(p) => out.push(p),
                            AppendOutcome::Duplicate(_) | AppendOutcome::HeadMoved { .. } => {
                                return Err(StoreError::Conflict("room creation must start the room's chain".into()));
                            }
                        }
                    }
                    Ok(out)
                })
            })
            .await
    }

    async fn room(&self, room_id: &RoomId) -> StoreResult<Option<RoomRecord>> {
        let row = self
            .read(
                sqlx::query("SELECT room_id, version, creator, is_public FROM rooms WHERE room_id = $1")
                    .bind(room_id.as_str())
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.map(|r| {
            Ok(RoomRecord {
                room_id: parse(get(&r, 0)?)?,
                version: RoomVersionId::try_from(get::<String>(&r, 1)?).map_err(corrupt)?,
                creator: parse(get(&r, 2)?)?,
                is_public: get(&r, 3)?,
            })
        })
        .transpose()
    }

    async fn set_room_public(&self, room_id: &RoomId, public: bool) -> StoreResult<()> {
        let id = room_id.to_string();
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    sqlx::query("UPDATE rooms SET is_public = $2 WHERE room_id = $1")
                        .bind(id)
                        .bind(public)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    Ok(())
                })
            })
            .await
    }

    async fn public_rooms(&self) -> StoreResult<Vec<OwnedRoomId>> {
        let rows = self
            .read(sqlx::query("SELECT room_id FROM rooms WHERE is_public ORDER BY room_id").fetch_all(&self.engine.pool))
            .await?;
        rows.iter().map(|r| parse(get(r, 0)?)).collect()
    }

    async fn room_list_entries(&self, room_ids: &[OwnedRoomId], bump_kinds: &[&str]) -> StoreResult<Vec<RoomListEntry>> {
        // One query for every room: index lookups per room, as lateral subqueries.
        let ids: Vec<&str> = room_ids.iter().map(|r| r.as_str()).collect();
        let rows = self
            .read(
                sqlx::query(
                    "SELECT r.id, \
                        (SELECT pos FROM events e WHERE e.room_id = r.id AND e.kind = ANY($2) ORDER BY pos DESC LIMIT 1), \
                        (SELECT MAX(pos) FROM events e WHERE e.room_id = r.id), \
                        EXISTS (SELECT 1 FROM events e WHERE e.room_id = r.id AND e.kind = 'm.room.encryption' AND e.state_key = ''), \
                        (SELECT json FROM events e WHERE e.room_id = r.id AND e.kind = 'm.room.create' AND e.state_key = '' LIMIT 1) \
                     FROM unnest($1::text[]) AS r(id)",
                )
                .bind(&ids)
                .bind(bump_kinds)
                .fetch_all(&self.engine.pool),
            )
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let last: Option<i64> = get(row, 2)?;
            let Some(last) = last else { continue };
            let bumped: Option<i64> = get(row, 1)?;
            let create: Option<String> = get(row, 4)?;
            out.push(RoomListEntry {
                room_id: parse(get(row, 0)?)?,
                bump: bumped.unwrap_or(last) as StreamPos,
                encrypted: get(row, 3)?,
                room_type: create.as_deref().and_then(kabar_store::room_type_of_create),
            });
        }
        Ok(out)
    }

    fn queue_append(&self, event: EventWrite) -> AppendFuture {
        if is_plain(&event) {
            return Box::pin(self.engine.queue_plain(event));
        }
        Box::pin(
            self.engine
                .queue(move |c, positions| Box::pin(async move { insert_event(c, positions, event).await })),
        )
    }

    async fn event(&self, event_id: &EventId) -> StoreResult<Option<StoredEvent>> {
        let row = self
            .read(
                sqlx::query(&format!("SELECT {EVENT_COLUMNS} FROM events e WHERE event_id = $1"))
                    .bind(event_id.as_str())
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.as_ref().map(event_from_row).transpose()
    }

    async fn event_by_txn(&self, room_id: &RoomId, sender: &UserId, txn: &TxnRef) -> StoreResult<Option<OwnedEventId>> {
        let row = self
            .read(
                sqlx::query(EVENT_BY_TXN)
                    .bind(sender.as_str())
                    .bind(&txn.device_id)
                    .bind(room_id.as_str())
                    .bind(&txn.scope)
                    .bind(&txn.txn_id)
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.map(|r| parse(get(&r, 0)?)).transpose()
    }

    async fn room_position(&self, room_id: &RoomId, from: StreamPos, direction: Direction, count: usize) -> StoreResult<Option<StreamPos>> {
        if count == 0 {
            return Ok(None);
        }
        let sql = match direction {
            Direction::Backward => "SELECT pos FROM events WHERE room_id = $1 AND pos <= $2 ORDER BY pos DESC LIMIT 1 OFFSET $3",
            Direction::Forward => "SELECT pos FROM events WHERE room_id = $1 AND pos > $2 ORDER BY pos ASC LIMIT 1 OFFSET $3",
        };
        let row: Option<(i64,)> = self
            .read(
                sqlx::query_as(sql)
                    .bind(room_id.as_str())
                    .bind(pos(from))
                    .bind(count.saturating_sub(1).min(i64::MAX as usize) as i64)
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        Ok(row.map(|(p,)| p as StreamPos))
    }

    async fn room_events(&self, range: EventRange<'_>) -> StoreResult<Vec<StoredEvent>> {
        let order = match range.direction {
            Direction::Forward => "ASC",
            Direction::Backward => "DESC",
        };
        let kinds: Option<Vec<String>> = range.kinds.map(<[String]>::to_vec);
        let rows = self
            .read(
                sqlx::query(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events e WHERE room_id = $1 AND pos > $2 AND pos <= $3
                     AND ($5::TEXT[] IS NULL OR kind = ANY($5)) AND NOT (kind = ANY($6)) ORDER BY pos {order} LIMIT $4"
                ))
                .bind(range.room_id.as_str())
                .bind(pos(range.after))
                .bind(pos(range.until))
                .bind(range.limit.min(10_000) as i64)
                .bind(kinds)
                .bind(range.not_kinds)
                .fetch_all(&self.engine.pool),
            )
            .await?;
        events_from_rows(rows)
    }

    async fn relations(&self, room_id: &RoomId, event_id: &EventId, rel_type: Option<&str>, limit: usize) -> StoreResult<Vec<StoredEvent>> {
        let rows = self
            .read(
                sqlx::query(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events e WHERE relates_to = $1 AND room_id = $2 AND ($3::TEXT IS NULL OR rel_type = $3)
                     ORDER BY pos ASC LIMIT $4"
                ))
                .bind(event_id.as_str())
                .bind(room_id.as_str())
                .bind(rel_type)
                .bind(limit.min(10_000) as i64)
                .fetch_all(&self.engine.pool),
            )
            .await?;
        events_from_rows(rows)
    }

    async fn thread_roots(&self, room_id: &RoomId, limit: usize) -> StoreResult<Vec<(OwnedEventId, StreamPos)>> {
        let rows = self
            .read(
                sqlx::query(
                    "SELECT relates_to, MAX(pos) AS latest FROM events WHERE room_id = $1 AND rel_type = 'm.thread'
                     GROUP BY relates_to ORDER BY latest DESC LIMIT $2",
                )
                .bind(room_id.as_str())
                .bind(limit.min(10_000) as i64)
                .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter().map(|r| Ok((parse(get(r, 0)?)?, get::<i64>(r, 1)? as u64))).collect()
    }

    async fn current_state(&self, room_id: &RoomId) -> StoreResult<Vec<StoredEvent>> {
        let rows = self
            .read(
                sqlx::query(&format!(
                    "SELECT {EVENT_COLUMNS} FROM current_state s JOIN events e ON e.pos = s.pos WHERE s.room_id = $1 ORDER BY e.pos"
                ))
                .bind(room_id.as_str())
                .fetch_all(&self.engine.pool),
            )
            .await?;
        events_from_rows(rows)
    }

    async fn state_at(&self, room_id: &RoomId, at: StreamPos) -> StoreResult<Vec<StoredEvent>> {
        // Every stored event passed the auth rules on top of the state
        // before it (one chain per room), so the newest state event of each
        // key up to `at` is the state there.
        let rows = self
            .read(
                sqlx::query(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events e JOIN (
                        SELECT MAX(pos) AS pos FROM events
                        WHERE room_id = $1 AND state_key IS NOT NULL AND pos <= $2 GROUP BY kind, state_key
                     ) latest ON latest.pos = e.pos ORDER BY e.pos"
                ))
                .bind(room_id.as_str())
                .bind(pos(at))
                .fetch_all(&self.engine.pool),
            )
            .await?;
        events_from_rows(rows)
    }

    async fn state_at_page(
        &self,
        room_id: &RoomId,
        at: StreamPos,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>> {
        // As `state_at`, a range of the (room, type, state key, pos) index
        // at a time: each page walks its own keys only.
        let condition = if after.is_some() {
            "AND (kind, state_key) > ($3, $4)"
        } else {
            "AND $3::text IS NULL AND $4::text IS NULL"
        };
        let (kind, key) = after.unzip();
        let rows = self
            .read(
                sqlx::query(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events e JOIN (
                        SELECT MAX(pos) AS pos FROM events
                        WHERE room_id = $1 AND state_key IS NOT NULL AND pos <= $2 {condition}
                        GROUP BY kind, state_key ORDER BY kind, state_key LIMIT $5
                     ) latest ON latest.pos = e.pos ORDER BY e.kind, e.state_key"
                ))
                .bind(room_id.as_str())
                .bind(pos(at))
                .bind(kind)
                .bind(key)
                .bind(limit.min(i64::MAX as usize) as i64)
                .fetch_all(&self.engine.pool),
            )
            .await?;
        events_from_rows(rows)
    }

    async fn state_history(&self, room_id: &RoomId, kind: &str, state_key: &str) -> StoreResult<Vec<StoredEvent>> {
        let rows = self
            .read(
                sqlx::query(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events e WHERE room_id = $1 AND kind = $2 AND state_key = $3 ORDER BY pos"
                ))
                .bind(room_id.as_str())
                .bind(kind)
                .bind(state_key)
                .fetch_all(&self.engine.pool),
            )
            .await?;
        events_from_rows(rows)
    }

    async fn member_joins(
        &self,
        room_id: &RoomId,
        after: StreamPos,
        until: StreamPos,
        limit: usize,
    ) -> StoreResult<Vec<(OwnedUserId, StreamPos)>> {
        // PostgreSQL picks the membership out of the stored JSON: no event
        // is parsed whole on this side.
        let rows = self
            .read(
                sqlx::query(
                    "SELECT state_key, pos FROM events
                     WHERE room_id = $1 AND pos > $2 AND pos <= $3 AND kind = 'm.room.member'
                       AND (json::json -> 'content' ->> 'membership') = 'join'
                     ORDER BY pos LIMIT $4",
                )
                .bind(room_id.as_str())
                .bind(pos(after))
                .bind(pos(until))
                .bind(limit.min(i64::MAX as usize) as i64)
                .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter()
            .map(|r| Ok((parse(get::<String>(r, 0)?)?, get::<i64>(r, 1)? as u64)))
            .collect()
    }

    async fn membership_history(&self, room_id: &RoomId, user_id: &UserId) -> StoreResult<Vec<MembershipRecord>> {
        let rows = self
            .read(
                sqlx::query(
                    "SELECT pos, event_id, json FROM events WHERE room_id = $1 AND kind = 'm.room.member' AND state_key = $2 ORDER BY pos",
                )
                .bind(room_id.as_str())
                .bind(user_id.as_str())
                .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                let json: String = get(r, 2)?;
                let v: serde_json::Value = serde_json::from_str(&json).map_err(corrupt)?;
                Ok(MembershipRecord {
                    room_id: room_id.to_owned(),
                    membership: v["content"]["membership"]
                        .as_str()
                        .and_then(Membership::parse)
                        .unwrap_or(Membership::Leave),
                    pos: get::<i64>(r, 0)? as u64,
                    event_id: parse(get(r, 1)?)?,
                })
            })
            .collect()
    }

    async fn memberships(&self, user_id: &UserId) -> StoreResult<Vec<MembershipRecord>> {
        let rows = self
            .read(
                sqlx::query("SELECT room_id, membership, pos, event_id FROM memberships WHERE user_id = $1 ORDER BY pos")
                    .bind(user_id.as_str())
                    .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter().map(membership_from_row).collect()
    }

    async fn forget_room(&self, user_id: &UserId, room_id: &RoomId) -> StoreResult<StreamPos> {
        let (user, room): (OwnedUserId, String) = (user_id.to_owned(), room_id.to_string());
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    sqlx::query("DELETE FROM memberships WHERE user_id = $1 AND room_id = $2 AND membership IN ('leave', 'ban')")
                        .bind(user.as_str())
                        .bind(room)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    let p = positions.allocate();
                    positions.change(c, p, Change::Memberships { user_id: user }).await?;
                    Ok(p)
                })
            })
            .await
    }

    async fn set_alias(&self, alias: &str, room_id: &RoomId, creator: &UserId) -> StoreResult<()> {
        let (a, r, u) = (alias.to_owned(), room_id.to_string(), creator.to_string());
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    sqlx::query("INSERT INTO aliases (alias, room_id, creator) VALUES ($1, $2, $3)")
                        .bind(a)
                        .bind(r)
                        .bind(u)
                        .execute(&mut *c)
                        .await
                        .map_err(db_error("alias exists"))?;
                    Ok(())
                })
            })
            .await
    }

    async fn alias(&self, alias: &str) -> StoreResult<Option<(OwnedRoomId, OwnedUserId)>> {
        let row = self
            .read(
                sqlx::query("SELECT room_id, creator FROM aliases WHERE alias = $1")
                    .bind(alias)
                    .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.map(|r| Ok((parse(get(&r, 0)?)?, parse(get(&r, 1)?)?))).transpose()
    }

    async fn delete_alias(&self, alias: &str) -> StoreResult<bool> {
        let a = alias.to_owned();
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let n = sqlx::query("DELETE FROM aliases WHERE alias = $1")
                        .bind(a)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?
                        .rows_affected();
                    Ok(n > 0)
                })
            })
            .await
    }

    async fn room_aliases(&self, room_id: &RoomId) -> StoreResult<Vec<String>> {
        let rows = self
            .read(
                sqlx::query("SELECT alias FROM aliases WHERE room_id = $1 ORDER BY alias")
                    .bind(room_id.as_str())
                    .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter().map(|r| get(r, 0)).collect()
    }
}
