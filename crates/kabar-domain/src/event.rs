//! Persistent data units (PDUs): how an event is built, hashed, signed and named.

use std::{collections::BTreeMap, sync::Arc};

use ruma::{
    CanonicalJsonObject, CanonicalJsonValue, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedServerName, OwnedUserId, RoomId,
    RoomVersionId, UserId, events::TimelineEventType, room_version_rules::RoomVersionRules, serde::Base64, signatures::Ed25519KeyPair,
};
use serde::Deserialize;
use serde_json::value::{RawValue, to_raw_value};

/// The spec's limit on a whole PDU, signatures included.
pub const MAX_PDU_BYTES: usize = 65_535;

/// `(event type, state key)`: the address of one piece of room state.
pub type StateKey = (String, String);

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("unsupported room version {0}")]
    UnsupportedRoomVersion(RoomVersionId),
    #[error("event is not valid JSON: {0}")]
    Json(String),
    #[error("event is too large")]
    TooLarge,
    #[error("signing failed: {0}")]
    Signing(String),
}

/// The server's signing identity: its name and its ed25519 key.
pub struct EventSigner {
    server_name: OwnedServerName,
    key: Ed25519KeyPair,
}

impl EventSigner {
    /// `pkcs8` is the DER document from [`EventSigner::generate_key`], kept by the store.
    pub fn new(server_name: OwnedServerName, pkcs8: &[u8], key_version: &str) -> Result<Self, BuildError> {
        let key = Ed25519KeyPair::from_der(pkcs8, key_version.to_owned()).map_err(|e| BuildError::Signing(e.to_string()))?;
        Ok(Self { server_name, key })
    }

    /// A fresh ed25519 key as a PKCS#8 DER document.
    pub fn generate_key() -> Vec<u8> {
        Ed25519KeyPair::generate().to_vec()
    }

    pub fn server_name(&self) -> &ruma::ServerName {
        &self.server_name
    }

    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().to_vec()
    }

    fn sign(&self, object: &mut CanonicalJsonObject, rules: &RoomVersionRules) -> Result<(), BuildError> {
        ruma::signatures::hash_and_sign_event(self.server_name.as_str(), &self.key, object, &rules.redaction)
            .map_err(|e| BuildError::Signing(e.to_string()))
    }
}

impl std::fmt::Debug for EventSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSigner")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// What a caller wants to put in a room; the builder fills in the rest.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: String,
    pub content: serde_json::Value,
    pub state_key: Option<String>,
    pub redacts: Option<OwnedEventId>,
}

impl NewEvent {
    pub fn message(kind: impl Into<String>, content: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            content,
            state_key: None,
            redacts: None,
        }
    }

    pub fn state(kind: impl Into<String>, state_key: impl Into<String>, content: serde_json::Value) -> Self {
        Self {
            kind: kind.into(),
            content,
            state_key: Some(state_key.into()),
            redacts: None,
        }
    }
}

/// A signed event as it sits in the room graph.
///
/// Cheap to clone: the parsed fields are small and the full JSON is shared.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: OwnedRoomId,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub kind: TimelineEventType,
    pub content: Arc<RawValue>,
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: u64,
    /// False only for a v12 create event, whose room id is implied by its hash.
    pub has_room_id: bool,
    /// The whole signed PDU in canonical JSON; but for a member event
    /// served from a room's cache, which keeps only what clients see of it,
    /// its client form (see `kabar_core::room_cache::MemberSlot`).
    pub json: Arc<str>,
}

#[derive(Deserialize)]
struct PduFields {
    #[serde(default)]
    room_id: Option<OwnedRoomId>,
    sender: OwnedUserId,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
    #[serde(rename = "type")]
    kind: TimelineEventType,
    content: Box<RawValue>,
    #[serde(default)]
    state_key: Option<String>,
    #[serde(default)]
    prev_events: Vec<OwnedEventId>,
    #[serde(default)]
    auth_events: Vec<OwnedEventId>,
    #[serde(default)]
    redacts: Option<OwnedEventId>,
    #[serde(default)]
    depth: u64,
}

