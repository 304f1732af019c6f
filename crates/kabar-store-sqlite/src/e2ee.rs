//! End-to-end encryption tables: keys, device-list changes, to-device
//! messages and key backups (`e2ee.sql`).

use async_trait::async_trait;
use kabar_domain::e2ee::BackupKeyRank;
use kabar_store::*;
use ruma::{OwnedUserId, RoomId, UserId};
use rusqlite::{Connection, OptionalExtension, params};

use crate::{
    SqliteStore, conflict_or_backend, corrupt,
    engine::{Positions, backend, exec},
    parse,
};

/// Runs a cached query and collects every row through `row`.
fn query_all<T>(
    c: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
) -> StoreResult<Vec<T>> {
    c.prepare_cached(sql)
        .map_err(backend)?
        .query_map(params, row)
        .map_err(backend)?
        .collect::<Result<_, _>>()
        .map_err(corrupt)
}

fn sql_pos(pos: StreamPos) -> i64 {
    pos.min(i64::MAX as u64) as i64
}

/// Records that `user`'s device list changed, at a new position.
pub(crate) fn record_list_change(c: &Connection, positions: &mut Positions, user: &str) -> StoreResult<StreamPos> {
    let pos = positions.allocate();
    record_list_change_at(c, positions, user, pos)?;
    Ok(pos)
}

/// Records that `user`'s device list changed at `pos`, a position the
/// caller allocated for this write.
pub(crate) fn record_list_change_at(c: &Connection, positions: &mut Positions, user: &str, pos: StreamPos) -> StoreResult<()> {
    exec(
        c,
        "INSERT INTO device_list_changes (user_id, pos) VALUES (?1, ?2)
         ON CONFLICT (user_id) DO UPDATE SET pos = excluded.pos",
        params![user, pos as i64],
    )
    .map_err(backend)?;
    positions.change(
        c,
        pos,
        Change::DeviceList {
            user_id: parse_user(user)?,
        },
    )
}

fn parse_user(user: &str) -> StoreResult<OwnedUserId> {
    OwnedUserId::try_from(user).map_err(|e| StoreError::Backend(format!("not a user id {user}: {e}")))
}

pub(crate) fn device_ids_except(c: &Connection, user: &str, keep: Option<&str>) -> StoreResult<Vec<String>> {
    query_all(
        c,
        "SELECT device_id FROM devices WHERE user_id = ?1 AND device_id IS NOT ?2",
        params![user, keep],
        |r| r.get(0),
    )
}

/// Deletes devices with everything that belongs to them, inside the caller's transaction.
pub(crate) fn remove_devices(c: &Connection, positions: &mut Positions, user: &str, devices: &[String]) -> StoreResult<DevicesRemoved> {
    let mut removed = DevicesRemoved::default();
    let mut had_keys = false;
    for d in devices {
        removed.count += exec(c, "DELETE FROM devices WHERE user_id = ?1 AND device_id = ?2", params![user, d]).map_err(backend)?;
        had_keys |= exec(c, "DELETE FROM device_keys WHERE user_id = ?1 AND device_id = ?2", params![user, d]).map_err(backend)? > 0;
        for sql in [
            "DELETE FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2",
            "DELETE FROM fallback_keys WHERE user_id = ?1 AND device_id = ?2",
            "DELETE FROM to_device WHERE user_id = ?1 AND device_id = ?2",
            "DELETE FROM key_signatures WHERE target_user = ?1 AND target_key = ?2",
        ] {
            exec(c, sql, params![user, d]).map_err(backend)?;
        }
    }
    // Any removed device changes the list other users' clients encrypt to
    // (and the user's own other devices show), keys or not.
    if had_keys || removed.count > 0 {
        let pos = record_list_change(c, positions, user)?;
        positions.change(
            c,
            pos,
            Change::Sessions {
                user_id: parse_user(user)?,
            },
        )?;
        removed.list_changed_at = Some(pos);
    }
    Ok(removed)
}

#[async_trait]
impl KeyStore for SqliteStore {
    async fn put_device_keys(&self, user_id: &UserId, device_id: &str, json: &str) -> StoreResult<Option<StreamPos>> {
        let (u, d, j) = (user_id.to_string(), device_id.to_owned(), json.to_owned());
        self.engine
            .write(move |c, positions| {
                let stored: Option<String> = c
                    .prepare_cached("SELECT json FROM device_keys WHERE user_id = ?1 AND device_id = ?2")
                    .map_err(backend)?
                    .query_row(params![u, d], |r| r.get(0))
                    .optional()
                    .map_err(backend)?;
                if stored.as_deref() == Some(j.as_str()) {
                    return Ok(None);
                }
                exec(
                    c,
                    "INSERT INTO device_keys (user_id, device_id, json) VALUES (?1, ?2, ?3)
                     ON CONFLICT (user_id, device_id) DO UPDATE SET json = excluded.json",
                    params![u, d, j],
                )
                .map_err(backend)?;
                record_list_change(c, positions, &u).map(Some)
            })
            .await
    }

