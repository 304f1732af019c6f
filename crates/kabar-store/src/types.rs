use std::sync::Arc;

use kabar_domain::Pdu;
pub use kabar_domain::membership::Membership;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId};

/// A position in the server's single ordered stream.
pub type StreamPos = u64;

#[derive(Debug, Clone)]
pub struct NewUser {
    pub user_id: OwnedUserId,
    pub password_hash: Option<String>,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub user_id: OwnedUserId,
    pub password_hash: Option<String>,
    pub deactivated: bool,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProfileField {
    DisplayName,
    AvatarUrl,
}

#[derive(Debug, Clone)]
pub struct NewDevice {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub display_name: Option<String>,
    pub token_hash: String,
    pub now_ms: u64,
    /// The client address it signed in from.
    pub ip: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ms: Option<u64>,
    pub last_seen_ip: Option<String>,
}

/// Who an access token belongs to: one device of one user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: String,
}

/// A user-interactive authentication session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiaSessionRecord {
    /// What it was started for: proving something for one request never
    /// authorizes another.
    pub request: String,
    /// Stages completed so far, in order.
    pub completed: Vec<String>,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    pub room_id: OwnedRoomId,
    pub version: RoomVersionId,
    pub creator: OwnedUserId,
    pub is_public: bool,
}

/// The client transaction an event was sent under. A transaction id is
/// unique per device, room and `scope` (the endpoint and what its path
/// names: `send/<event type>`, `redact/<event id>`), as the request path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnRef {
    pub device_id: String,
    pub txn_id: String,
    pub scope: String,
}

/// The state event a state event replaced, as clients see it in
/// `unsigned.prev_content`, `prev_sender` and `replaces_state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrevState {
    pub event_id: OwnedEventId,
    pub sender: OwnedUserId,
    /// Its content as stored (redacted if the event was redacted since).
    pub content: String,
}

impl PrevState {
    /// What a state event replacing `pdu` shows as its previous state.
    pub fn of(pdu: &Pdu) -> Self {
        Self {
            event_id: pdu.event_id.clone(),
            sender: pdu.sender.clone(),
            content: pdu.content.get().to_owned(),
        }
    }
}

/// An event to append, with what the store must index about it.
#[derive(Debug, Clone)]
pub struct EventWrite {
    pub pdu: Pdu,
    pub txn: Option<TxnRef>,
    /// `(target event, rel_type)` from `content["m.relates_to"]`.
    pub relation: Option<(OwnedEventId, String)>,
    /// For a redaction: the target's new, redacted PDU JSON.
    pub redacted_target: Option<(OwnedEventId, String)>,
    /// For a state event: the state it replaces.
    pub prev: Option<PrevState>,
    /// The room's newest event this one was built on (its `prev_events`).
    /// When set, the event is appended only if that is still the room's
    /// newest event; `None` appends without the check. It may be an event
    /// queued just before this one and not yet committed (see
    /// [`RoomStore::queue_append`](crate::RoomStore::queue_append)).
    pub expected_head: Option<OwnedEventId>,
}

/// The outcome of a queued append, ready once its group commit is durable.
pub type AppendFuture = std::pin::Pin<Box<dyn std::future::Future<Output = crate::StoreResult<AppendOutcome>> + Send + 'static>>;

#[derive(Debug, Clone)]
pub enum AppendOutcome {
    Appended(StreamPos),
    /// The transaction id was already used; nothing was written.
    Duplicate(OwnedEventId),
    /// The room's newest event is not `expected_head` (another writer
    /// appended first, or the event it names did not land); nothing was
    /// written. `head` is the position of the room's newest event: rebuild
    /// on it and retry.
    HeadMoved {
        head: StreamPos,
    },
}

#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub pos: StreamPos,
    pub pdu: Pdu,
    pub txn: Option<TxnRef>,
    /// The redaction event that redacted this one, if any.
    pub redacted_by: Option<OwnedEventId>,
    /// For a state event: the state it replaced.
    pub prev: Option<PrevState>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

