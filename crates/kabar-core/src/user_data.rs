//! Per-user data: account data, tags, receipts and read markers, filters,
//! profiles, push rules, the user directory.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use kabar_domain::membership::Membership;
use kabar_store::{ProfileField, ReceiptRecord, Store, UserRecord};
use ruma::{EventId, OwnedRoomId, OwnedUserId, RoomId, UserId, api::client::filter::FilterDefinition, push::Ruleset};
use serde_json::Value;

use crate::{
    error::{Error, Result},
    now_ms,
    rooms::Rooms,
};

/// Account data types that clients must set through their own endpoints.
const RESERVED_ACCOUNT_DATA: &[&str] = &["m.fully_read", "m.push_rules"];
const MAX_ACCOUNT_DATA_BYTES: usize = 64 * 1024;
/// Bound on parsed filters kept in memory; past it they are read again.
const MAX_CACHED_FILTERS: usize = 100_000;

/// Who the user directory finds for a searcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectoryScope {
    /// Users who share a room with the searcher or are in a room anyone may join.
    KnownUsers,
    /// Every active user of the server.
    AllUsers,
}

pub struct UserData {
    store: Arc<dyn Store>,
    rooms: Arc<Rooms>,
    /// Who the user directory shows a searcher.
    directory: DirectoryScope,
    /// Uploaded filters, parsed. A filter never changes once uploaded, and a
    /// client names the same one on every sync.
    filters: Mutex<HashMap<(OwnedUserId, String), Arc<FilterDefinition>>>,
}

impl UserData {
    pub fn new(store: Arc<dyn Store>, rooms: Arc<Rooms>, directory: DirectoryScope) -> Self {
        Self {
            store,
            rooms,
            directory,
            filters: Mutex::new(HashMap::new()),
        }
    }

    async fn write_account_data(&self, user: &UserId, room: Option<&RoomId>, kind: &str, content: &Value) -> Result<()> {
        let json = serde_json::to_string(content).map_err(|e| Error::BadJson(e.to_string()))?;
        if json.len() > MAX_ACCOUNT_DATA_BYTES {
            return Err(Error::TooLarge("account data is larger than 64 KiB".into()));
        }
        let pos = self.store.put_account_data(user, room, kind, &json).await?;
        self.rooms.applied().reached(pos).await;
        Ok(())
    }

    pub async fn set_account_data(&self, user: &UserId, room: Option<&RoomId>, kind: &str, content: Value) -> Result<()> {
        if RESERVED_ACCOUNT_DATA.contains(&kind) {
            return Err(Error::BadJson(format!("{kind} cannot be set through account data")));
        }
        if !content.is_object() {
            return Err(Error::BadJson("account data content must be an object".into()));
        }
        if kind.is_empty() || kind.len() > 255 || kabar_domain::names::has_control_chars(kind) {
            return Err(Error::InvalidParam("invalid account data type".into()));
        }
        self.write_account_data(user, room, kind, &content).await
    }

    pub async fn account_data(&self, user: &UserId, room: Option<&RoomId>, kind: &str) -> Result<Value> {
        let json = self
            .store
            .account_data(user, room, kind)
            .await?
            .ok_or_else(|| Error::NotFound("account data not found".into()))?;
        serde_json::from_str(&json).map_err(|e| Error::Internal(e.to_string()))
    }

    async fn require_member(&self, user: &UserId, room_id: &RoomId) -> Result<()> {
        let room = self
            .rooms
            .room(room_id)
            .await
            .map_err(|_| Error::Forbidden("you are not in this room".into()))?;
        if room.read().membership(user) != Some(Membership::Join) {
            return Err(Error::Forbidden("you are not in this room".into()));
        }
        Ok(())
    }

    pub async fn set_receipt(
        &self,
        user: &UserId,
        room_id: &RoomId,
        receipt_type: &str,
        event_id: &EventId,
        thread_id: Option<String>,
    ) -> Result<()> {
        if !matches!(receipt_type, "m.read" | "m.read.private" | "m.fully_read") {
            return Err(Error::InvalidParam(format!("unknown receipt type {receipt_type}")));
        }
        self.require_member(user, room_id).await?;
        if self.store.event(event_id).await?.filter(|e| e.pdu.room_id == room_id).is_none() {
            return Err(Error::NotFound("event not found in this room".into()));
        }
        if receipt_type == "m.fully_read" {
            let content = serde_json::json!({ "event_id": event_id });
            return self.write_account_data(user, Some(room_id), "m.fully_read", &content).await;
        }
        let pos = self
            .store
            .put_receipt(ReceiptRecord {
                room_id: room_id.to_owned(),
                user_id: user.to_owned(),
                receipt_type: receipt_type.to_owned(),
                event_id: event_id.to_owned(),
                thread_id: thread_id.filter(|t| t != "main" || receipt_type.is_empty()),
                ts_ms: now_ms(),
                pos: 0,
            })
            .await?;
        self.rooms.applied().reached(pos).await;
        Ok(())
    }