    async fn device_keys(&self, user_id: &UserId) -> StoreResult<Vec<DeviceKeysRecord>> {
        let u = user_id.to_string();
        self.engine
            .read(move |c| {
                query_all(
                    c,
                    "SELECT k.device_id, k.json, d.display_name FROM device_keys k
                     JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id
                     WHERE k.user_id = ?1 ORDER BY k.device_id",
                    [u],
                    |r| {
                        Ok(DeviceKeysRecord {
                            device_id: r.get(0)?,
                            json: r.get(1)?,
                            display_name: r.get(2)?,
                        })
                    },
                )
            })
            .await
    }

    async fn add_one_time_keys(&self, user_id: &UserId, device_id: &str, keys: Vec<OneTimeKey>) -> StoreResult<StreamPos> {
        let (user, u, d) = (user_id.to_owned(), user_id.to_string(), device_id.to_owned());
        self.engine
            .write(move |c, positions| {
                for k in keys {
                    let stored: Option<String> = c
                        .prepare_cached("SELECT json FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 AND key_id = ?3")
                        .map_err(backend)?
                        .query_row(params![u, d, k.key_id], |r| r.get(0))
                        .optional()
                        .map_err(backend)?;
                    match stored {
                        Some(json) if json == k.json => {}
                        Some(_) => return Err(StoreError::Conflict(format!("one-time key {} exists with other content", k.key_id))),
                        None => {
                            exec(
                                c,
                                "INSERT INTO one_time_keys (user_id, device_id, algorithm, key_id, json) VALUES (?1, ?2, ?3, ?4, ?5)",
                                params![u, d, k.algorithm, k.key_id, k.json],
                            )
                            .map_err(conflict_or_backend("one-time key exists"))?;
                        }
                    }
                }
                let pos = positions.allocate();
                positions.change(
                    c,
                    pos,
                    Change::OneTimeKeys {
                        user_id: user,
                        device_id: d,
                    },
                )?;
                Ok(pos)
            })
            .await
    }

    async fn put_fallback_keys(&self, user_id: &UserId, device_id: &str, keys: Vec<OneTimeKey>) -> StoreResult<StreamPos> {
        let (user, u, d) = (user_id.to_owned(), user_id.to_string(), device_id.to_owned());
        self.engine
            .write(move |c, positions| {
                for k in keys {
                    // Re-uploading the key already stored keeps its used mark.
                    exec(
                        c,
                        "INSERT INTO fallback_keys (user_id, device_id, algorithm, key_id, json, used) VALUES (?1, ?2, ?3, ?4, ?5, 0)
                         ON CONFLICT (user_id, device_id, algorithm) DO UPDATE SET
                            used = CASE WHEN fallback_keys.key_id = excluded.key_id AND fallback_keys.json = excluded.json
                                        THEN fallback_keys.used ELSE 0 END,
                            key_id = excluded.key_id, json = excluded.json",
                        params![u, d, k.algorithm, k.key_id, k.json],
                    )
                    .map_err(backend)?;
                }
                let pos = positions.allocate();
                positions.change(
                    c,
                    pos,
                    Change::OneTimeKeys {
                        user_id: user,
                        device_id: d,
                    },
                )?;
                Ok(pos)
            })
            .await
    }

