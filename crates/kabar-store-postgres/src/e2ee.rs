//! End-to-end encryption tables: keys, device-list changes, to-device
//! messages and key backups.

use async_trait::async_trait;
use kabar_domain::e2ee::BackupKeyRank;
use kabar_store::*;
use ruma::{OwnedUserId, RoomId, UserId};
use sqlx::{PgConnection, postgres::PgRow};

use crate::{
    PostgresStore,
    engine::{Positions, backend, corrupt, db_error},
    get, parse, pos,
};

fn user(user: &str) -> StoreResult<OwnedUserId> {
    OwnedUserId::try_from(user).map_err(|e| StoreError::Backend(format!("not a user id {user}: {e}")))
}

/// Records that `user`'s device list changed, at a new position.
pub(crate) async fn record_list_change(c: &mut PgConnection, positions: &mut Positions, user_id: &str) -> StoreResult<StreamPos> {
    let p = positions.allocate();
    record_list_change_at(c, positions, user_id, p).await?;
    Ok(p)
}

/// Records that `user`'s device list changed at `p`, a position this write allocated.
pub(crate) async fn record_list_change_at(c: &mut PgConnection, positions: &mut Positions, user_id: &str, p: StreamPos) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO device_list_changes (user_id, pos) VALUES ($1, $2)
         ON CONFLICT (user_id) DO UPDATE SET pos = excluded.pos",
    )
    .bind(user_id)
    .bind(p as i64)
    .execute(&mut *c)
    .await
    .map_err(backend)?;
    positions.change(c, p, Change::DeviceList { user_id: user(user_id)? }).await
}

pub(crate) async fn device_ids_except(c: &mut PgConnection, user_id: &str, keep: Option<&str>) -> StoreResult<Vec<String>> {
    let rows = sqlx::query("SELECT device_id FROM devices WHERE user_id = $1 AND device_id IS DISTINCT FROM $2")
        .bind(user_id)
        .bind(keep)
        .fetch_all(&mut *c)
        .await
        .map_err(backend)?;
    rows.iter().map(|r| get(r, 0)).collect()
}

/// Deletes devices with everything that belongs to them, inside the caller's batch.
pub(crate) async fn remove_devices(
    c: &mut PgConnection,
    positions: &mut Positions,
    user_id: &str,
    devices: &[String],
) -> StoreResult<DevicesRemoved> {
    let mut removed = DevicesRemoved::default();
    let mut had_keys = false;
    for d in devices {
        let run = async |c: &mut PgConnection, sql: &str| {
            sqlx::query(sql)
                .bind(user_id)
                .bind(d)
                .execute(&mut *c)
                .await
                .map(|r| r.rows_affected())
                .map_err(backend)
        };
        removed.count += run(c, "DELETE FROM devices WHERE user_id = $1 AND device_id = $2").await? as usize;
        had_keys |= run(c, "DELETE FROM device_keys WHERE user_id = $1 AND device_id = $2").await? > 0;
        for sql in [
            "DELETE FROM one_time_keys WHERE user_id = $1 AND device_id = $2",
            "DELETE FROM fallback_keys WHERE user_id = $1 AND device_id = $2",
            "DELETE FROM to_device WHERE user_id = $1 AND device_id = $2",
            "DELETE FROM key_signatures WHERE target_user = $1 AND target_key = $2",
        ] {
            run(c, sql).await?;
        }
    }
    // Any removed device changes the list other users' clients encrypt to
    // (and the user's own other devices show), keys or not.
    if had_keys || removed.count > 0 {
        let p = record_list_change(c, positions, user_id).await?;
        positions.change(c, p, Change::Sessions { user_id: user(user_id)? }).await?;
        removed.list_changed_at = Some(p);
    }
    Ok(removed)
}

