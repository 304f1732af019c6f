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

    /// `POST /pushers/set`: stores the pusher the body describes, or with
    /// `kind: null` removes the user's pusher for its app id and push key.
    /// Kabar stores pushers (so clients find them again) but does not call
    /// push gateways yet.
    pub async fn set_pusher(&self, user: &UserId, body: &Value) -> Result<()> {
        match check_pusher(body)? {
            PusherChange::Delete { app_id, pushkey } => {
                self.store.delete_pusher(user, &app_id, &pushkey).await?;
            }
            PusherChange::Set {
                app_id,
                pushkey,
                pusher,
                append,
            } => {
                let json = serde_json::to_string(&pusher).map_err(|e| Error::BadJson(e.to_string()))?;
                self.store.set_pusher(user, &app_id, &pushkey, &json, !append).await?;
            }
        }
        Ok(())
    }

    /// The user's pushers, as `GET /pushers` shows them.
    pub async fn pushers(&self, user: &UserId) -> Result<Vec<Value>> {
        let stored = self.store.pushers(user).await?;
        Ok(stored.iter().filter_map(|j| serde_json::from_str(j).ok()).collect())
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

/// What a `POST /pushers/set` body asks for.
#[derive(Debug, PartialEq)]
pub enum PusherChange {
    Delete {
        app_id: String,
        pushkey: String,
    },
    Set {
        app_id: String,
        pushkey: String,
        /// The pusher as `GET /pushers` shows it.
        pusher: Value,
        /// Keep other users' pushers with this app id and push key.
        append: bool,
    },
}

/// Checks a `POST /pushers/set` body as the spec describes it: `app_id` of
/// at most 64 characters, `pushkey` of at most 512 bytes, and for a new
/// pusher an `http` kind (email pushers are not supported) whose
/// `data.url` is an http(s) URL ending in `/_matrix/push/v1/notify`.
pub fn check_pusher(body: &Value) -> Result<PusherChange> {
    let invalid = |m: &str| Error::InvalidParam(m.to_owned());
    let text = |field: &str| -> Result<String> {
        body.get(field)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| Error::BadJson(format!("{field} must be a string")))
    };
    let app_id = text("app_id")?;
    let pushkey = text("pushkey")?;
    if app_id.is_empty() || app_id.chars().count() > 64 {
        return Err(invalid("app_id must be 1 to 64 characters"));
    }
    if pushkey.is_empty() || pushkey.len() > 512 {
        return Err(invalid("pushkey must be 1 to 512 bytes"));
    }
    match body.get("kind") {
        Some(Value::Null) => return Ok(PusherChange::Delete { app_id, pushkey }),
        Some(Value::String(k)) if k == "http" => {}
        Some(Value::String(k)) if k == "email" => return Err(invalid("email pushers are not supported by this server")),
        _ => return Err(invalid("kind must be \"http\" or null")),
    }
    let data = body
        .get("data")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::BadJson("data must be an object".into()))?;
    let url = data
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("an http pusher needs data.url"))?;
    let path_ok = url.split(['?', '#']).next().is_some_and(|u| u.ends_with("/_matrix/push/v1/notify"));
    if !(url.starts_with("https://") || url.starts_with("http://")) || !path_ok {
        return Err(invalid("data.url must be an http(s) URL ending in /_matrix/push/v1/notify"));
    }
    let append = match body.get("append") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Error::BadJson("append must be a boolean".into())),
    };
    let mut pusher = serde_json::json!({
        "app_id": app_id,
        "pushkey": pushkey,
        "kind": "http",
        "app_display_name": text("app_display_name")?,
        "device_display_name": text("device_display_name")?,
        "lang": text("lang")?,
        "data": data,
    });
    if let Some(tag) = body.get("profile_tag").and_then(Value::as_str) {
        if tag.chars().count() > 32 {
            return Err(invalid("profile_tag must be at most 32 characters"));
        }
        pusher["profile_tag"] = Value::from(tag);
    }
    Ok(PusherChange::Set {
        app_id,
        pushkey,
        pusher,
        append,
    })
}

#[cfg(test)]
mod pusher_tests {
    use serde_json::json;

    use super::*;

    fn pusher() -> Value {
        json!({
            "app_id": "io.element.elementx", "pushkey": "abc", "kind": "http",
            "app_display_name": "Element X", "device_display_name": "phone", "lang": "en",
            "data": {"url": "https://push.example.org/_matrix/push/v1/notify", "format": "event_id_only"}
        })
    }

    #[test]
    fn a_pusher_is_checked_as_the_spec_describes_it() {
        match check_pusher(&pusher()).unwrap() {
            PusherChange::Set { pusher, append, .. } => {
                assert!(!append);
                assert_eq!(pusher["data"]["format"], "event_id_only");
            }
            other => panic!("{other:?}"),
        }
        let mut delete = pusher();
        delete["kind"] = Value::Null;
        assert!(matches!(check_pusher(&delete).unwrap(), PusherChange::Delete { .. }));
        for (field, value) in [
            ("kind", json!("email")),
            ("kind", json!("carrier pigeon")),
            ("app_id", json!("x".repeat(65))),
            ("pushkey", json!("")),
            ("data", json!({"url": "https://push.example.org/elsewhere"})),
            ("data", json!({"url": "ftp://push.example.org/_matrix/push/v1/notify"})),
            ("data", json!({})),
            ("profile_tag", json!("t".repeat(33))),
        ] {
            let mut bad = pusher();
            bad[field] = value.clone();
            assert!(matches!(check_pusher(&bad), Err(Error::InvalidParam(_))), "{field}: {value}");
        }
        for (field, value) in [
            ("app_id", json!(5)),
            ("lang", Value::Null),
            ("data", json!("x")),
            ("append", json!("yes")),
        ] {
            let mut bad = pusher();
            bad[field] = value.clone();
            assert!(matches!(check_pusher(&bad), Err(Error::BadJson(_))), "{field}: {value}");
        }
    }
}