    async fn key_counts(&self, user_id: &UserId, device_id: &str) -> StoreResult<KeyCounts> {
        let (u, d) = (user_id.to_string(), device_id.to_owned());
        self.engine
            .read(move |c| {
                let mut counts = KeyCounts::default();
                let mut st = c
                    .prepare_cached(
                        "SELECT algorithm, COUNT(*) FROM one_time_keys WHERE user_id = ?1 AND device_id = ?2 GROUP BY algorithm",
                    )
                    .map_err(backend)?;
                let rows = st
                    .query_map(params![u, d], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))
                    .map_err(backend)?;
                for row in rows {
                    let (alg, n) = row.map_err(corrupt)?;
                    counts.one_time.insert(alg, n);
                }
                counts.unused_fallback = query_all(
                    c,
                    "SELECT algorithm FROM fallback_keys WHERE user_id = ?1 AND device_id = ?2 AND used = 0 ORDER BY algorithm",
                    params![u, d],
                    |r| r.get(0),
                )?;
                Ok(counts)
            })
            .await
    }

    async fn claim_keys(&self, claims: Vec<KeyClaim>) -> StoreResult<Vec<ClaimedKey>> {
        // Claims run on the one writer connection, inside its transaction:
        // the select and the delete of a key cannot interleave with another claim.
        self.engine
            .write(move |c, positions| {
                let mut claimed: Vec<ClaimedKey> = Vec::with_capacity(claims.len());
                for claim in claims {
                    let (u, d) = (claim.user_id.as_str(), claim.device_id.as_str());
                    let one_time: Option<(String, String)> = c
                        .prepare_cached(
                            "DELETE FROM one_time_keys WHERE rowid = (SELECT rowid FROM one_time_keys
                               WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3 ORDER BY key_id LIMIT 1)
                             RETURNING key_id, json",
                        )
                        .map_err(backend)?
                        .query_row(params![u, d, claim.algorithm], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()
                        .map_err(backend)?;
                    let key = match one_time {
                        Some(k) => Some(k),
                        None => c
                            .prepare_cached(
                                "UPDATE fallback_keys SET used = 1 WHERE user_id = ?1 AND device_id = ?2 AND algorithm = ?3
                                 RETURNING key_id, json",
                            )
                            .map_err(backend)?
                            .query_row(params![u, d, claim.algorithm], |r| Ok((r.get(0)?, r.get(1)?)))
                            .optional()
                            .map_err(backend)?,
                    };
                    if let Some((key_id, json)) = key {
                        claimed.push(ClaimedKey {
                            user_id: claim.user_id.clone(),
                            device_id: claim.device_id.clone(),
                            key_id,
                            json,
                        });
                    }
                }
                let mut devices: Vec<(&OwnedUserId, &String)> = claimed.iter().map(|k| (&k.user_id, &k.device_id)).collect();
                devices.sort_unstable();
                devices.dedup();
                if !devices.is_empty() {
                    let pos = positions.allocate();
                    for (user_id, device_id) in devices {
                        positions.change(
                            c,
                            pos,
                            Change::OneTimeKeys {
                                user_id: user_id.clone(),
                                device_id: device_id.clone(),
                            },
                        )?;
                    }
                }
                Ok(claimed)
            })
            .await
    }

    async fn put_cross_signing_keys(&self, user_id: &UserId, keys: Vec<CrossSigningKey>) -> StoreResult<StreamPos> {
        let u = user_id.to_string();
        self.engine
            .write(move |c, positions| {
                for k in keys {
                    exec(
                        c,
                        "INSERT INTO cross_signing_keys (user_id, kind, public_key, json) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (user_id, kind) DO UPDATE SET public_key = excluded.public_key, json = excluded.json",
                        params![u, k.kind.usage(), k.public_key, k.json],
                    )
                    .map_err(backend)?;
                }
                record_list_change(c, positions, &u)
            })
            .await
    }

    async fn cross_signing_keys(&self, user_id: &UserId) -> StoreResult<Vec<CrossSigningKey>> {
        let u = user_id.to_string();
        self.engine
            .read(move |c| {
                c.prepare_cached("SELECT kind, public_key, json FROM cross_signing_keys WHERE user_id = ?1 ORDER BY kind")
                    .map_err(backend)?
                    .query_map([u], |r| {
                        let kind: String = r.get(0)?;
                        Ok((kind, r.get(1)?, r.get(2)?))
                    })
                    .map_err(backend)?
                    .map(|row| {
                        let (kind, public_key, json) = row.map_err(corrupt)?;
                        let kind = CrossSigningKind::from_usage(&kind).ok_or_else(|| corrupt(format!("cross-signing kind {kind}")))?;
                        Ok(CrossSigningKey { kind, public_key, json })
                    })
                    .collect()
            })
            .await
    }

    async fn put_signatures(&self, signatures: Vec<KeySignature>) -> StoreResult<StreamPos> {
        self.engine
            .write(move |c, positions| {
                let mut targets: Vec<&str> = vec![];
                for s in &signatures {
                    exec(
                        c,
                        "INSERT INTO key_signatures (target_user, target_key, signer, signer_key_id, signature) VALUES (?1, ?2, ?3, ?4, ?5)
                         ON CONFLICT (target_user, target_key, signer, signer_key_id) DO UPDATE SET signature = excluded.signature",
                        params![
                            s.target_user.as_str(),
                            s.target_key,
                            s.signer.as_str(),
                            s.signer_key_id,
                            s.signature
                        ],
                    )
                    .map_err(backend)?;
                    if !targets.contains(&s.target_user.as_str()) {
                        targets.push(s.target_user.as_str());
                    }
                }
                let mut last = 0;
                for user in targets {
                    last = record_list_change(c, positions, user)?;
                }
                Ok(last)
            })
            .await
    }

    async fn signatures(&self, target_user: &UserId) -> StoreResult<Vec<KeySignature>> {
        let u = target_user.to_string();
        self.engine
            .read(move |c| {
                query_all(
                    c,
                    "SELECT target_user, target_key, signer, signer_key_id, signature FROM key_signatures
                     WHERE target_user = ?1 ORDER BY target_key, signer, signer_key_id",
                    [u],
                    |r| {
                        Ok(KeySignature {
                            target_user: parse(r.get(0)?)?,
                            target_key: r.get(1)?,
                            signer: parse(r.get(2)?)?,
                            signer_key_id: r.get(3)?,
                            signature: r.get(4)?,
                        })
                    },
                )
            })
            .await
    }

    async fn device_list_changes(&self, after: StreamPos, until: StreamPos) -> StoreResult<Vec<(OwnedUserId, StreamPos)>> {
        self.engine
            .read(move |c| {
                query_all(
                    c,
                    "SELECT user_id, pos FROM device_list_changes WHERE pos > ?1 AND pos <= ?2 ORDER BY pos",
                    params![sql_pos(after), sql_pos(until)],
                    |r| Ok((parse(r.get(0)?)?, r.get::<_, i64>(1)? as u64)),
                )
            })
            .await
    }
}