#[derive(Debug, Clone, Copy)]
pub struct EventRange<'a> {
    pub room_id: &'a RoomId,
    /// Exclusive lower bound.
    pub after: StreamPos,
    /// Inclusive upper bound.
    pub until: StreamPos,
    /// Which end to start reading from.
    pub direction: Direction,
    pub limit: usize,
    /// Only events of these exact types (`None`: every type). The others
    /// are passed over without being read, and do not count to `limit`.
    pub kinds: Option<&'a [String]>,
    /// Events of these exact types are passed over the same way (a sync's
    /// unread count never judges member events: a big room's joins would
    /// fill every read).
    pub not_kinds: &'a [String],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembershipRecord {
    pub room_id: OwnedRoomId,
    pub membership: Membership,
    pub pos: StreamPos,
    pub event_id: OwnedEventId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountDataRecord {
    pub room_id: Option<OwnedRoomId>,
    pub kind: String,
    pub content: Arc<str>,
    pub pos: StreamPos,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptRecord {
    pub room_id: OwnedRoomId,
    pub user_id: OwnedUserId,
    pub receipt_type: String,
    pub event_id: OwnedEventId,
    /// `None` for an unthreaded receipt.
    pub thread_id: Option<String>,
    pub ts_ms: u64,
    /// Assigned by the store; ignored on write.
    pub pos: StreamPos,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaRecord {
    pub media_id: String,
    pub content_type: Option<String>,
    pub filename: Option<String>,
    pub sha256: String,
    pub size: u64,
    pub uploader: OwnedUserId,
    pub created_ms: u64,
}

/// What deleting devices did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DevicesRemoved {
    pub count: usize,
    /// The position of the change, if any device was removed: a change of
    /// the user's device list (other users' clients must learn it is gone)
    /// and of their sessions (its token stops working).
    pub list_changed_at: Option<StreamPos>,
}

/// A one-time or fallback key as uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneTimeKey {
    pub algorithm: String,
    /// The whole id, `<algorithm>:<id>`.
    pub key_id: String,
    pub json: String,
}

/// A device's published identity keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKeysRecord {
    pub device_id: String,
    pub json: String,
    pub display_name: Option<String>,
}

/// How many unclaimed one-time keys a device has, per algorithm, and which
/// algorithms have a fallback key nobody has claimed yet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeyCounts {
    pub one_time: std::collections::BTreeMap<String, u64>,
    pub unused_fallback: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClaim {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub algorithm: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKey {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub key_id: String,
    pub json: String,
}

pub use kabar_domain::e2ee::CrossSigningKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrossSigningKey {
    pub kind: CrossSigningKind,
    /// The key's ed25519 public key, which signatures name as their target.
    pub public_key: String,
    pub json: String,
}

/// One signature on a device key (target = device id) or a cross-signing key
/// (target = its public key), kept apart from the signed object so signatures
/// from several signers accumulate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySignature {
    pub target_user: OwnedUserId,
    pub target_key: String,
    pub signer: OwnedUserId,
    /// `ed25519:<device id or public key>`.
    pub signer_key_id: String,
    pub signature: String,
}

/// A to-device message to queue for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToDeviceMessage {
    pub recipient: OwnedUserId,
    pub device_id: String,
    pub kind: String,
    pub content: String,
}

/// A queued to-device message, with its position in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedToDevice {
    pub pos: StreamPos,
    pub sender: OwnedUserId,
    pub kind: String,
    pub content: String,
}

/// One version of a user's server-side key backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupVersion {
    pub version: u64,
    pub algorithm: String,
    pub auth_data: String,
    /// Changes whenever the version's keys change.
    pub etag: u64,
    pub count: u64,
}

/// One backed-up room key (a `KeyBackupData` object).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupKey {
    pub room_id: OwnedRoomId,
    pub session_id: String,
    pub rank: kabar_domain::e2ee::BackupKeyRank,
    pub json: String,
}

/// Which backed-up keys an operation covers: all, a room's, or one session's.
#[derive(Debug, Clone, Copy)]
pub struct BackupScope<'a> {
    pub room_id: Option<&'a RoomId>,
    pub session_id: Option<&'a str>,
}

/// A backup write's result: the version's etag and key count afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupWrite {
    Done {
        etag: u64,
        count: u64,
    },
    /// The version is not the user's current one (`None`: there is no backup).
    WrongVersion {
        current: Option<u64>,
    },
}

/// One room as a room list orders and filters it (see
/// `RoomStore::room_list_entries`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomListEntry {
    pub room_id: OwnedRoomId,
    pub bump: StreamPos,
    pub encrypted: bool,
    pub room_type: Option<String>,
}

/// The `type` of a room from its create event's JSON, if it has one.
pub fn room_type_of_create(create_json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(create_json).ok()?;
    v.get("content")?.get("type")?.as_str().map(str::to_owned)
}
