//! Membership and visibility rules the client API applies on top of the
//! authorization rules.

use serde::Deserialize;

/// A user's membership in a room, as stored in `m.room.member`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Membership {
    Join,
    Invite,
    Leave,
    Ban,
    Knock,
}

impl Membership {
    pub fn as_str(self) -> &'static str {
        match self {
            Membership::Join => "join",
            Membership::Invite => "invite",
            Membership::Leave => "leave",
            Membership::Ban => "ban",
            Membership::Knock => "knock",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "join" => Membership::Join,
            "invite" => Membership::Invite,
            "leave" => Membership::Leave,
            "ban" => Membership::Ban,
            "knock" => Membership::Knock,
            _ => return None,
        })
    }

    /// Reads the membership out of an `m.room.member` content.
    pub fn from_content(content: &str) -> Option<Self> {
        #[derive(Deserialize)]
        struct C {
            membership: String,
        }
        serde_json::from_str::<C>(content).ok().and_then(|c| Self::parse(&c.membership))
    }
}

/// `m.room.history_visibility` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryVisibility {
    WorldReadable,
    Shared,
    Invited,
    Joined,
}

impl HistoryVisibility {
    pub fn from_content(content: Option<&str>) -> Self {
        #[derive(Deserialize)]
        struct C {
            history_visibility: String,
        }
        match content
            .and_then(|c| serde_json::from_str::<C>(c).ok())
            .map(|c| c.history_visibility)
        {
            Some(v) if v == "world_readable" => Self::WorldReadable,
            Some(v) if v == "invited" => Self::Invited,
            Some(v) if v == "joined" => Self::Joined,
            _ => Self::Shared,
        }
    }
}

impl HistoryVisibility {
    /// How much of the past this visibility shows, for choosing the more
    /// permissive of two.
    fn openness(self) -> u8 {
        match self {
            Self::Joined => 0,
            Self::Invited => 1,
            Self::Shared => 2,
            Self::WorldReadable => 3,
        }
    }

    /// The more permissive of the two (a visibility change event is judged
    /// by the one before and the one it sets, whichever shows more).
    pub fn most_open(self, other: Self) -> Self {
        if other.openness() > self.openness() { other } else { self }
    }
}

/// What decides whether a user may see one event: the room's history
/// visibility at the event, the user's membership at the event (after it),
/// and whether the user joined at any point after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventVisibility {
    pub visibility: HistoryVisibility,
    pub membership_at_event: Option<Membership>,
    pub joined_after: bool,
}

/// The spec's rule (client-server API, "History visibility"): world-readable
/// events are visible; members see what was sent while they were joined;
/// `shared` shows everything before a join to whoever joined after it;
/// `invited` also shows what was sent while the user was invited.
pub fn may_see_event(v: EventVisibility) -> bool {
    match v.visibility {
        HistoryVisibility::WorldReadable => true,
        _ if v.membership_at_event == Some(Membership::Join) => true,
        HistoryVisibility::Shared => v.joined_after,
        HistoryVisibility::Invited => v.membership_at_event == Some(Membership::Invite),
        HistoryVisibility::Joined => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(visibility: HistoryVisibility, membership_at_event: Option<Membership>, joined_after: bool) -> bool {
        may_see_event(EventVisibility {
            visibility,
            membership_at_event,
            joined_after,
        })
    }

    #[test]
    fn shared_history_is_visible_to_whoever_joined_after_it() {
        let v = HistoryVisibility::Shared;
        assert!(check(v, None, true), "sent before the join");
        assert!(check(v, Some(Membership::Join), false), "sent while joined, read after leaving");
        assert!(check(v, Some(Membership::Leave), true), "sent while away, then rejoined");
        assert!(!check(v, None, false), "never joined since");
        assert!(!check(v, Some(Membership::Invite), false));
    }

    #[test]
    fn joined_history_needs_membership_at_the_event() {
        let v = HistoryVisibility::Joined;
        assert!(!check(v, None, true));
        assert!(check(v, Some(Membership::Join), false));
        assert!(!check(HistoryVisibility::Invited, None, true));
        assert!(check(HistoryVisibility::Invited, Some(Membership::Invite), false));
        assert!(check(HistoryVisibility::WorldReadable, None, false));
        assert_eq!(
            HistoryVisibility::Joined.most_open(HistoryVisibility::Shared),
            HistoryVisibility::Shared
        );
        assert_eq!(
            HistoryVisibility::WorldReadable.most_open(HistoryVisibility::Invited),
            HistoryVisibility::WorldReadable
        );
    }

    #[test]
    fn parse_visibility_defaults_to_shared() {
        assert_eq!(HistoryVisibility::from_content(None), HistoryVisibility::Shared);
        assert_eq!(
            HistoryVisibility::from_content(Some(r#"{"history_visibility":"joined"}"#)),
            HistoryVisibility::Joined
        );
    }
}
