//! Push rules applied to room events, for the unread counts a sync reports
//! (`notification_count`, `highlight_count`).
//!
//! Each user's rules (the server defaults, or what the user changed in
//! `m.push_rules` account data) are kept in memory until their account data
//! changes; a user on the server defaults is kept as a mark, not a rule set
//! of their own. An event is flattened once for all the members who
//! evaluate it ([`crate::rooms::TimelineEvent::flattened`]). The server
//! defaults differ between users only where an event names them (a user
//! mention, an invite): for every member on the defaults whom an event does
//! not name, they are walked once and the outcome kept on the event
//! ([`notification`]), so a channel post's ten-thousandth reader pays a
//! lookup, not a walk over fifteen rules.

use std::sync::Arc;

use kabar_store::Store;
use ruma::{
    OwnedUserId, UInt, UserId,
    push::{FlattenedJson, PushConditionPowerLevelsCtx, PushConditionRoomCtx, Ruleset},
};
use serde_json::Value;

use crate::{
    changes::{Changes, GenerationCache},
    error::{Error, Result},
    rooms::RoomCache,
};

/// Bound on rule sets kept in memory; past it they are read again.
const MAX_CACHED_RULESETS: usize = 100_000;

/// What a user's push rules make of one event.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Notification {
    /// It counts in `notification_count`.
    pub notify: bool,
    /// It counts in `highlight_count` too (a mention, a keyword, `@room`).
    pub highlight: bool,
}

/// A user's push rules.
#[derive(Debug, Clone)]
pub enum UserRules {
    /// The server defaults (`Ruleset::server_default`), made only for an
    /// event that names the user.
    ServerDefault,
    /// What the user changed them to.
    Custom(Arc<Ruleset>),
}

/// The rule set of each user, read from their account data once per change.
pub struct PushRules {
    store: Arc<dyn Store>,
    changes: Arc<Changes>,
    cache: GenerationCache<OwnedUserId, UserRules>,
}

impl PushRules {
    pub fn new(store: Arc<dyn Store>, changes: Arc<Changes>) -> Self {
        Self {
            store,
            changes,
            cache: GenerationCache::new(MAX_CACHED_RULESETS),
        }
    }

    /// `user`'s rules: the server defaults unless they changed some.
    pub async fn rules(&self, user: &UserId) -> Result<UserRules> {
        let read = async {
            Ok::<_, Error>(match self.store.account_data(user, None, "m.push_rules").await? {
                Some(json) => {
                    let v: Value = serde_json::from_str(&json).map_err(|e| Error::Internal(e.to_string()))?;
                    UserRules::Custom(Arc::new(
                        serde_json::from_value(v["global"].clone()).map_err(|e| Error::Internal(e.to_string()))?,
                    ))
                }
                None => UserRules::ServerDefault,
            })
        };
        self.cache.get_or_read(&self.changes.account_data, &user.to_owned(), read).await
    }
}

/// What the server-default rules made of one event for the members it does
/// not name, and the room as it was then: the outcome holds while the room
/// keeps the same power levels and stays (or stays not) a room of two.
#[derive(Debug, Clone)]
pub struct DefaultOutcome {
    power_levels: Arc<PushConditionPowerLevelsCtx>,
    room_of_two: bool,
    outcome: Notification,
}

/// What `user`'s `rules` make of `event` (by another member) in `room`.
/// On the server defaults, an event that does not name the user is judged
/// once for everyone it does not name (see the module's introduction).
pub async fn notification(
    rules: &UserRules,
    event: &crate::rooms::TimelineEvent,
    user: &UserId,
    room: &crate::rooms::Room,
) -> Notification {
    let flat = event.flattened();
    let names_someone = flat.get(r"content.m\.mentions.user_ids").is_some() || event.event.pdu.state_key.is_some();
    match rules {
        UserRules::ServerDefault if !names_someone && event.event.pdu.sender != user => {
            let (power_levels, room_of_two) = {
                let r = room.read();
                (
                    r.push_power_levels(),
                    r.member_count(kabar_domain::membership::Membership::Join) == 2,
                )
            };
            let remembered = event
                .default_push()
                .as_ref()
                .filter(|d| d.room_of_two == room_of_two && Arc::ptr_eq(&d.power_levels, &power_levels))
                .map(|d| d.outcome);
            if let Some(outcome) = remembered {
                return outcome;
            }
            // The defaults of someone the event cannot name: it names no one.
            let anyone = ruma::owned_user_id!("@anyone:kabar.invalid");
            let members = UInt::from(if room_of_two { 2u32 } else { 3 });
            let room_id = room.read().record.room_id.clone();
            let mut ctx = PushConditionRoomCtx::new(room_id, members, anyone.clone(), anyone.localpart().to_owned());
            ctx.power_levels = Some(PushConditionPowerLevelsCtx::clone(&power_levels));
            let outcome = evaluate(&Ruleset::server_default(&anyone), flat, &event.event.pdu.sender, &ctx).await;
            *event.default_push() = Some(DefaultOutcome {
                power_levels,
                room_of_two,
                outcome,
            });
            outcome
        }
        UserRules::ServerDefault => {
            let ctx = room_context(&room.read(), user);
            evaluate(&Ruleset::server_default(user), flat, &event.event.pdu.sender, &ctx).await
        }
        UserRules::Custom(rules) => {
            let ctx = room_context(&room.read(), user);
            evaluate(rules, flat, &event.event.pdu.sender, &ctx).await
        }
    }
}

