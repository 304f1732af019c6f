//! Broadcast channels: rooms whose `m.room.create` has `type` [`CHANNEL_TYPE`].
//! The staff (whoever may post a message) post; subscribers read, react
//! when the power levels let them, and leave. Subscribers do not see one
//! another: a member event about a subscriber is shown only to that
//! subscriber and to the staff, so a subscriber joining sends the other
//! subscribers nothing. Standard clients need no change: to them a channel
//! is a room where they may not post and whose member list holds the staff.

use std::collections::HashSet;

use ruma::{OwnedUserId, UserId, events::TimelineEventType};
use serde_json::{Value, json};

use crate::Pdu;

/// The room type that makes a room a channel.
pub const CHANNEL_TYPE: &str = "kabar.channel";

/// Whether an `m.room.create` content makes its room a channel.
pub fn is_channel_create(create_content: &Value) -> bool {
    create_content.get("type").and_then(Value::as_str) == Some(CHANNEL_TYPE)
}

/// The power levels a new channel starts with: level 50 posts, changes the
/// room, invites and moderates; everyone may react and take back their own
/// reactions (redacting anyone else's needs `redact`).
pub fn default_power_levels() -> Value {
    json!({
        "users": {},
        "users_default": 0,
        "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
            "m.room.server_acl": 100, "m.room.encryption": 100,
            "m.reaction": 0, "m.room.redaction": 0,
        },
        "events_default": 50, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 50,
        "notifications": { "room": 50 },
    })
}

/// What one viewer of a channel may not see: member events about
/// subscribers other than themselves. `None` from
/// [`MemberVisibility::for_viewer`] when the viewer sees everything.
#[derive(Debug, Clone)]
pub struct MemberVisibility {
    viewer: OwnedUserId,
    staff: std::sync::Arc<HashSet<OwnedUserId>>,
}

impl MemberVisibility {
    /// The view of `viewer` in a channel whose staff is `staff`; `None` for
    /// a member of the staff, who sees every member.
    pub fn for_viewer(viewer: &UserId, staff: std::sync::Arc<HashSet<OwnedUserId>>) -> Option<Self> {
        (!staff.contains(viewer)).then(|| MemberVisibility {
            viewer: viewer.to_owned(),
            staff,
        })
    }

    /// Whether the viewer may see a member event about `subject`.
    pub fn shows_member(&self, subject: &str) -> bool {
        subject == self.viewer.as_str() || self.staff.iter().any(|s| s.as_str() == subject)
    }

    /// Whether the viewer may see `pdu` (only member events are ever hidden).
    pub fn shows(&self, pdu: &Pdu) -> bool {
        pdu.kind != TimelineEventType::RoomMember || pdu.state_key.as_deref().is_none_or(|k| self.shows_member(k))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ruma::{owned_user_id, user_id};

    use super::*;

    #[test]
    fn a_channel_is_told_by_its_create_type() {
        assert!(is_channel_create(&json!({"type": "kabar.channel", "room_version": "11"})));
        assert!(!is_channel_create(&json!({"type": "m.space"})));
        assert!(!is_channel_create(&json!({})));
    }

    #[test]
    fn subscribers_see_themselves_and_the_staff_and_the_staff_see_everyone() {
        let staff = Arc::new(HashSet::from([owned_user_id!("@admin:x")]));
        assert!(MemberVisibility::for_viewer(user_id!("@admin:x"), staff.clone()).is_none());
        let sub = MemberVisibility::for_viewer(user_id!("@sub:x"), staff).expect("a subscriber's view");
        assert!(sub.shows_member("@sub:x"));
        assert!(sub.shows_member("@admin:x"));
        assert!(!sub.shows_member("@other:x"));
    }

    #[test]
    fn by_default_only_the_staff_post_and_everyone_reacts() {
        let power = default_power_levels();
        assert_eq!(power["events_default"], 50);
        assert_eq!(power["users_default"], 0);
        assert_eq!(power["events"]["m.reaction"], 0);
        assert_eq!(power["invite"], 50);
    }
}