#[async_trait]
impl KeyStore for PostgresStore {
    async fn put_device_keys(&self, user_id: &UserId, device_id: &str, json: &str) -> StoreResult<Option<StreamPos>> {
        let (u, d, j) = (user_id.to_string(), device_id.to_owned(), json.to_owned());
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    let stored = sqlx::query("SELECT json FROM device_keys WHERE user_id = $1 AND device_id = $2")
                        .bind(&u)
                        .bind(&d)
                        .fetch_optional(&mut *c)
                        .await
                        .map_err(backend)?;
                    if let Some(row) = stored
                        && get::<String>(&row, 0)? == j
                    {
                        return Ok(None);
                    }
                    sqlx::query(
                        "INSERT INTO device_keys (user_id, device_id, json) VALUES ($1, $2, $3)
                         ON CONFLICT (user_id, device_id) DO UPDATE SET json = excluded.json",
                    )
                    .bind(&u)
                    .bind(&d)
                    .bind(&j)
                    .execute(&mut *c)
                    .await
                    .map_err(backend)?;
                    record_list_change(c, positions, &u).await.map(Some)
                })
            })
            .await
    }

    async fn device_keys(&self, user_id: &UserId) -> StoreResult<Vec<DeviceKeysRecord>> {
        let rows = self
            .read(
                sqlx::query(
                    "SELECT k.device_id, k.json, d.display_name FROM device_keys k
                     JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id
                     WHERE k.user_id = $1 ORDER BY k.device_id",
                )
                .bind(user_id.as_str())
                .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(DeviceKeysRecord {
                    device_id: get(r, 0)?,
                    json: get(r, 1)?,
                    display_name: get(r, 2)?,
                })
            })
            .collect()
    }

    async fn add_one_time_keys(&self, user_id: &UserId, device_id: &str, keys: Vec<OneTimeKey>) -> StoreResult<StreamPos> {
        let (owner, d) = (user_id.to_owned(), device_id.to_owned());
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    for k in keys {
                        let stored = sqlx::query("SELECT json FROM one_time_keys WHERE user_id = $1 AND device_id = $2 AND key_id = $3")
                            .bind(owner.as_str())
                            .bind(&d)
                            .bind(&k.key_id)
                            .fetch_optional(&mut *c)
                            .await
                            .map_err(backend)?;
                        match stored {
                            Some(row) if get::<String>(&row, 0)? == k.json => {}
                            Some(_) => {
                                return Err(StoreError::Conflict(format!("one-time key {} exists with other content", k.key_id)));
                            }
                            None => {
                                sqlx::query(
                                    "INSERT INTO one_time_keys (user_id, device_id, algorithm, key_id, json) VALUES ($1, $2, $3, $4, $5)",
                                )
                                .bind(owner.as_str())
                                .bind(&d)
                                .bind(&k.algorithm)
                                .bind(&k.key_id)
                                .bind(&k.json)
                                .execute(&mut *c)
                                .await
                                .map_err(db_error("one-time key exists"))?;
                            }
                        }
                    }
                    let p = positions.allocate();
                    positions
                        .change(
                            c,
                            p,
                            Change::OneTimeKeys {
                                user_id: owner,
                                device_id: d,
                            },
                        )
                        .await?;
                    Ok(p)
                })
            })
            .await
    }

    async fn put_fallback_keys(&self, user_id: &UserId, device_id: &str, keys: Vec<OneTimeKey>) -> StoreResult<StreamPos> {
        let (owner, d) = (user_id.to_owned(), device_id.to_owned());
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    for k in keys {
                        // Re-uploading the key already stored keeps its used mark.
                        sqlx::query(
                            "INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, json, used) VALUES ($1, $2, $3, $4, $5, FALSE)
                             ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET
                                used = CASE WHEN fallback_keys.key_id = excluded.key_id AND fallback_keys.json = excluded.json
                                            THEN fallback_keys.used ELSE FALSE END,
                                key_id = excluded.key_id, json = excluded.json",
                        )
                        .bind(owner.as_str())
                        .bind(&d)
                        .bind(&k.algorithm)
                        .bind(&k.key_id)
                        .bind(&k.json)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    }
                    let p = positions.allocate();
                    positions
                        .change(
                            c,
                            p,
                            Change::OneTimeKeys {
                                user_id: owner,
                                device_id: d,
                            },
                        )
                        .await?;
                    Ok(p)
                })
            })
            .await
    }

    async fn key_counts(&self, user_id: &UserId, device_id: &str) -> StoreResult<KeyCounts> {
        let rows = self
            .read(
                sqlx::query("SELECT algorithm, COUNT(*) FROM one_time_keys WHERE user_id = $1 AND device_id = $2 GROUP BY algorithm")
                    .bind(user_id.as_str())
                    .bind(device_id)
                    .fetch_all(&self.engine.pool),
            )
            .await?;
        let mut counts = KeyCounts::default();
        for r in &rows {
            counts.one_time.insert(get(r, 0)?, get::<i64>(r, 1)? as u64);
        }
        let rows = self
            .read(
                sqlx::query("SELECT algorithm FROM fallback_keys WHERE user_id = $1 AND device_id = $2 AND NOT used ORDER BY algorithm")
                    .bind(user_id.as_str())
                    .bind(device_id)
                    .fetch_all(&self.engine.pool),
            )
            .await?;
        counts.unused_fallback = rows.iter().map(|r| get(r, 0)).collect::<StoreResult<_>>()?;
        Ok(counts)
    }

    async fn claim_keys(&self, claims: Vec<KeyClaim>) -> StoreResult<Vec<ClaimedKey>> {
        // Claims run on the writing connection under the stream-head lock:
        // the select and the delete of a key cannot interleave with another claim.
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    let mut claimed: Vec<ClaimedKey> = Vec::with_capacity(claims.len());
                    for claim in claims {
                        let one_time = sqlx::query(
                            "DELETE FROM one_time_keys WHERE (user_id, device_id, key_id) = (
                                SELECT user_id, device_id, key_id FROM one_time_keys
                                WHERE user_id = $1 AND device_id = $2 AND algorithm = $3 ORDER BY key_id LIMIT 1)
                             RETURNING key_id, json",
                        )
                        .bind(claim.user_id.as_str())
                        .bind(&claim.device_id)
                        .bind(&claim.algorithm)
                        .fetch_optional(&mut *c)
                        .await
                        .map_err(backend)?;
                        let key = match one_time {
                            Some(row) => Some(row),
                            None => sqlx::query(
                                "UPDATE fallback_keys SET used = TRUE WHERE user_id = $1 AND device_id = $2 AND algorithm = $3
                                 RETURNING key_id, json",
                            )
                            .bind(claim.user_id.as_str())
                            .bind(&claim.device_id)
                            .bind(&claim.algorithm)
                            .fetch_optional(&mut *c)
                            .await
                            .map_err(backend)?,
                        };
                        if let Some(row) = key {
                            claimed.push(ClaimedKey {
                                user_id: claim.user_id.clone(),
                                device_id: claim.device_id.clone(),
                                key_id: get(&row, 0)?,
                                json: get(&row, 1)?,
                            });
                        }
                    }
                    let mut devices: Vec<(OwnedUserId, String)> =
                        claimed.iter().map(|k| (k.user_id.clone(), k.device_id.clone())).collect();
                    devices.sort_unstable();
                    devices.dedup();
                    if !devices.is_empty() {
                        let p = positions.allocate();
                        for (user_id, device_id) in devices {
                            positions.change(c, p, Change::OneTimeKeys { user_id, device_id }).await?;
                        }
                    }
                    Ok(claimed)
                })
            })
            .await
    }

    async fn put_cross_signing_keys(&self, user_id: &UserId, keys: Vec<CrossSigningKey>) -> StoreResult<StreamPos> {
        let u = user_id.to_string();
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    for k in keys {
                        sqlx::query(
                            "INSERT INTO cross_signing_keys (user_id, kind, public_key, json) VALUES ($1, $2, $3, $4)
                             ON CONFLICT (user_id, kind) DO UPDATE SET public_key = excluded.public_key, json = excluded.json",
                        )
                        .bind(&u)
                        .bind(k.kind.usage())
                        .bind(&k.public_key)
                        .bind(&k.json)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    }
                    record_list_change(c, positions, &u).await
                })
            })
            .await
    }

    async fn cross_signing_keys(&self, user_id: &UserId) -> StoreResult<Vec<CrossSigningKey>> {
        let rows = self
            .read(
                sqlx::query("SELECT kind, public_key, json FROM cross_signing_keys WHERE user_id = $1 ORDER BY kind")
                    .bind(user_id.as_str())
                    .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                let kind: String = get(r, 0)?;
                let kind = CrossSigningKind::from_usage(&kind).ok_or_else(|| corrupt(format!("cross-signing kind {kind}")))?;
                Ok(CrossSigningKey {
                    kind,
                    public_key: get(r, 1)?,
                    json: get(r, 2)?,
                })
            })
            .collect()
    }

    async fn put_signatures(&self, signatures: Vec<KeySignature>) -> StoreResult<StreamPos> {
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    let mut targets: Vec<String> = vec![];
                    for s in &signatures {
                        sqlx::query(
                            "INSERT INTO key_signatures (target_user, target_key, signer, signer_key_id, signature) VALUES ($1, $2, $3, $4, $5)
                             ON CONFLICT (target_user, target_key, signer, signer_key_id) DO UPDATE SET signature = excluded.signature",
                        )
                        .bind(s.target_user.as_str())
                        .bind(&s.target_key)
                        .bind(s.signer.as_str())
                        .bind(&s.signer_key_id)
                        .bind(&s.signature)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                        if !targets.iter().any(|t| t == s.target_user.as_str()) {
                            targets.push(s.target_user.to_string());
                        }
                    }
                    let mut last = 0;
                    for target in targets {
                        last = record_list_change(c, positions, &target).await?;
                    }
                    Ok(last)
                })
            })
            .await
    }

    async fn signatures(&self, target_user: &UserId) -> StoreResult<Vec<KeySignature>> {
        let rows = self
            .read(
                sqlx::query(
                    "SELECT target_user, target_key, signer, signer_key_id, signature FROM key_signatures
                     WHERE target_user = $1 ORDER BY target_key, signer, signer_key_id",
                )
                .bind(target_user.as_str())
                .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(KeySignature {
                    target_user: parse(get(r, 0)?)?,
                    target_key: get(r, 1)?,
                    signer: parse(get(r, 2)?)?,
                    signer_key_id: get(r, 3)?,
                    signature: get(r, 4)?,
                })
            })
            .collect()
    }

    async fn device_list_changes(&self, after: StreamPos, until: StreamPos) -> StoreResult<Vec<(OwnedUserId, StreamPos)>> {
        let rows = self
            .read(
                sqlx::query("SELECT user_id, pos FROM device_list_changes WHERE pos > $1 AND pos <= $2 ORDER BY pos")
                    .bind(pos(after))
                    .bind(pos(until))
                    .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter().map(|r| Ok((parse(get(r, 0)?)?, get::<i64>(r, 1)? as u64))).collect()
    }
}