#[async_trait]
impl ToDeviceStore for SqliteStore {
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
                let fresh = exec(
                    c,
                    "INSERT INTO to_device_txns (user_id, device_id, kind, txn_id) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
                    params![su, sd, kind, txn],
                )
                .map_err(backend)?;
                if fresh == 0 {
                    return Ok(None);
                }
                let mut last = 0;
                let mut devices: Vec<(OwnedUserId, String)> = vec![];
                for m in messages {
                    let exists = c
                        .prepare_cached("SELECT 1 FROM devices WHERE user_id = ?1 AND device_id = ?2")
                        .map_err(backend)?
                        .exists(params![m.recipient.as_str(), m.device_id])
                        .map_err(backend)?;
                    if !exists {
                        continue;
                    }
                    let pos = positions.allocate();
                    exec(
                        c,
                        "INSERT INTO to_device (pos, user_id, device_id, sender, kind, content) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![pos as i64, m.recipient.as_str(), m.device_id, su, m.kind, m.content],
                    )
                    .map_err(backend)?;
                    last = pos;
                    let device = (m.recipient, m.device_id);
                    if !devices.contains(&device) {
                        devices.push(device);
                    }
                }
                // One change per device, at the batch's last position: the
                // device's sync reads its queue up to there.
                for (user_id, device_id) in devices {
                    positions.change(c, last, Change::ToDevice { user_id, device_id })?;
                }
                Ok(Some(last))
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
        let (u, d) = (user_id.to_string(), device_id.to_owned());
        self.engine
            .read(move |c| {
                query_all(
                    c,
                    "SELECT pos, sender, kind, content FROM to_device
                     WHERE user_id = ?1 AND device_id = ?2 AND pos > ?3 AND pos <= ?4 ORDER BY pos LIMIT ?5",
                    params![u, d, sql_pos(after), sql_pos(until), limit as i64],
                    |r| {
                        Ok(QueuedToDevice {
                            pos: r.get::<_, i64>(0)? as u64,
                            sender: parse(r.get(1)?)?,
                            kind: r.get(2)?,
                            content: r.get(3)?,
                        })
                    },
                )
            })
            .await
    }

    async fn delete_to_device(&self, user_id: &UserId, device_id: &str, upto: StreamPos) -> StoreResult<usize> {
        let (u, d) = (user_id.to_string(), device_id.to_owned());
        self.engine
            .write(move |c, _| {
                exec(
                    c,
                    "DELETE FROM to_device WHERE user_id = ?1 AND device_id = ?2 AND pos <= ?3",
                    params![u, d, sql_pos(upto)],
                )
                .map_err(backend)
            })
            .await
    }
}

