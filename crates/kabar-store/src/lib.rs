//! The storage interface of Kabar.
//!
//! **API boundary:** nothing above this crate knows which engine holds the
//! data. Services talk to [`Store`], a set of typed traits grouped by domain;
//! each engine (the embedded SQLite one today, PostgreSQL later) implements
//! them and runs the same [`conformance`] suite.
//!
//! **Invariants every engine keeps:**
//! - A write that returned `Ok` is durable (it survives the process being killed).
//! - Stream positions are assigned at commit, strictly increasing, never reused,
//!   and a reader that sees position `n` sees every position below it.
//! - Every write that changes what a sync, a cache or a token check would
//!   answer records its [`Change`] at its position: the engine hands it to its
//!   [`CommitListener`] on commit and replays it through
//!   [`StreamStore::updates_after`]. Writes that return a position return
//!   the position of that change.
//! - An event appended with an `expected_head` lands only on that head: two
//!   writers building on one head cannot both append (the second is told
//!   `HeadMoved` and rebuilds).
//! - Appends one process queues commit in the order they were queued, so
//!   an event may be built on one still being committed: if that one does
//!   not land, neither does any event built on it.
//! - `(user, device, txn_id)` maps to at most one event: a repeated send returns
//!   the first event instead of storing a second.

pub mod conformance;
pub mod copy;
pub mod media_content;
mod stream;
mod stream_wire;
mod types;

use async_trait::async_trait;
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId};

pub use stream::*;
pub use types::*;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness rule was hit (user exists, alias taken, ...).
    #[error("conflict: {0}")]
    Conflict(String),
    /// Stored data could not be read back; never caused by client input.
    #[error("corrupt stored data: {0}")]
    Corrupt(String),
    /// The engine failed (I/O, shutdown).
    #[error("storage backend: {0}")]
    Backend(String),
    /// The database cannot be reached now (a networked engine lost its
    /// connection); nothing was written, and it may work again later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Accounts, devices, access tokens and profiles.
#[async_trait]
pub trait AccountStore: Send + Sync {
    /// Creates a user; `Conflict` if the id is taken (also by a deactivated user).
    async fn create_user(&self, user: NewUser) -> StoreResult<()>;
    async fn user(&self, user_id: &UserId) -> StoreResult<Option<UserRecord>>;
    async fn set_password_hash(&self, user_id: &UserId, hash: &str) -> StoreResult<()>;
    /// Marks the user deactivated and removes every device and token.
    async fn deactivate_user(&self, user_id: &UserId) -> StoreResult<DevicesRemoved>;
    async fn set_profile(&self, user_id: &UserId, field: ProfileField, value: Option<&str>) -> StoreResult<()>;
    /// Active users whose id or display name contains `term`
    /// (case-insensitive). With a `searcher`, only users who share a room
    /// with them, are in a room anyone may join, or are the searcher.
    async fn search_users(&self, term: &str, limit: usize, searcher: Option<&UserId>) -> StoreResult<Vec<UserRecord>>;

    /// Creates or replaces a device and its access token (stored as a hash):
    /// a change of the user's sessions (the replaced token stops working),
    /// and for a new device of their device list too. Returns its position.
    async fn upsert_device(&self, device: NewDevice) -> StoreResult<StreamPos>;
    async fn session_by_token_hash(&self, token_hash: &str) -> StoreResult<Option<Session>>;
    async fn devices(&self, user_id: &UserId) -> StoreResult<Vec<DeviceRecord>>;
    /// Renames a device, a change of the user's device list (other users see
    /// the name): its position, or `None` if there is no such device.
    async fn rename_device(&self, user_id: &UserId, device_id: &str, name: Option<&str>) -> StoreResult<Option<StreamPos>>;
    /// Notes when and from where a device was last used.
    async fn touch_device(&self, user_id: &UserId, device_id: &str, ip: &str, now_ms: u64) -> StoreResult<()>;
    /// Deletes devices with their tokens, keys and queued to-device
    /// messages, and records a device-list change if any was removed.
    async fn delete_devices(&self, user_id: &UserId, device_ids: &[String]) -> StoreResult<DevicesRemoved>;
    /// [`delete_devices`](Self::delete_devices) for every device of the user except `keep`.
    async fn delete_all_devices(&self, user_id: &UserId, keep: Option<&str>) -> StoreResult<DevicesRemoved>;
}