#[async_trait]
impl ToDeviceStore for PostgresStore {
    async fn queue_to_device(
        &self,
        sender: &Session,
        kind: &str,
        txn_id: &str,
        messages: Vec<ToDeviceMessage>,
    ) -> StoreResult<Option<StreamPos>> {
        let (su, sd, kind, txn) = (
            sender.user_id.to_string(),
            sender.device_id.clone(),
            kind.to_owned(),
            txn_id.to_owned(),
        );
        self.engine
            .write(move |c, positions| {
                Box::pin(async move {
                    let fresh = sqlx::query(
                        "INSERT INTO to_device_txns (user_id, device_id, kind, txn_id) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    )
                    .bind(&su)
                    .bind(&sd)
                    .bind(&kind)
                    .bind(&txn)
                    .execute(&mut *c)
                    .await
                    .map_err(backend)?
                    .rows_affected();
                    if fresh == 0 {
                        return Ok(None);
                    }
                    let mut last = 0;
                    let mut devices: Vec<(OwnedUserId, String)> = vec![];
                    for m in messages {
                        let exists = sqlx::query("SELECT 1 FROM devices WHERE user_id = $1 AND device_id = $2")
                            .bind(m.recipient.as_str())
                            .bind(&m.device_id)
                            .fetch_optional(&mut *c)
                            .await
                            .map_err(backend)?
                            .is_some();
                        if !exists {
                            continue;
                        }
                        let p = positions.allocate();
                        sqlx::query(
                            "INSERT INTO to_device (pos, user_id, device_id, sender, kind, content) VALUES ($1, $2, $3, $4, $5, $6)",
                        )
                        .bind(p as i64)
                        .bind(m.recipient.as_str())
                        .bind(&m.device_id)
                        .bind(&su)
                        .bind(&m.kind)
                        .bind(&m.content)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                        last = p;
                        let device = (m.recipient, m.device_id);
                        if !devices.contains(&device) {
                            devices.push(device);
                        }
                    }
                    // One change per device, at the batch's last position.
                    for (user_id, device_id) in devices {
                        positions.change(c, last, Change::ToDevice { user_id, device_id }).await?;
                    }
                    Ok(Some(last))
                })
            })
            .await
    }

    async fn to_device(
        &self,
        user_id: &UserId,
        device_id: &str,
        after: StreamPos,
        until: StreamPos,
        limit: usize,
    ) -> StoreResult<Vec<QueuedToDevice>> {
        let rows = self
            .read(
                sqlx::query(
                    "SELECT pos, sender, kind, content FROM to_device
                     WHERE user_id = $1 AND device_id = $2 AND pos > $3 AND pos <= $4 ORDER BY pos LIMIT $5",
                )
                .bind(user_id.as_str())
                .bind(device_id)
                .bind(pos(after))
                .bind(pos(until))
                .bind(limit.min(100_000) as i64)
                .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(QueuedToDevice {
                    pos: get::<i64>(r, 0)? as u64,
                    sender: parse(get(r, 1)?)?,
                    kind: get(r, 2)?,
                    content: get(r, 3)?,
                })
            })
            .collect()
    }