/// The user's current backup version: the newest not deleted.
fn current_backup(c: &Connection, user: &str) -> StoreResult<Option<u64>> {
    c.prepare_cached("SELECT MAX(version) FROM backup_versions WHERE user_id = ?1 AND deleted = 0")
        .map_err(backend)?
        .query_row([user], |r| r.get::<_, Option<i64>>(0))
        .map(|v| v.map(|v| v as u64))
        .map_err(backend)
}

fn backup_count(c: &Connection, user: &str, version: u64) -> StoreResult<u64> {
    c.prepare_cached("SELECT COUNT(*) FROM backup_keys WHERE user_id = ?1 AND version = ?2")
        .map_err(backend)?
        .query_row(params![user, version as i64], |r| r.get::<_, i64>(0))
        .map(|n| n as u64)
        .map_err(backend)
}

/// Moves the version's etag on if its keys `changed`, and reports etag and count.
fn finish_backup_write(c: &Connection, user: &str, version: u64, changed: bool) -> StoreResult<BackupWrite> {
    if changed {
        exec(
            c,
            "UPDATE backup_versions SET etag = etag + 1 WHERE user_id = ?1 AND version = ?2",
            params![user, version as i64],
        )
        .map_err(backend)?;
    }
    backup_state(c, user, version)
}

fn backup_state(c: &Connection, user: &str, version: u64) -> StoreResult<BackupWrite> {
    let etag: i64 = c
        .prepare_cached("SELECT etag FROM backup_versions WHERE user_id = ?1 AND version = ?2")
        .map_err(backend)?
        .query_row(params![user, version as i64], |r| r.get(0))
        .map_err(backend)?;
    Ok(BackupWrite::Done {
        etag: etag as u64,
        count: backup_count(c, user, version)?,
    })
}

fn backup_key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<BackupKey> {
    Ok(BackupKey {
        room_id: parse(r.get(0)?)?,
        session_id: r.get(1)?,
        rank: BackupKeyRank {
            is_verified: r.get(2)?,
            first_message_index: r.get::<_, i64>(3)? as u64,
            forwarded_count: r.get::<_, i64>(4)? as u64,
        },
        json: r.get(5)?,
    })
}

#[async_trait]
impl KeyBackupStore for SqliteStore {
    async fn create_backup_version(&self, user_id: &UserId, algorithm: &str, auth_data: &str) -> StoreResult<u64> {
        let (u, alg, auth) = (user_id.to_string(), algorithm.to_owned(), auth_data.to_owned());
        self.engine
            .write(move |c, _| {
                // Numbers are never reused, deleted versions included.
                let next: i64 = c
                    .prepare_cached("SELECT COALESCE(MAX(version), 0) + 1 FROM backup_versions WHERE user_id = ?1")
                    .map_err(backend)?
                    .query_row([&u], |r| r.get(0))
                    .map_err(backend)?;
                exec(
                    c,
                    "INSERT INTO backup_versions (user_id, version, algorithm, auth_data) VALUES (?1, ?2, ?3, ?4)",
                    params![u, next, alg, auth],
                )
                .map_err(backend)?;
                Ok(next as u64)
            })
            .await
    }

