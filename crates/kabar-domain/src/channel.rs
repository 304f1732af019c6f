//! Broadcast channels: rooms whose `m.room.create` has `type` [`CHANNEL_TYPE`].
//! The staff (whoever may post a message) post; subscribers read, react
//! when the power levels let them, and leave. Subscribers do not see one
//! another: a member event about a subscriber, and an event a subscriber
//! sent (a reaction, its redaction), is shown only to that subscriber and
//! to the staff, so a subscriber joining or reacting sends the other
//! subscribers nothing. (Their read receipts are told to themselves only:
//! see [`crate::receipts`].) Standard clients need no change: to them a channel
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

/// The power levels a new channel starts with, made from the ones an
/// ordinary room would get: level 50 posts and invites (so changes the room
/// and moderates, as in any room), and everyone may react and redact their
/// own reactions (redacting anyone else's needs `redact`).
pub fn channel_power_levels(mut ordinary: Value) -> Value {
    ordinary["events_default"] = json!(50);
    ordinary["invite"] = json!(50);
    if !ordinary.get("events").is_some_and(Value::is_object) {
        ordinary["events"] = json!({});
    }
    ordinary["events"]["m.reaction"] = json!(0);
    ordinary["events"]["m.room.redaction"] = json!(0);
    ordinary
}

/// Who is who in a channel, from its power levels.
#[derive(Debug, Default)]
pub struct ChannelRoles {
    /// Whoever may post a message (and the room's creators).
    pub staff: HashSet<OwnedUserId>,
    /// Event types subscribers may send too (`m.reaction` and
    /// `m.room.redaction` as a channel starts): such an event from someone
    /// outside the staff is shown to its sender and the staff only. A post
    /// by someone no longer on the staff stays shown to everyone.
    pub subscriber_kinds: HashSet<String>,
}

impl ChannelRoles {
    /// The roles of a channel with these power levels: `None` when
    /// everyone may post (a group by another name, nothing hidden).
    pub fn from_power_levels(
        power: &ruma::events::room::power_levels::RoomPowerLevels,
        creators: impl IntoIterator<Item = OwnedUserId>,
    ) -> Option<Self> {
        let post = power.for_message(ruma::events::MessageLikeEventType::RoomMessage);
        if power.users_default >= post {
            return None;
        }
        let mut staff: HashSet<OwnedUserId> = power
            .users
            .iter()
            .filter(|(_, level)| **level >= post)
            .map(|(u, _)| u.clone())
            .collect();
        staff.extend(creators);
        let subscriber_kinds = power
            .events
            .iter()
            .filter(|(_, level)| **level <= power.users_default)
            .map(|(kind, _)| kind.to_string())
            .collect();
        Some(ChannelRoles { staff, subscriber_kinds })
    }

    /// The one member besides the staff who may see `pdu`, when others may
    /// not: the subject of a member event about a subscriber, or the sender
    /// of a subscriber's reaction or redaction. `None` when everyone may.
    pub fn private_to<'a>(&self, pdu: &'a Pdu) -> Option<&'a str> {
        if pdu.kind == TimelineEventType::RoomMember {
            let subject = pdu.state_key.as_deref()?;
            (!self.staff.iter().any(|s| s.as_str() == subject)).then_some(subject)
        } else {
            (!self.staff.contains(&pdu.sender) && self.subscriber_kinds.contains(&pdu.kind.to_string())).then_some(pdu.sender.as_str())
        }
    }
}

/// What one viewer of a channel may not see: member events about
/// subscribers other than themselves, and other subscribers' reactions
/// and redactions. `None` from [`MemberVisibility::for_viewer`] when the
/// viewer sees everything.
#[derive(Debug, Clone)]
pub struct MemberVisibility {
    viewer: OwnedUserId,
    roles: std::sync::Arc<ChannelRoles>,
}

impl MemberVisibility {
    /// The view of `viewer` in a channel with these roles; `None` for a
    /// member of the staff, who sees every member.
    pub fn for_viewer(viewer: &UserId, roles: std::sync::Arc<ChannelRoles>) -> Option<Self> {
        (!roles.staff.contains(viewer)).then(|| MemberVisibility {
            viewer: viewer.to_owned(),
            roles,
        })
    }