    async fn delete_to_device(&self, user_id: &UserId, device_id: &str, upto: StreamPos) -> StoreResult<usize> {
        let (u, d) = (user_id.to_string(), device_id.to_owned());
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let n = sqlx::query("DELETE FROM to_device WHERE user_id = $1 AND device_id = $2 AND pos <= $3")
                        .bind(u)
                        .bind(d)
                        .bind(pos(upto))
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

/// The user's current backup version: the newest not deleted.
async fn current_backup(c: &mut PgConnection, user_id: &str) -> StoreResult<Option<u64>> {
    let row = sqlx::query("SELECT MAX(version) FROM backup_versions WHERE user_id = $1 AND NOT deleted")
        .bind(user_id)
        .fetch_one(&mut *c)
        .await
        .map_err(backend)?;
    Ok(get::<Option<i64>>(&row, 0)?.map(|v| v as u64))
}

async fn backup_state(c: &mut PgConnection, user_id: &str, version: u64) -> StoreResult<BackupWrite> {
    let row = sqlx::query(
        "SELECT etag, (SELECT COUNT(*) FROM backup_keys k WHERE k.user_id = v.user_id AND k.version = v.version)
         FROM backup_versions v WHERE user_id = $1 AND version = $2",
    )
    .bind(user_id)
    .bind(version as i64)
    .fetch_one(&mut *c)
    .await
    .map_err(backend)?;
    Ok(BackupWrite::Done {
        etag: get::<i64>(&row, 0)? as u64,
        count: get::<i64>(&row, 1)? as u64,
    })
}

/// Moves the version's etag on if its keys `changed`, and reports etag and count.
async fn finish_backup_write(c: &mut PgConnection, user_id: &str, version: u64, changed: bool) -> StoreResult<BackupWrite> {
    if changed {
        sqlx::query("UPDATE backup_versions SET etag = etag + 1 WHERE user_id = $1 AND version = $2")
            .bind(user_id)
            .bind(version as i64)
            .execute(&mut *c)
            .await
            .map_err(backend)?;
    }
    backup_state(c, user_id, version).await
}

fn backup_key_from_row(r: &PgRow) -> StoreResult<BackupKey> {
    Ok(BackupKey {
        room_id: parse(get(r, 0)?)?,
        session_id: get(r, 1)?,
        rank: BackupKeyRank {
            is_verified: get(r, 2)?,
            first_message_index: get::<i64>(r, 3)? as u64,
            forwarded_count: get::<i64>(r, 4)? as u64,
        },
        json: get(r, 5)?,
    })
}

#[async_trait]
impl KeyBackupStore for PostgresStore {
    async fn create_backup_version(&self, user_id: &UserId, algorithm: &str, auth_data: &str) -> StoreResult<u64> {
        let (u, alg, auth) = (user_id.to_string(), algorithm.to_owned(), auth_data.to_owned());
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    // Numbers are never reused, deleted versions included.
                    let row = sqlx::query("SELECT COALESCE(MAX(version), 0) + 1 FROM backup_versions WHERE user_id = $1")
                        .bind(&u)
                        .fetch_one(&mut *c)
                        .await
                        .map_err(backend)?;
                    let next: i64 = get(&row, 0)?;
                    sqlx::query("INSERT INTO backup_versions (user_id, version, algorithm, auth_data) VALUES ($1, $2, $3, $4)")
                        .bind(&u)
                        .bind(next)
                        .bind(alg)
                        .bind(auth)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    Ok(next as u64)
                })
            })
            .await
    }

    async fn backup_version(&self, user_id: &UserId, version: Option<u64>) -> StoreResult<Option<BackupVersion>> {
        let row = self
            .read(
                sqlx::query(
                    "SELECT version, algorithm, auth_data, etag,
                            (SELECT COUNT(*) FROM backup_keys k WHERE k.user_id = v.user_id AND k.version = v.version)
                     FROM backup_versions v WHERE user_id = $1 AND NOT deleted
                       AND version = COALESCE($2, (SELECT MAX(version) FROM backup_versions WHERE user_id = $1 AND NOT deleted))",
                )
                .bind(user_id.as_str())
                .bind(version.map(|v| v as i64))
                .fetch_optional(&self.engine.pool),
            )
            .await?;
        row.map(|r| {
            Ok(BackupVersion {
                version: get::<i64>(&r, 0)? as u64,
                algorithm: get(&r, 1)?,
                auth_data: get(&r, 2)?,
                etag: get::<i64>(&r, 3)? as u64,
                count: get::<i64>(&r, 4)? as u64,
            })
        })
        .transpose()
    }

    async fn update_backup_version(&self, user_id: &UserId, version: u64, auth_data: &str) -> StoreResult<bool> {
        let (u, auth) = (user_id.to_string(), auth_data.to_owned());
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let n = sqlx::query("UPDATE backup_versions SET auth_data = $3 WHERE user_id = $1 AND version = $2 AND NOT deleted")
                        .bind(u)
                        .bind(version as i64)
                        .bind(auth)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?
                        .rows_affected();
                    Ok(n > 0)
                })
            })
            .await
    }

    async fn delete_backup_version(&self, user_id: &UserId, version: u64) -> StoreResult<bool> {
        let u = user_id.to_string();
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let n = sqlx::query("UPDATE backup_versions SET deleted = TRUE WHERE user_id = $1 AND version = $2 AND NOT deleted")
                        .bind(&u)
                        .bind(version as i64)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?
                        .rows_affected();
                    sqlx::query("DELETE FROM backup_keys WHERE user_id = $1 AND version = $2")
                        .bind(&u)
                        .bind(version as i64)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                    Ok(n > 0)
                })
            })
            .await
    }

    async fn put_backup_keys(&self, user_id: &UserId, version: u64, keys: Vec<BackupKey>) -> StoreResult<BackupWrite> {
        let u = user_id.to_string();
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let current = current_backup(c, &u).await?;
                    if current != Some(version) {
                        return Ok(BackupWrite::WrongVersion { current });
                    }
                    let mut changed = false;
                    for k in keys {
                        let stored = sqlx::query(
                            "SELECT room_id, session_id, is_verified, first_message_index, forwarded_count, json FROM backup_keys
                             WHERE user_id = $1 AND version = $2 AND room_id = $3 AND session_id = $4",
                        )
                        .bind(&u)
                        .bind(version as i64)
                        .bind(k.room_id.as_str())
                        .bind(&k.session_id)
                        .fetch_optional(&mut *c)
                        .await
                        .map_err(backend)?;
                        if let Some(row) = stored
                            && !k.rank.replaces(&backup_key_from_row(&row)?.rank)
                        {
                            continue;
                        }
                        sqlx::query(
                            "INSERT INTO backup_keys (user_id, version, room_id, session_id, is_verified, first_message_index, forwarded_count, json)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                             ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET is_verified = excluded.is_verified,
                                first_message_index = excluded.first_message_index, forwarded_count = excluded.forwarded_count, json = excluded.json",
                        )
                        .bind(&u)
                        .bind(version as i64)
                        .bind(k.room_id.as_str())
                        .bind(&k.session_id)
                        .bind(k.rank.is_verified)
                        .bind(pos(k.rank.first_message_index))
                        .bind(pos(k.rank.forwarded_count))
                        .bind(&k.json)
                        .execute(&mut *c)
                        .await
                        .map_err(backend)?;
                        changed = true;
                    }
                    finish_backup_write(c, &u, version, changed).await
                })
            })
            .await
    }

    async fn backup_keys(&self, user_id: &UserId, version: u64, scope: BackupScope<'_>) -> StoreResult<Vec<BackupKey>> {
        let rows = self
            .read(
                sqlx::query(
                    "SELECT room_id, session_id, is_verified, first_message_index, forwarded_count, json FROM backup_keys
                     WHERE user_id = $1 AND version = $2 AND ($3::TEXT IS NULL OR room_id = $3) AND ($4::TEXT IS NULL OR session_id = $4)
                     ORDER BY room_id, session_id",
                )
                .bind(user_id.as_str())
                .bind(version as i64)
                .bind(scope.room_id.map(RoomId::as_str))
                .bind(scope.session_id)
                .fetch_all(&self.engine.pool),
            )
            .await?;
        rows.iter().map(backup_key_from_row).collect()
    }

    async fn delete_backup_keys(&self, user_id: &UserId, version: u64, scope: BackupScope<'_>) -> StoreResult<BackupWrite> {
        let u = user_id.to_string();
        let room = scope.room_id.map(RoomId::to_string);
        let session = scope.session_id.map(str::to_owned);
        self.engine
            .write(move |c, _| {
                Box::pin(async move {
                    let exists = sqlx::query("SELECT 1 FROM backup_versions WHERE user_id = $1 AND version = $2 AND NOT deleted")
                        .bind(&u)
                        .bind(version as i64)
                        .fetch_optional(&mut *c)
                        .await
                        .map_err(backend)?
                        .is_some();
                    if !exists {
                        return Ok(BackupWrite::WrongVersion {
                            current: current_backup(c, &u).await?,
                        });
                    }
                    let n = sqlx::query(
                        "DELETE FROM backup_keys WHERE user_id = $1 AND version = $2 AND ($3::TEXT IS NULL OR room_id = $3)
                         AND ($4::TEXT IS NULL OR session_id = $4)",
                    )
                    .bind(&u)
                    .bind(version as i64)
                    .bind(room)
                    .bind(session)
                    .execute(&mut *c)
                    .await
                    .map_err(backend)?
                    .rows_affected();
                    finish_backup_write(c, &u, version, n > 0).await
                })
            })
            .await
    }
}