/// User-interactive authentication sessions. Kept in the store so that a
/// client may take the next step through any process on the database.
#[async_trait]
pub trait AuthSessionStore: Send + Sync {
    /// Starts a session for `request` (who asks, to do what).
    async fn create_uia_session(&self, session_id: &str, request: &str, now_ms: u64) -> StoreResult<()>;
    async fn uia_session(&self, session_id: &str) -> StoreResult<Option<UiaSessionRecord>>;
    /// Marks `stage` complete (once); returns every completed stage, or
    /// `None` if there is no such session.
    async fn complete_uia_stage(&self, session_id: &str, stage: &str) -> StoreResult<Option<Vec<String>>>;
    /// Ends a session; true only for the one caller that ended it, so a
    /// completed session authorizes one request, on whichever process.
    async fn delete_uia_session(&self, session_id: &str) -> StoreResult<bool>;
    /// Deletes sessions started before `before_ms`; returns how many.
    async fn expire_uia_sessions(&self, before_ms: u64) -> StoreResult<usize>;
}

/// Rooms, their events and state.
#[async_trait]
pub trait RoomStore: Send + Sync {
    /// Creates the room and appends its first events in one transaction.
    async fn create_room(&self, room: RoomRecord, events: Vec<EventWrite>) -> StoreResult<Vec<StreamPos>>;
    async fn room(&self, room_id: &RoomId) -> StoreResult<Option<RoomRecord>>;
    async fn set_room_public(&self, room_id: &RoomId, public: bool) -> StoreResult<()>;
    async fn public_rooms(&self) -> StoreResult<Vec<OwnedRoomId>>;
    /// What a room list needs of each room, without its whole state: the
    /// position of its newest event of one of `bump_kinds` (or of any event
    /// when it has none), whether it is encrypted, and its type (from the
    /// create event). Rooms the store does not know are left out.
    async fn room_list_entries(&self, room_ids: &[OwnedRoomId], bump_kinds: &[&str]) -> StoreResult<Vec<RoomListEntry>>;

