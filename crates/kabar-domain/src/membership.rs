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

/// Whether a user may see an event, given the room's history visibility at the
/// event and the user's membership at the event and now.
///
/// This is the spec's rule for the common cases: members see what was sent
/// while they were joined; `shared` lets past and present members see events
/// from before they joined; `invited` extends that to the time since invite.
pub fn may_see_event(visibility: HistoryVisibility, membership_at_event: Option<Membership>, membership_now: Option<Membership>) -> bool {
    match visibility {
        HistoryVisibility::WorldReadable => true,
        HistoryVisibility::Shared => membership_at_event == Some(Membership::Join) || membership_now == Some(Membership::Join),
        HistoryVisibility::Invited => {
            matches!(membership_at_event, Some(Membership::Join | Membership::Invite))
        }
        HistoryVisibility::Joined => membership_at_event == Some(Membership::Join),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_history_is_visible_to_current_members_only() {
        let v = HistoryVisibility::Shared;
        assert!(may_see_event(v, None, Some(Membership::Join)));
        assert!(may_see_event(v, Some(Membership::Join), Some(Membership::Leave)));
        assert!(!may_see_event(v, None, Some(Membership::Leave)));
        assert!(!may_see_event(v, None, None));
    }

    #[test]
    fn joined_history_needs_membership_at_the_event() {
        let v = HistoryVisibility::Joined;
        assert!(!may_see_event(v, None, Some(Membership::Join)));
        assert!(may_see_event(v, Some(Membership::Join), Some(Membership::Leave)));
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
