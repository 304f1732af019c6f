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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRecord {
    pub device_id: String,
    pub display_name: Option<String>,
    pub last_seen_ms: Option<u64>,
}

/// Who an access token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user_id: OwnedUserId,
    pub device_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomRecord {
    pub room_id: OwnedRoomId,
    pub version: RoomVersionId,
    pub creator: OwnedUserId,
    pub is_public: bool,
}

/// The client transaction an event was sent under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnRef {
    pub device_id: String,
    pub txn_id: String,
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
}

#[derive(Debug, Clone)]
pub enum AppendOutcome {
    Appended(StreamPos),
    /// The transaction id was already used; nothing was written.
    Duplicate(OwnedEventId),
}

#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub pos: StreamPos,
    pub pdu: Pdu,
    pub txn: Option<TxnRef>,
    /// The redaction event that redacted this one, if any.
    pub redacted_by: Option<OwnedEventId>,
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