    async fn backup_version(&self, user_id: &UserId, version: Option<u64>) -> StoreResult<Option<BackupVersion>> {
        let u = user_id.to_string();
        self.engine
            .read(move |c| {
                let Some(version) = (match version {
                    Some(v) => Some(v),
                    None => current_backup(c, &u)?,
                }) else {
                    return Ok(None);
                };
                let row: Option<(String, String, i64)> = c
                    .prepare_cached(
                        "SELECT algorithm, auth_data, etag FROM backup_versions WHERE user_id = ?1 AND version = ?2 AND deleted = 0",
                    )
                    .map_err(backend)?
                    .query_row(params![u, version as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                    .optional()
                    .map_err(backend)?;
                let Some((algorithm, auth_data, etag)) = row else {
                    return Ok(None);
                };
                Ok(Some(BackupVersion {
                    version,
                    algorithm,
                    auth_data,
                    etag: etag as u64,
                    count: backup_count(c, &u, version)?,
                }))
            })
            .await
    }

    async fn update_backup_version(&self, user_id: &UserId, version: u64, auth_data: &str) -> StoreResult<bool> {
        let (u, auth) = (user_id.to_string(), auth_data.to_owned());
        self.engine
            .write(move |c, _| {
                exec(
                    c,
                    "UPDATE backup_versions SET auth_data = ?3 WHERE user_id = ?1 AND version = ?2 AND deleted = 0",
                    params![u, version as i64, auth],
                )
                .map(|n| n > 0)
                .map_err(backend)
            })
            .await
    }

    async fn delete_backup_version(&self, user_id: &UserId, version: u64) -> StoreResult<bool> {
        let u = user_id.to_string();
        self.engine
            .write(move |c, _| {
                let n = exec(
                    c,
                    "UPDATE backup_versions SET deleted = 1 WHERE user_id = ?1 AND version = ?2 AND deleted = 0",
                    params![u, version as i64],
                )
                .map_err(backend)?;
                exec(
                    c,
                    "DELETE FROM backup_keys WHERE user_id = ?1 AND version = ?2",
                    params![u, version as i64],
                )
                .map_err(backend)?;
                Ok(n > 0)
            })
            .await
    }

    async fn put_backup_keys(&self, user_id: &UserId, version: u64, keys: Vec<BackupKey>) -> StoreResult<BackupWrite> {
        let u = user_id.to_string();
        self.engine
            .write(move |c, _| {
                let current = current_backup(c, &u)?;
                if current != Some(version) {
                    return Ok(BackupWrite::WrongVersion { current });
                }
                let mut changed = false;
                for k in keys {
                    let stored = c
                        .prepare_cached(
                            "SELECT room_id, session_id, is_verified, first_message_index, forwarded_count, json FROM backup_keys
                             WHERE user_id = ?1 AND version = ?2 AND room_id = ?3 AND session_id = ?4",
                        )
                        .map_err(backend)?
                        .query_row(params![u, version as i64, k.room_id.as_str(), k.session_id], backup_key_from_row)
                        .optional()
                        .map_err(corrupt)?;
                    if stored.is_some_and(|s| !k.rank.replaces(&s.rank)) {
                        continue;
                    }
                    exec(
                        c,
                        "INSERT INTO backup_keys (user_id, version, room_id, session_id, is_verified, first_message_index, forwarded_count, json)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                         ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET is_verified = excluded.is_verified,
                            first_message_index = excluded.first_message_index, forwarded_count = excluded.forwarded_count, json = excluded.json",
                        params![
                            u,
                            version as i64,
                            k.room_id.as_str(),
                            k.session_id,
                            k.rank.is_verified,
                            sql_pos(k.rank.first_message_index),
                            sql_pos(k.rank.forwarded_count),
                            k.json
                        ],
                    )
                    .map_err(backend)?;
                    changed = true;
                }
                finish_backup_write(c, &u, version, changed)
            })
            .await
    }

    async fn backup_keys(&self, user_id: &UserId, version: u64, scope: BackupScope<'_>) -> StoreResult<Vec<BackupKey>> {
        let u = user_id.to_string();
        let room = scope.room_id.map(RoomId::to_string);
        let session = scope.session_id.map(str::to_owned);
        self.engine
            .read(move |c| {
                query_all(
                    c,
                    "SELECT room_id, session_id, is_verified, first_message_index, forwarded_count, json FROM backup_keys
                     WHERE user_id = ?1 AND version = ?2 AND (?3 IS NULL OR room_id = ?3) AND (?4 IS NULL OR session_id = ?4)
                     ORDER BY room_id, session_id",
                    params![u, version as i64, room, session],
                    backup_key_from_row,
                )
            })
            .await
    }

    async fn delete_backup_keys(&self, user_id: &UserId, version: u64, scope: BackupScope<'_>) -> StoreResult<BackupWrite> {
        let u = user_id.to_string();
        let room = scope.room_id.map(RoomId::to_string);
        let session = scope.session_id.map(str::to_owned);
        self.engine
            .write(move |c, _| {
                let exists = c
                    .prepare_cached("SELECT 1 FROM backup_versions WHERE user_id = ?1 AND version = ?2 AND deleted = 0")
                    .map_err(backend)?
                    .exists(params![u, version as i64])
                    .map_err(backend)?;
                if !exists {
                    return Ok(BackupWrite::WrongVersion {
                        current: current_backup(c, &u)?,
                    });
                }
                let n = exec(
                    c,
                    "DELETE FROM backup_keys WHERE user_id = ?1 AND version = ?2 AND (?3 IS NULL OR room_id = ?3) AND (?4 IS NULL OR session_id = ?4)",
                    params![u, version as i64, room, session],
                )
                .map_err(backend)?;
                finish_backup_write(c, &u, version, n > 0)
            })
            .await
    }
}