    pub async fn put_filter(&self, user: &UserId, filter: &Value) -> Result<String> {
        let json = serde_json::to_string(filter).map_err(|e| Error::BadJson(e.to_string()))?;
        if json.len() > MAX_ACCOUNT_DATA_BYTES {
            return Err(Error::TooLarge("filter is too large".into()));
        }
        Ok(self.store.put_filter(user, &json).await?)
    }

    pub async fn filter(&self, user: &UserId, filter_id: &str) -> Result<Option<String>> {
        Ok(self.store.filter(user, filter_id).await?)
    }

    /// An uploaded filter, parsed, for `/sync`.
    pub async fn sync_filter(&self, user: &UserId, filter_id: &str) -> Result<Option<Arc<FilterDefinition>>> {
        let key = (user.to_owned(), filter_id.to_owned());
        if let Some(f) = self.filters.lock().expect("filters lock").get(&key) {
            return Ok(Some(f.clone()));
        }
        let Some(json) = self.store.filter(user, filter_id).await? else {
            return Ok(None);
        };
        let parsed: Arc<FilterDefinition> =
            Arc::new(serde_json::from_str(&json).map_err(|e| Error::BadJson(format!("invalid stored filter: {e}")))?);
        let mut filters = self.filters.lock().expect("filters lock");
        if filters.len() >= MAX_CACHED_FILTERS {
            filters.clear();
        }
        filters.insert(key, parsed.clone());
        Ok(Some(parsed))
    }

    pub async fn profile(&self, user: &UserId) -> Result<UserRecord> {
        self.store
            .user(user)
            .await?
            .filter(|u| !u.deactivated)
            .ok_or_else(|| Error::NotFound("profile not found".into()))
    }

    pub async fn set_profile(&self, user: &UserId, field: ProfileField, value: Option<String>) -> Result<()> {
        if value.as_ref().is_some_and(|v| v.len() > 1024) {
            return Err(Error::TooLarge("profile field is too long".into()));
        }
        if value.as_deref().is_some_and(kabar_domain::names::has_control_chars) {
            return Err(Error::InvalidParam("profile fields must not contain control characters".into()));
        }
        self.store.set_profile(user, field, value.as_deref()).await?;
        // The member events this sends wake whoever shares a room.
        self.rooms.propagate_profile(user).await?;
        Ok(())
    }

    pub async fn push_rules(&self, user: &UserId) -> Result<Ruleset> {
        match self.store.account_data(user, None, "m.push_rules").await? {
            Some(json) => {
                let v: Value = serde_json::from_str(&json).map_err(|e| Error::Internal(e.to_string()))?;
                serde_json::from_value(v["global"].clone()).map_err(|e| Error::Internal(e.to_string()))
            }
            None => Ok(Ruleset::server_default(user)),
        }
    }

    pub async fn set_push_rules(&self, user: &UserId, rules: &Ruleset) -> Result<()> {
        let content = serde_json::json!({ "global": rules });
        self.write_account_data(user, None, "m.push_rules", &content).await
    }

    /// Local, active users whose id or display name contains `term`, among
    /// those the directory shows `searcher`.
    pub async fn search_users(&self, searcher: &UserId, term: &str, limit: usize) -> Result<(Vec<UserRecord>, bool)> {
        let limit = limit.clamp(1, 100);
        let scope = match self.directory {
            DirectoryScope::KnownUsers => Some(searcher),
            DirectoryScope::AllUsers => None,
        };
        let mut found = self.store.search_users(term, limit + 1, scope).await?;
        let limited = found.len() > limit;
        found.truncate(limit);
        Ok((found, limited))
    }

    pub async fn joined_rooms(&self, user: &UserId) -> Result<Vec<OwnedRoomId>> {
        Ok(self
            .store
            .memberships(user)
            .await?
            .into_iter()
            .filter(|m| m.membership == Membership::Join)
            .map(|m| m.room_id)
            .collect())
    }
}