impl Pdu {
    /// Rebuilds a PDU from what the store kept.
    pub fn from_stored(event_id: OwnedEventId, room_id: OwnedRoomId, json: &str) -> Result<Self, BuildError> {
        Self::from_shared_json(event_id, room_id, Arc::from(json))
    }

    /// [`Pdu::from_stored`] for JSON already held in memory, which the PDU
    /// then shares rather than copies.
    pub fn from_shared_json(event_id: OwnedEventId, room_id: OwnedRoomId, json: Arc<str>) -> Result<Self, BuildError> {
        let f: PduFields = serde_json::from_str(&json).map_err(|e| BuildError::Json(e.to_string()))?;
        let redacts = f.redacts.or_else(|| redacts_from_content(&f.content));
        let has_room_id = f.room_id.is_some();
        Ok(Self {
            event_id,
            room_id: f.room_id.unwrap_or(room_id),
            sender: f.sender,
            origin_server_ts: f.origin_server_ts,
            kind: f.kind,
            content: Arc::from(f.content),
            state_key: f.state_key,
            prev_events: f.prev_events,
            auth_events: f.auth_events,
            redacts,
            depth: f.depth,
            has_room_id,
            json,
        })
    }

    pub fn state_key_pair(&self) -> Option<StateKey> {
        self.state_key.as_ref().map(|k| (self.kind.to_string(), k.clone()))
    }

    pub fn content_value(&self) -> serde_json::Value {
        serde_json::from_str(self.content.get()).unwrap_or(serde_json::Value::Null)
    }

    /// Builds, hashes and signs a new event.
    ///
    /// For the `m.room.create` event of a room version whose room id is the create
    /// event's reference hash (v12), `room_id` is ignored and derived.
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        signer: &EventSigner,
        room_version: &RoomVersionId,
        room_id: Option<&RoomId>,
        sender: &UserId,
        event: NewEvent,
        prev_events: Vec<OwnedEventId>,
        auth_events: Vec<OwnedEventId>,
        depth: u64,
        now: MilliSecondsSinceUnixEpoch,
    ) -> Result<Pdu, BuildError> {
        let rules = room_version
            .rules()
            .ok_or_else(|| BuildError::UnsupportedRoomVersion(room_version.clone()))?;
        let is_create = event.kind == "m.room.create";
        let omit_room_id = is_create && rules.room_id_format == ruma::room_version_rules::RoomIdFormatVersion::V2;

        let mut object = CanonicalJsonObject::new();
        let to_canonical = |v: serde_json::Value| -> Result<CanonicalJsonValue, BuildError> {
            CanonicalJsonValue::try_from(v).map_err(|e| BuildError::Json(e.to_string()))
        };
        object.insert("type".into(), CanonicalJsonValue::String(event.kind.clone()));
        object.insert("sender".into(), CanonicalJsonValue::String(sender.to_string()));
        object.insert("origin_server_ts".into(), to_canonical(serde_json::json!(now))?);
        object.insert("depth".into(), to_canonical(serde_json::json!(depth))?);
        object.insert("content".into(), to_canonical(event.content)?);
        if !omit_room_id {
            let room_id = room_id.ok_or_else(|| BuildError::Json("room_id is required".into()))?;
            object.insert("room_id".into(), CanonicalJsonValue::String(room_id.to_string()));
        }
        if let Some(state_key) = &event.state_key {
            object.insert("state_key".into(), CanonicalJsonValue::String(state_key.clone()));
        }
        let ids = |v: &[OwnedEventId]| CanonicalJsonValue::Array(v.iter().map(|id| CanonicalJsonValue::String(id.to_string())).collect());
        object.insert("prev_events".into(), ids(&prev_events));
        object.insert("auth_events".into(), ids(&auth_events));
        if let Some(redacts) = &event.redacts {
            // v11+ carries `redacts` in content; older versions at the top level.
            // Both are written so every client reads it where it looks.
            object.insert("redacts".into(), CanonicalJsonValue::String(redacts.to_string()));
        }

        if serde_json::to_string(&object).map_or(0, |j| j.len()) > MAX_PDU_BYTES {
            return Err(BuildError::TooLarge);
        }
        signer.sign(&mut object, &rules)?;
        let hash = ruma::signatures::reference_hash(&object, &rules).map_err(|e| match e {
            ruma::signatures::JsonError::PduTooLarge => BuildError::TooLarge,
            other => BuildError::Json(other.to_string()),
        })?;
        let event_id = OwnedEventId::try_from(format!("${hash}")).map_err(|e| BuildError::Json(e.to_string()))?;
        let room_id = if omit_room_id {
            OwnedRoomId::try_from(format!("!{hash}")).map_err(|e| BuildError::Json(e.to_string()))?
        } else {
            room_id.expect("checked above").to_owned()
        };

        let json = serde_json::to_string(&object).map_err(|e| BuildError::Json(e.to_string()))?;
        if json.len() > MAX_PDU_BYTES {
            return Err(BuildError::TooLarge);
        }
        Pdu::from_stored(event_id, room_id, &json)
    }
}