/// The room as `user`'s push conditions see it: member count, their display
/// name there, who may notify the whole room.
pub fn room_context(room: &RoomCache, user: &UserId) -> PushConditionRoomCtx {
    #[derive(serde::Deserialize)]
    struct Member {
        displayname: Option<String>,
    }
    let display_name = room
        .member(user.as_str())
        .and_then(|slot| serde_json::from_str::<Member>(slot.content().get()).ok())
        .and_then(|m| m.displayname)
        .unwrap_or_else(|| user.localpart().to_owned());
    let members = UInt::try_from(room.member_count(kabar_domain::membership::Membership::Join) as u64).unwrap_or(UInt::MAX);
    let mut ctx = PushConditionRoomCtx::new(room.record.room_id.clone(), members, user.to_owned(), display_name);
    ctx.power_levels = Some(PushConditionPowerLevelsCtx::clone(&room.push_power_levels()));
    ctx
}

/// What `rules` make of `event` (sent by `sender`) for the user `ctx` is for.
/// A user's own events never notify them.
pub async fn evaluate(rules: &Ruleset, event: &FlattenedJson, sender: &UserId, ctx: &PushConditionRoomCtx) -> Notification {
    if sender == ctx.user_id {
        return Notification::default();
    }
    for rule in rules {
        if rule.applies(event, ctx).await {
            let actions = rule.actions();
            let notify = actions.iter().any(|a| a.should_notify());
            return Notification {
                notify,
                highlight: notify && actions.iter().any(|a| a.is_highlight()),
            };
        }
    }
    Notification::default()
}

/// Whether `event` is judged by `user`'s push rules for their unread counts
/// at all: never their own events, and never membership changes, which the
/// spec's rules silence (`.m.rule.member_event`) but for an invite to the
/// user, and an invitee is not in the room yet. Judging every join of a big
/// room for every member would cost members squared.
pub fn may_count(event: &kabar_store::StoredEvent, user: &UserId) -> bool {
    event.pdu.sender != user && event.pdu.kind != ruma::events::TimelineEventType::RoomMember
}

/// An event's client form flattened for push conditions.
pub fn flatten(client_json: &str) -> FlattenedJson {
    let raw = ruma::serde::Raw::<Value>::from_json_string(client_json.to_owned())
        .unwrap_or_else(|_| ruma::serde::Raw::from_json_string("{}".to_owned()).expect("valid JSON"));
    FlattenedJson::from_raw(&raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{owned_room_id, owned_user_id, push::Ruleset};

    fn ctx() -> PushConditionRoomCtx {
        let mut ctx = PushConditionRoomCtx::new(
            owned_room_id!("!r:x"),
            UInt::from(3u32),
            owned_user_id!("@bob:x"),
            "Bobby".to_owned(),
        );
        ctx.power_levels = None;
        ctx
    }

    fn message(body: &str, extra: Value) -> FlattenedJson {
        let mut content = serde_json::json!({ "msgtype": "m.text", "body": body });
        if let Value::Object(extra) = extra {
            content.as_object_mut().unwrap().extend(extra);
        }
        flatten(&serde_json::json!({ "type": "m.room.message", "sender": "@alice:x", "room_id": "!r:x", "content": content }).to_string())
    }

    #[tokio::test]
    async fn default_rules_notify_messages_and_highlight_mentions() {
        let rules = Ruleset::server_default(ruma::user_id!("@bob:x"));
        let alice = ruma::user_id!("@alice:x");
        let plain = evaluate(&rules, &message("hello", Value::Null), alice, &ctx()).await;
        assert_eq!(
            plain,
            Notification {
                notify: true,
                highlight: false
            }
        );
        // Matrix 1.15 dropped the legacy rules that highlighted a display
        // name in the body (MSC4210): mentions are intentional now.
        let named = evaluate(&rules, &message("hey Bobby, look", Value::Null), alice, &ctx()).await;
        assert_eq!(
            named,
            Notification {
                notify: true,
                highlight: false
            }
        );
        let mention = evaluate(
            &rules,
            &message("look", serde_json::json!({ "m.mentions": { "user_ids": ["@bob:x"] } })),
            alice,
            &ctx(),
        )
        .await;
        assert!(mention.highlight, "an intentional mention");
        let own = evaluate(&rules, &message("Bobby", Value::Null), ruma::user_id!("@bob:x"), &ctx()).await;
        assert_eq!(own, Notification::default(), "own events never count");
        let reaction = flatten(r#"{"type":"m.reaction","sender":"@alice:x","content":{}}"#);
        assert!(!evaluate(&rules, &reaction, alice, &ctx()).await.notify);
    }

    #[tokio::test]
    async fn a_user_rule_can_highlight_a_keyword() {
        let mut rules = Ruleset::server_default(ruma::user_id!("@bob:x"));
        let rule: ruma::push::NewPatternedPushRule = serde_json::from_value(serde_json::json!({
            "rule_id": "deploys", "pattern": "deploy",
            "actions": ["notify", { "set_tweak": "highlight" }]
        }))
        .unwrap();
        rules.insert(ruma::push::NewPushRule::Content(rule), None, None).unwrap();
        let hit = evaluate(
            &rules,
            &message("the deploy is done", Value::Null),
            ruma::user_id!("@alice:x"),
            &ctx(),
        )
        .await;
        assert!(hit.highlight);
    }
}