    /// Whether the viewer may see a member event about `subject`.
    pub fn shows_member(&self, subject: &str) -> bool {
        subject == self.viewer.as_str() || self.roles.staff.iter().any(|s| s.as_str() == subject)
    }

    /// Whose member events the viewer may see: themselves and the staff.
    pub fn visible_members(&self) -> impl Iterator<Item = &UserId> {
        std::iter::once(&*self.viewer).chain(self.roles.staff.iter().map(|u| &**u))
    }

    /// Whether the viewer may see `pdu`.
    pub fn shows(&self, pdu: &Pdu) -> bool {
        self.roles.private_to(pdu).is_none_or(|member| member == self.viewer.as_str())
    }
}

/// Event types that are posts, whose views a channel counts.
pub const POST_TYPES: &[&str] = &["m.room.message", "m.room.encrypted", "m.sticker", "m.poll.start"];

/// A channel's view counts: how many distinct members have seen each post.
///
/// Seen means the member's read receipt (public or private) reached the
/// post, and the post came after the member first joined. A Matrix read
/// receipt says "read up to here", so one position per member covers every
/// post up to it; posts from before a member joined are not counted for
/// them (someone who joins a channel with years of posts has not read
/// them). Fetching a post through `/messages` does not count: clients page
/// back in the background to fill a screen, which would inflate counts.
///
/// One counter per post. Each member's receipt only ever moves the counted
/// range forward (`counted_upto`), so a post counts a member at most once;
/// the work of a receipt is the number of posts it newly covers.
#[derive(Debug, Default, Clone)]
pub struct ViewCounter {
    /// Post positions, ascending, and each post's count.
    posts: Vec<(u64, u32)>,
    /// Per member: where they first joined, and up to where they are counted.
    members: std::collections::HashMap<OwnedUserId, (u64, u64)>,
}

impl ViewCounter {
    /// A post at `pos` (after every post added so far).
    pub fn add_post(&mut self, pos: u64) {
        if self.posts.last().is_none_or(|(last, _)| *last < pos) {
            self.posts.push((pos, 0));
        }
    }

