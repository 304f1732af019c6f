//! Room authorization rules.
//!
//! The rules themselves come from `ruma-state-res`, which implements them per
//! room version; this module chooses the auth events for a new event and runs
//! both halves of the check against the room's current state.

use ruma::{
    EventId, UserId,
    events::{StateEventType, TimelineEventType},
    room_version_rules::AuthorizationRules,
};
use serde_json::value::RawValue;

use crate::event::{Pdu, StateKey};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// The event breaks an authorization rule; the text says which.
    #[error("{0}")]
    Forbidden(String),
    /// The event content does not have the shape its type requires.
    #[error("invalid event content: {0}")]
    BadContent(String),
}

/// The state entries that authorize an event of this shape.
pub fn auth_event_keys(
    rules: &AuthorizationRules,
    kind: &str,
    sender: &UserId,
    state_key: Option<&str>,
    content: &RawValue,
) -> Result<Vec<StateKey>, AuthError> {
    let kind = TimelineEventType::from(kind);
    let keys = ruma::state_res::auth_types_for_event(&kind, sender, state_key, content, rules).map_err(AuthError::BadContent)?;
    let mut keys: Vec<StateKey> = keys.into_iter().map(|(t, k)| (t.to_string(), k)).collect();
    if rules.room_create_event_id_as_room_id {
        // From v12 the create event is implied by the room id and must not be listed.
        keys.retain(|(t, _)| t != "m.room.create");
    }
    Ok(keys)
}