    /// Appends one event, updates current state and membership, records the
    /// transaction id; applies a redaction's effect on its target. Returns the
    /// existing event instead if the transaction id was used before.
    async fn append_event(&self, event: EventWrite) -> StoreResult<AppendOutcome> {
        self.queue_append(event).await
    }
    /// [`append_event`](Self::append_event), queued before this returns:
    /// appends queued one after another commit in that order (in one group
    /// commit or in consecutive ones), so the next event of a room can be
    /// built on this one while it is being committed.
    fn queue_append(&self, event: EventWrite) -> AppendFuture;
    async fn event(&self, event_id: &ruma::EventId) -> StoreResult<Option<StoredEvent>>;
    /// The event `sender` sent in the room under this transaction.
    async fn event_by_txn(&self, room_id: &RoomId, sender: &UserId, txn: &TxnRef) -> StoreResult<Option<OwnedEventId>>;
    /// Events of a room in stream order between two positions (exclusive
    /// `after`, inclusive `until`), from the `direction` end, at most `limit`.
    async fn room_events(&self, range: EventRange<'_>) -> StoreResult<Vec<StoredEvent>>;
    /// The position of the room's `count`-th event counted from `from` in
    /// `direction`, read from the index alone: backwards the `count`-th
    /// newest at or before `from` (the first is the newest), forwards the
    /// `count`-th oldest after `from`; `None` when the room has fewer.
    /// Bounds a filtered read: a filter for messages in a room of a million
    /// joins must not pass over every join.
    async fn room_position(&self, room_id: &RoomId, from: StreamPos, direction: Direction, count: usize) -> StoreResult<Option<StreamPos>>;
    /// Events that relate to `event_id`, oldest first.
    async fn relations(
        &self,
        room_id: &RoomId,
        event_id: &ruma::EventId,
        rel_type: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// Events that have `m.thread` replies, most recently active first, with
    /// the position of their latest reply.
    async fn thread_roots(&self, room_id: &RoomId, limit: usize) -> StoreResult<Vec<(OwnedEventId, StreamPos)>>;
    async fn current_state(&self, room_id: &RoomId) -> StoreResult<Vec<StoredEvent>>;
    /// The room's state right after the event at stream position `at`: for
    /// each (type, state key), the newest state event at or before `at`.
    async fn state_at(&self, room_id: &RoomId, at: StreamPos) -> StoreResult<Vec<StoredEvent>>;
    /// One page of [`RoomStore::state_at`] in (type, state key) order: at
    /// most `limit` entries whose key comes after `after` (none: from the
    /// first). A room of a million members is loaded a page at a time
    /// rather than held whole as events.
    async fn state_at_page(
        &self,
        room_id: &RoomId,
        at: StreamPos,
        after: Option<(&str, &str)>,
        limit: usize,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// Every state event of one (type, state key) in the room, oldest first.
    async fn state_history(&self, room_id: &RoomId, kind: &str, state_key: &str) -> StoreResult<Vec<StoredEvent>>;
    /// The room's join events (membership `join`, a profile change included)
    /// after `after` up to `until`, oldest first, at most `limit`: who
    /// joined where, without reading each event whole (a channel's view
    /// counter reads a million of them back after a start).
    async fn member_joins(
        &self,
        room_id: &RoomId,
        after: StreamPos,
        until: StreamPos,
        limit: usize,
    ) -> StoreResult<Vec<(OwnedUserId, StreamPos)>>;
    /// Every membership event of `user_id` in the room, oldest first.
    async fn membership_history(&self, room_id: &RoomId, user_id: &UserId) -> StoreResult<Vec<MembershipRecord>>;
    /// Current memberships of a user, in every room they have one in. A
    /// membership's position is where it last changed value: a new member
    /// event with the same membership (a profile change) does not move it.
    async fn memberships(&self, user_id: &UserId) -> StoreResult<Vec<MembershipRecord>>;
    /// Drops a left room from the user's lists (`/forget`); a change of the
    /// user's memberships at the returned position.
    async fn forget_room(&self, user_id: &UserId, room_id: &RoomId) -> StoreResult<StreamPos>;

    async fn set_alias(&self, alias: &str, room_id: &RoomId, creator: &UserId) -> StoreResult<()>;
    async fn alias(&self, alias: &str) -> StoreResult<Option<(OwnedRoomId, OwnedUserId)>>;
    async fn delete_alias(&self, alias: &str) -> StoreResult<bool>;
    async fn room_aliases(&self, room_id: &RoomId) -> StoreResult<Vec<String>>;
}

/// Per-user data: account data, receipts, filters, pushers.
#[async_trait]
pub trait UserDataStore: Send + Sync {
    async fn put_account_data(&self, user_id: &UserId, room_id: Option<&RoomId>, kind: &str, content: &str) -> StoreResult<StreamPos>;
    async fn account_data(&self, user_id: &UserId, room_id: Option<&RoomId>, kind: &str) -> StoreResult<Option<String>>;
    /// Account data changed after `since` (all of it for `since = 0`).
    async fn account_data_since(&self, user_id: &UserId, since: StreamPos) -> StoreResult<Vec<AccountDataRecord>>;

    async fn put_receipt(&self, receipt: ReceiptRecord) -> StoreResult<StreamPos>;
    /// The user's own unthreaded receipt of this type in the room.
    async fn receipt(&self, room_id: &RoomId, user_id: &UserId, receipt_type: &str) -> StoreResult<Option<ReceiptRecord>>;
    /// The latest receipt of each (user, type, thread) in the room changed
    /// after `since`, in position order; only `by`'s when given (a channel
    /// member is told of their own receipts only).
    async fn receipts_since(&self, room_id: &RoomId, since: StreamPos, by: Option<&UserId>) -> StoreResult<Vec<ReceiptRecord>>;

    async fn put_filter(&self, user_id: &UserId, filter_json: &str) -> StoreResult<String>;
    async fn filter(&self, user_id: &UserId, filter_id: &str) -> StoreResult<Option<String>>;

    /// Stores the user's pusher for `(app_id, pushkey)` (`json`: the pusher
    /// as `GET /pushers` shows it), replacing the user's one for that pair.
    /// With `replace_others`, every other user's pusher for the pair goes
    /// (a push key belongs to one app install, the spec's `append: false`).
    async fn set_pusher(&self, user_id: &UserId, app_id: &str, pushkey: &str, json: &str, replace_others: bool) -> StoreResult<()>;
    /// Removes the user's pusher for `(app_id, pushkey)`; whether there was one.
    async fn delete_pusher(&self, user_id: &UserId, app_id: &str, pushkey: &str) -> StoreResult<bool>;
    /// The user's pushers' JSON, oldest first.
    async fn pushers(&self, user_id: &UserId) -> StoreResult<Vec<String>>;
}

/// End-to-end encryption keys. The server stores and hands them out; it
/// cannot use them. Every change to what `/keys/query` shows for a user gets
/// a stream position (a device-list change), so syncs can tell who changed.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Stores a device's identity keys. Returns the device-list change's
    /// position, or `None` if the same keys were stored already.
    async fn put_device_keys(&self, user_id: &UserId, device_id: &str, json: &str) -> StoreResult<Option<StreamPos>>;
    /// Identity keys of the user's devices that published them.
    async fn device_keys(&self, user_id: &UserId) -> StoreResult<Vec<DeviceKeysRecord>>;
    /// Adds one-time keys. A key id stored before with the same JSON is
    /// skipped; with other JSON it is a `Conflict` and nothing is stored.
    /// Returns the position of the change of the device's key counts.
    async fn add_one_time_keys(&self, user_id: &UserId, device_id: &str, keys: Vec<OneTimeKey>) -> StoreResult<StreamPos>;
    /// Sets the device's fallback key for each algorithm given, as unused;
    /// returns the change's position.
    async fn put_fallback_keys(&self, user_id: &UserId, device_id: &str, keys: Vec<OneTimeKey>) -> StoreResult<StreamPos>;
    async fn key_counts(&self, user_id: &UserId, device_id: &str) -> StoreResult<KeyCounts>;
    /// For each claim, removes and returns one one-time key of the algorithm,
    /// or else the device's fallback key (marked used, kept). Atomic: two
    /// claims, concurrent or not, never get the same one-time key. Each
    /// device that gave a key has its key counts changed.
    async fn claim_keys(&self, claims: Vec<KeyClaim>) -> StoreResult<Vec<ClaimedKey>>;
    /// Replaces the user's cross-signing keys of the kinds given; returns the
    /// device-list change's position.
    async fn put_cross_signing_keys(&self, user_id: &UserId, keys: Vec<CrossSigningKey>) -> StoreResult<StreamPos>;
    async fn cross_signing_keys(&self, user_id: &UserId) -> StoreResult<Vec<CrossSigningKey>>;
    /// Adds signatures (replacing one by the same signer key on the same
    /// target); records a device-list change for every target user.
    async fn put_signatures(&self, signatures: Vec<KeySignature>) -> StoreResult<StreamPos>;
    /// Every signature on the user's keys.
    async fn signatures(&self, target_user: &UserId) -> StoreResult<Vec<KeySignature>>;
    /// Users whose device list changed at positions in `(after, until]`, each
    /// once with its latest change, in stream order.
    async fn device_list_changes(&self, after: StreamPos, until: StreamPos) -> StoreResult<Vec<(OwnedUserId, StreamPos)>>;
}

/// Send-to-device messages, queued per device until the device has synced past them.
#[async_trait]
pub trait ToDeviceStore: Send + Sync {
    /// Queues messages to existing devices (to a device that does not exist,
    /// nothing) under the sender's transaction id. Returns the last position
    /// used, or `None` if the transaction was used before (nothing queued).
    /// The transaction is scoped to the sending device and the event type.
    async fn queue_to_device(
        &self,
        sender: &Session,
        kind: &str,
        txn_id: &str,
        messages: Vec<ToDeviceMessage>,
    ) -> StoreResult<Option<StreamPos>>;
    /// Queued messages of one device in `(after, until]`, oldest first, at most `limit`.
    async fn to_device(
        &self,
        user_id: &UserId,
        device_id: &str,
        after: StreamPos,
        until: StreamPos,
        limit: usize,
    ) -> StoreResult<Vec<QueuedToDevice>>;
    /// Deletes the device's messages at or before `upto`; returns how many.
    async fn delete_to_device(&self, user_id: &UserId, device_id: &str, upto: StreamPos) -> StoreResult<usize>;
}

/// Server-side key backups: versions and the encrypted room keys in them.
#[async_trait]
pub trait KeyBackupStore: Send + Sync {
    /// Creates a new version, which becomes the current one; returns its number.
    async fn create_backup_version(&self, user_id: &UserId, algorithm: &str, auth_data: &str) -> StoreResult<u64>;
    /// A version (`None`: the current one, the newest not deleted).
    async fn backup_version(&self, user_id: &UserId, version: Option<u64>) -> StoreResult<Option<BackupVersion>>;
    /// Replaces a version's auth data; false if there is no such version.
    async fn update_backup_version(&self, user_id: &UserId, version: u64, auth_data: &str) -> StoreResult<bool>;
    /// Deletes a version and its keys; false if there was none.
    async fn delete_backup_version(&self, user_id: &UserId, version: u64) -> StoreResult<bool>;
    /// Stores keys into the current version, each replacing the stored copy
    /// only if it ranks better ([`kabar_domain::e2ee::BackupKeyRank`]).
    async fn put_backup_keys(&self, user_id: &UserId, version: u64, keys: Vec<BackupKey>) -> StoreResult<BackupWrite>;
    async fn backup_keys(&self, user_id: &UserId, version: u64, scope: BackupScope<'_>) -> StoreResult<Vec<BackupKey>>;
    /// Deletes keys of the version; answers like `put_backup_keys`, but any existing version may be named.
    async fn delete_backup_keys(&self, user_id: &UserId, version: u64, scope: BackupScope<'_>) -> StoreResult<BackupWrite>;
}

/// Media metadata; the bytes live in the media directory, named by hash.
#[async_trait]
pub trait MediaStore: Send + Sync {
    async fn put_media(&self, media: MediaRecord) -> StoreResult<()>;
    async fn media(&self, media_id: &str) -> StoreResult<Option<MediaRecord>>;
    /// When unauthenticated media was frozen for this server (Matrix 1.11):
    /// media created before it may still be served on the legacy paths.
    async fn media_freeze_ms(&self) -> StoreResult<u64>;
}

/// The bytes of uploaded media, by content hash (SHA-256 in hex). Separate
/// from [`Store`]: where the bytes live is chosen apart from where the
/// records do (`media.storage`). Engines: a directory
/// ([`media_content::DirectoryContent`], shared between nodes only if the
/// directory is) and the PostgreSQL database (needs nothing shared).
#[async_trait]
pub trait MediaContent: Send + Sync {
    /// Stores `bytes` under `sha256` unless they are there already; durable
    /// once it returns.
    async fn put_content(&self, sha256: &str, bytes: Vec<u8>) -> StoreResult<()>;
    /// The bytes stored under `sha256`, to stream.
    async fn content(&self, sha256: &str) -> StoreResult<Option<media_content::ContentReader>>;
}

/// Server-wide secrets and registration tokens.
#[async_trait]
pub trait ServerStore: Send + Sync {
    /// Returns the stored signing key, storing `generate()` first if there is none.
    async fn signing_key(&self, generate: Vec<u8>) -> StoreResult<Vec<u8>>;
    async fn create_registration_token(&self, token: &str, uses_allowed: Option<u32>, expiry_ms: Option<u64>) -> StoreResult<()>;
    /// Uses the token once if it is valid now; false if unknown, used up or expired.
    async fn use_registration_token(&self, token: &str, now_ms: u64) -> StoreResult<bool>;
    async fn registration_token_valid(&self, token: &str, now_ms: u64) -> StoreResult<bool>;
    /// Proves the engine can still read and commit (a health check): `Ok`
    /// only after one read and one durable write both went through.
    async fn ping(&self) -> StoreResult<()>;
}

/// The two kinds of storage operation whose latency is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StoreOp {
    Read,
    /// Until durable (a commit), queueing included.
    Write,
}

impl StoreOp {
    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::Read => "read",
            StoreOp::Write => "write",
        }
    }
}

/// Told how long each storage operation took, as the caller saw it (for
/// metrics). Engines call it; the binary decides where the numbers go.
pub trait StoreObserver: Send + Sync {
    fn observe(&self, op: StoreOp, elapsed: std::time::Duration);
}

/// Everything a Kabar server stores.
pub trait Store:
    StreamStore
    + AccountStore
    + AuthSessionStore
    + RoomStore
    + UserDataStore
    + KeyStore
    + ToDeviceStore
    + KeyBackupStore
    + MediaStore
    + ServerStore
{
}
impl<
    T: StreamStore
        + AccountStore
        + AuthSessionStore
        + RoomStore
        + UserDataStore
        + KeyStore
        + ToDeviceStore
        + KeyBackupStore
        + MediaStore
        + ServerStore,
> Store for T
{
}
