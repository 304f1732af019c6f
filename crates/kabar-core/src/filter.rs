//! Client filters (`/sync`, `/messages`, `/context`): which events pass.

use std::collections::HashSet;

use kabar_domain::channel::MemberVisibility;
use kabar_store::StoredEvent;
use ruma::{OwnedUserId, UserId, api::client::filter::RoomEventFilter};

/// Whether a type matches a filter pattern, where a trailing `*` matches any suffix.
fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

/// Whether an event passes a room event filter.
pub fn filter_allows(filter: &RoomEventFilter, kind: &str, sender: &UserId) -> bool {
    if filter.not_types.iter().any(|p| type_matches(p, kind)) || filter.not_senders.iter().any(|s| s == sender) {
        return false;
    }
    if let Some(types) = &filter.types
        && !types.iter().any(|p| type_matches(p, kind))
    {
        return false;
    }
    filter.senders.as_ref().is_none_or(|s| s.iter().any(|x| x == sender))
}

/// Whether a filter with these lists lets no event type through.
pub fn excludes_everything(types: Option<&[String]>, not_types: &[String]) -> bool {
    types.is_some_and(<[String]>::is_empty) || not_types.iter().any(|t| t == "*")
}

/// Which events a timeline shows: the client's room event filter, less the
/// senders the user ignores.
#[derive(Clone, Copy)]
pub struct TimelineFilter<'a> {
    pub filter: &'a RoomEventFilter,
    pub ignored: &'a HashSet<OwnedUserId>,
    /// In a channel, the member events the viewer may not see.
    pub hidden: Option<&'a MemberVisibility>,
}

impl TimelineFilter<'_> {
    pub fn keeps(&self, event: &StoredEvent) -> bool {
        !self.ignored.contains(&event.pdu.sender)
            && self.hidden.is_none_or(|h| h.shows(&event.pdu))
            && filter_allows(self.filter, &event.pdu.kind.to_string(), &event.pdu.sender)
    }

    /// The event types the filter admits, when it names them exactly (no
    /// wildcards): the store can then pass over other events without
    /// reading them, so a filter for messages in a room of joins does not
    /// parse every join on the way.
    pub fn exact_types(&self) -> Option<&[String]> {
        self.filter.types.as_deref().filter(|types| types.iter().all(|t| !t.contains('*')))
    }
}

#[cfg(test)]
mod tests {
    use ruma::user_id;

    use super::*;

    #[test]
    fn filters_match_types_with_wildcards_and_senders() {
        let mut f = RoomEventFilter::default();
        assert!(filter_allows(&f, "m.room.message", user_id!("@a:x")));
        f.types = Some(vec!["m.room.*".into()]);
        assert!(filter_allows(&f, "m.room.message", user_id!("@a:x")));
        assert!(!filter_allows(&f, "m.reaction", user_id!("@a:x")));
        f.not_types = vec!["m.room.member".into()];
        assert!(!filter_allows(&f, "m.room.member", user_id!("@a:x")));
        f.not_senders = vec![ruma::owned_user_id!("@spam:x")];
        assert!(!filter_allows(&f, "m.room.message", user_id!("@spam:x")));
    }

    #[test]
    fn only_exact_type_lists_go_to_the_store() {
        let exact = |types: Option<&[&str]>| {
            let mut filter = RoomEventFilter::default();
            filter.types = types.map(|t| t.iter().map(|s| s.to_string()).collect());
            let ignored = HashSet::new();
            TimelineFilter {
                filter: &filter,
                ignored: &ignored,
                hidden: None,
            }
            .exact_types()
            .map(<[String]>::to_vec)
        };
        assert_eq!(exact(None), None, "no list: every type");
        assert_eq!(
            exact(Some(&["m.room.message", "m.room.encrypted"])),
            Some(vec!["m.room.message".to_owned(), "m.room.encrypted".to_owned()])
        );
        assert_eq!(exact(Some(&["m.room.message", "m.call.*"])), None, "a wildcard is matched here");
        assert_eq!(exact(Some(&[])), Some(vec![]), "an empty list admits nothing");
    }
}