fn redacts_from_content(content: &RawValue) -> Option<OwnedEventId> {
    #[derive(Deserialize)]
    struct Redacts {
        redacts: Option<OwnedEventId>,
    }
    serde_json::from_str::<Redacts>(content.get()).ok().and_then(|r| r.redacts)
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.has_room_id.then_some(&*self.room_id)
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        false
    }
}

/// Encodes the public half of the signing key as Matrix unpadded base64.
pub fn encode_public_key(key: &[u8]) -> String {
    Base64::<ruma::serde::base64::Standard, _>::new(key.to_vec()).encode()
}

/// Content to raw JSON, used where a value must be embedded verbatim.
pub fn raw(value: &serde_json::Value) -> Box<RawValue> {
    to_raw_value(value).expect("a serde_json::Value always serializes")
}

/// A small ordered map helper for state snapshots.
pub type StateMap<T> = BTreeMap<StateKey, T>;

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{owned_server_name, user_id};

    fn signer() -> EventSigner {
        EventSigner::new(owned_server_name!("localhost"), &EventSigner::generate_key(), "a").unwrap()
    }

    #[test]
    fn v12_create_event_names_the_room() {
        let s = signer();
        let pdu = Pdu::build(
            &s,
            &RoomVersionId::V12,
            None,
            user_id!("@alice:localhost"),
            NewEvent::state("m.room.create", "", serde_json::json!({"room_version": "12"})),
            vec![],
            vec![],
            1,
            MilliSecondsSinceUnixEpoch(1u32.into()),
        )
        .unwrap();
        assert_eq!(&pdu.room_id.as_str()[1..], &pdu.event_id.as_str()[1..]);
        assert!(!pdu.json.contains("\"room_id\""));
        assert!(pdu.json.contains("\"signatures\""));
        assert!(pdu.json.contains("\"hashes\""));
    }

    #[test]
    fn v11_event_id_is_reference_hash() {
        let s = signer();
        let room_id = ruma::room_id!("!r:localhost");
        let build = |ts: u32| {
            Pdu::build(
                &s,
                &RoomVersionId::V11,
                Some(room_id),
                user_id!("@alice:localhost"),
                NewEvent::message("m.room.message", serde_json::json!({"body": "hi", "msgtype": "m.text"})),
                vec![],
                vec![],
                2,
                MilliSecondsSinceUnixEpoch(ts.into()),
            )
            .unwrap()
        };
        let a = build(5);
        let b = build(5);
        let c = build(6);
        assert_eq!(a.event_id, b.event_id, "same content, same id");
        assert_ne!(a.event_id, c.event_id);
        assert_eq!(a.room_id, room_id);
    }

    #[test]
    fn oversized_event_is_refused() {
        let s = signer();
        let body = "x".repeat(70_000);
        let err = Pdu::build(
            &s,
            &RoomVersionId::V11,
            Some(ruma::room_id!("!r:localhost")),
            user_id!("@alice:localhost"),
            NewEvent::message("m.room.message", serde_json::json!({"body": body})),
            vec![],
            vec![],
            2,
            MilliSecondsSinceUnixEpoch(1u32.into()),
        )
        .unwrap_err();
        assert!(matches!(err, BuildError::TooLarge));
    }
}