/// Checks `event` against the room state given by `state`.
///
/// `state` answers with the current state event for a `(type, state_key)`; the
/// event's own `auth_events` must be drawn from that same state.
pub fn authorize<'a>(
    rules: &AuthorizationRules,
    event: &Pdu,
    state: impl Fn(&str, &str) -> Option<&'a Pdu>,
    by_id: impl Fn(&EventId) -> Option<&'a Pdu>,
) -> Result<(), AuthError> {
    ruma::state_res::check_state_independent_auth_rules(rules, event, |id| by_id(id)).map_err(AuthError::Forbidden)?;
    ruma::state_res::check_state_dependent_auth_rules(rules, event, |t: &StateEventType, k: &str| state(&t.to_string(), k))
        .map_err(AuthError::Forbidden)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ruma::{MilliSecondsSinceUnixEpoch, OwnedEventId, RoomVersionId, owned_server_name, user_id};
    use serde_json::json;

    use super::*;
    use crate::event::{EventSigner, NewEvent};

    /// A room built in memory the way the room service builds it.
    struct Room {
        version: RoomVersionId,
        signer: EventSigner,
        state: BTreeMap<StateKey, Pdu>,
        room_id: Option<ruma::OwnedRoomId>,
        last: Vec<OwnedEventId>,
        depth: u64,
    }

    impl Room {
        fn new(version: RoomVersionId) -> Self {
            let signer = EventSigner::new(owned_server_name!("localhost"), &EventSigner::generate_key(), "a").unwrap();
            Self {
                version,
                signer,
                state: BTreeMap::new(),
                room_id: None,
                last: vec![],
                depth: 0,
            }
        }

        fn try_send(&mut self, sender: &UserId, event: NewEvent) -> Result<Pdu, AuthError> {
            let rules = self.version.rules().unwrap().authorization;
            let content = crate::event::raw(&event.content);
            let keys = auth_event_keys(&rules, &event.kind, sender, event.state_key.as_deref(), &content)?;
            let mut auth: Vec<OwnedEventId> = keys.iter().filter_map(|k| self.state.get(k)).map(|p| p.event_id.clone()).collect();
            if let Some(create) = self.state.get(&("m.room.create".into(), "".into()))
                && !rules.room_create_event_id_as_room_id
                && !auth.contains(&create.event_id)
            {
                auth.push(create.event_id.clone());
            }
            let pdu = Pdu::build(
                &self.signer,
                &self.version,
                self.room_id.as_deref(),
                sender,
                event,
                self.last.clone(),
                auth,
                self.depth + 1,
                MilliSecondsSinceUnixEpoch::now(),
            )
            .unwrap();
            let by_id: BTreeMap<OwnedEventId, Pdu> = self.state.values().map(|p| (p.event_id.clone(), p.clone())).collect();
            authorize(
                &rules,
                &pdu,
                |t, k| self.state.get(&(t.to_owned(), k.to_owned())),
                |id| by_id.get(id),
            )
            .map(|_| {
                if self.room_id.is_none() {
                    self.room_id = Some(pdu.room_id.clone());
                }
                if let Some(key) = pdu.state_key_pair() {
                    self.state.insert(key, pdu.clone());
                }
                self.last = vec![pdu.event_id.clone()];
                self.depth += 1;
                pdu.clone()
            })
        }

        fn create(version: RoomVersionId, creator: &UserId) -> Self {
            let mut room = Self::new(version.clone());
            if version != RoomVersionId::V12 {
                room.room_id = Some(ruma::owned_room_id!("!test:localhost"));
            }
            room.try_send(
                creator,
                NewEvent::state("m.room.create", "", json!({"room_version": version.as_str(), "creator": creator})),
            )
            .unwrap();
            room.try_send(
                creator,
                NewEvent::state("m.room.member", creator.as_str(), json!({"membership": "join"})),
            )
            .unwrap();
            let users = if version == RoomVersionId::V12 {
                json!({})
            } else {
                json!({ creator.as_str(): 100 })
            };
            room.try_send(creator, NewEvent::state("m.room.power_levels", "", json!({"users": users})))
                .unwrap();
            room.try_send(creator, NewEvent::state("m.room.join_rules", "", json!({"join_rule": "invite"})))
                .unwrap();
            room
        }
    }

    fn member(state: &str) -> serde_json::Value {
        json!({ "membership": state })
    }

    #[test]
    fn invite_only_rooms_refuse_uninvited_joins_in_every_version() {
        for v in [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12] {
            let alice = user_id!("@alice:localhost");
            let bob = user_id!("@bob:localhost");
            let mut room = Room::create(v.clone(), alice);
            let err = room.try_send(bob, NewEvent::state("m.room.member", bob.as_str(), member("join")));
            assert!(matches!(err, Err(AuthError::Forbidden(_))), "{v}: uninvited join must fail");
            room.try_send(alice, NewEvent::state("m.room.member", bob.as_str(), member("invite")))
                .unwrap();
            room.try_send(bob, NewEvent::state("m.room.member", bob.as_str(), member("join")))
                .unwrap();
            room.try_send(bob, NewEvent::message("m.room.message", json!({"body": "hi", "msgtype": "m.text"})))
                .unwrap();
        }
    }

    #[test]
    fn non_members_cannot_send_and_low_power_cannot_change_state() {
        for v in [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12] {
            let alice = user_id!("@alice:localhost");
            let bob = user_id!("@bob:localhost");
            let mut room = Room::create(v.clone(), alice);
            assert!(
                room.try_send(bob, NewEvent::message("m.room.message", json!({"body": "x"})))
                    .is_err()
            );
            room.try_send(alice, NewEvent::state("m.room.member", bob.as_str(), member("invite")))
                .unwrap();
            room.try_send(bob, NewEvent::state("m.room.member", bob.as_str(), member("join")))
                .unwrap();
            let err = room.try_send(
                bob,
                NewEvent::state("m.room.power_levels", "", json!({"users": {bob.as_str(): 100}})),
            );
            assert!(err.is_err(), "{v}: a member at level 0 cannot raise itself");
            let err = room.try_send(bob, NewEvent::state("m.room.member", alice.as_str(), json!({"membership": "ban"})));
            assert!(err.is_err(), "{v}: a member at level 0 cannot ban the creator");
            room.try_send(alice, NewEvent::state("m.room.member", bob.as_str(), json!({"membership": "ban"})))
                .unwrap();
            assert!(
                room.try_send(bob, NewEvent::message("m.room.message", json!({"body": "x"})))
                    .is_err()
            );
        }
    }

    #[test]
    fn v12_creator_is_not_in_auth_events() {
        let alice = user_id!("@alice:localhost");
        let room = Room::create(RoomVersionId::V12, alice);
        let create_id = room.state[&("m.room.create".to_owned(), String::new())].event_id.clone();
        for pdu in room.state.values() {
            assert!(!pdu.auth_events.contains(&create_id));
        }
    }
}