    /// `user` joined at `pos`; only their first join counts. Whether it was
    /// their first.
    pub fn joined(&mut self, user: &UserId, pos: u64) -> bool {
        match self.members.entry(user.to_owned()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((pos, pos));
                true
            }
        }
    }

    /// How many members it counts for.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// `user`'s read receipt is on the event at `pos`: every post after
    /// their first join up to `pos` not yet counted for them is counted.
    /// A receipt from someone who never joined counts nothing.
    pub fn read_to(&mut self, user: &UserId, pos: u64) {
        let Some((_, counted_upto)) = self.members.get_mut(user) else {
            return;
        };
        if pos <= *counted_upto {
            return;
        }
        let from = self.posts.partition_point(|(p, _)| *p <= *counted_upto);
        let to = self.posts.partition_point(|(p, _)| *p <= pos);
        for (_, views) in &mut self.posts[from..to] {
            *views += 1;
        }
        *counted_upto = pos;
    }

    /// The views of the post at `pos`; `None` if no post is there.
    pub fn views(&self, pos: u64) -> Option<u32> {
        let i = self.posts.binary_search_by_key(&pos, |(p, _)| *p).ok()?;
        Some(self.posts[i].1)
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

    /// A channel's roles as its power levels make them: `@admin:x` at
    /// 100 (and, if given, someone once on the staff at level 0 now).
    fn roles() -> Arc<ChannelRoles> {
        use ruma::events::room::power_levels::{RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource};
        let levels = channel_power_levels(json!({"users": {"@admin:x": 100}, "users_default": 0}));
        let content: RoomPowerLevelsEventContent = serde_json::from_value(levels).unwrap();
        let rules = ruma::RoomVersionId::V11.rules().unwrap().authorization;
        let power = RoomPowerLevels::new(RoomPowerLevelsSource::Original(content), &rules, []);
        Arc::new(ChannelRoles::from_power_levels(&power, []).expect("a channel"))
    }

    fn event(sender: &str, kind: &str, state_key: Option<&str>) -> Pdu {
        let json = json!({"sender": sender, "type": kind, "state_key": state_key, "content": {}, "origin_server_ts": 1});
        Pdu::from_stored(ruma::owned_event_id!("$e"), ruma::owned_room_id!("!c:x"), &json.to_string()).unwrap()
    }

    #[test]
    fn subscribers_see_themselves_and_the_staff_and_the_staff_see_everyone() {
        let roles = roles();
        assert_eq!(roles.staff, HashSet::from([owned_user_id!("@admin:x")]));
        assert!(MemberVisibility::for_viewer(user_id!("@admin:x"), roles.clone()).is_none());
        let sub = MemberVisibility::for_viewer(user_id!("@sub:x"), roles).expect("a subscriber's view");
        assert!(sub.shows_member("@sub:x"));
        assert!(sub.shows_member("@admin:x"));
        assert!(!sub.shows_member("@other:x"));
        assert!(sub.shows(&event("@other:x", "m.room.member", Some("@admin:x"))));
        assert!(!sub.shows(&event("@other:x", "m.room.member", Some("@other:x"))));
    }

    #[test]
    fn a_subscribers_reactions_and_redactions_are_shown_to_them_and_the_staff_only() {
        let roles = roles();
        let sub = MemberVisibility::for_viewer(user_id!("@sub:x"), roles.clone()).unwrap();
        for kind in ["m.reaction", "m.room.redaction"] {
            let others = event("@other:x", kind, None);
            assert_eq!(roles.private_to(&others), Some("@other:x"));
            assert!(!sub.shows(&others), "another subscriber's {kind}");
            assert!(sub.shows(&event("@sub:x", kind, None)), "their own {kind}");
            assert!(sub.shows(&event("@admin:x", kind, None)), "the staff's {kind}");
        }
        // A post by someone no longer on the staff stays shown: subscribers
        // cannot send posts, so it is not a subscriber's.
        let old_post = event("@former-admin:x", "m.room.message", None);
        assert_eq!(roles.private_to(&old_post), None);
        assert!(sub.shows(&old_post));
    }

    #[test]
    fn a_post_counts_each_member_once_from_their_first_join_to_their_receipt() {
        let (ann, ben) = (user_id!("@ann:x"), user_id!("@ben:x"));
        let mut views = ViewCounter::default();
        views.add_post(10);
        views.joined(ann, 15);
        for pos in [20, 30, 40] {
            views.add_post(pos);
        }
        views.read_to(ann, 30);
        assert_eq!(
            [10, 20, 30, 40].map(|p| views.views(p)),
            [Some(0), Some(1), Some(1), Some(0)],
            "not the post before she joined"
        );
        views.read_to(ann, 30);
        views.read_to(ann, 25);
        assert_eq!(views.views(20), Some(1), "the same or an older receipt counts nothing again");
        views.read_to(ann, 40);
        assert_eq!(views.views(30), Some(1), "never twice");
        assert_eq!(views.views(40), Some(1));
        views.read_to(ben, 40);
        assert_eq!(views.views(40), Some(1), "a receipt from someone who never joined counts nothing");
        views.joined(ben, 35);
        views.joined(ben, 5);
        views.read_to(ben, 45);
        assert_eq!([30, 40].map(|p| views.views(p)), [Some(1), Some(2)], "from his first join only");
        assert_eq!(views.views(41), None, "no post there");
    }

    #[test]
    fn by_default_only_the_staff_post_and_everyone_reacts() {
        let ordinary = json!({"users_default": 0, "events_default": 0, "invite": 0, "events": {"m.room.name": 50}});
        let power = channel_power_levels(ordinary);
        assert_eq!(power["events_default"], 50);
        assert_eq!(power["users_default"], 0);
        assert_eq!(power["events"]["m.reaction"], 0);
        assert_eq!(power["events"]["m.room.name"], 50, "the rest as in any room");
        assert_eq!(power["invite"], 50);
    }
}
