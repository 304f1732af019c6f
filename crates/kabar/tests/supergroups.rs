//! Supergroups (issue 17): ordinary rooms of thousands of members where
//! anyone may post. Every member gets every message once, lazy-loaded
//! member state names each new sender, and the member list comes a page
//! at a time.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{Api, Server, enc, post_public, registered};
use futures::{StreamExt, stream};
use matrix_sdk::{
    config::SyncSettings,
    ruma::{OwnedRoomId, OwnedUserId, api::client::filter::FilterDefinition},
};
use reqwest::Method as M;
use serde_json::{Value, json};

/// Members of the CI-sized supergroup (the benchmark takes 200,000).
const MEMBERS: usize = 2_000;
/// Members who post, each for the first time.
const SENDERS: usize = 5;

/// A member registered without a password (nothing to hash: thousands of
/// sign-ups in seconds), who joins `room`.
async fn member(server: &Server, name: String, room: String, displayname: Option<String>) -> Api {
    let signup = json!({"username": name, "auth": {"type": "m.login.dummy"}});
    let (status, v) = post_public(&server.url, "/register", signup).await;
    assert_eq!(status, 200, "{v}");
    let api = Api {
        url: server.url.clone(),
        token: v["access_token"].as_str().unwrap().into(),
        user_id: v["user_id"].as_str().unwrap().into(),
        device_id: v["device_id"].as_str().unwrap().into(),
    };
    if let Some(d) = displayname {
        api.set_displayname(&d).await;
    }
    api.join(&room).await;
    api
}

fn lazy_filter() -> Value {
    json!({"room": {"state": {"lazy_load_members": true}, "timeline": {"limit": 50}}})
}

/// Who the `m.receipt` events of `room` in a sync name.
fn receipt_readers(sync: &Value, room: &str) -> Vec<String> {
    let mut readers = vec![];
    for receipt in events(sync, room, "ephemeral").into_iter().filter(|e| e["type"] == "m.receipt") {
        for by_type in receipt["content"].as_object().into_iter().flat_map(|c| c.values()) {
            for users in by_type.as_object().into_iter().flat_map(|t| t.values()) {
                readers.extend(users.as_object().into_iter().flat_map(|u| u.keys().cloned()));
            }
        }
    }
    readers
}

fn events<'a>(sync: &'a Value, room: &str, section: &str) -> Vec<&'a Value> {
    sync["rooms"]["join"][room][section]["events"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supergroup_of_thousands_delivers_every_message_once_with_lazy_members_for_new_senders() {
    let server = Server::start();
    let owner = Api::register(&server, "owner").await;
    let group = owner.create_room(json!({"preset": "public_chat", "name": "Supergroup"})).await;
    owner.say(&group, "w", "welcome").await;

    // Thousands join, 32 at a time; the first SENDERS have display names.
    let members: Vec<Api> = stream::iter(0..MEMBERS)
        .map(|n| {
            let name = (n < SENDERS).then(|| format!("Sender {n}"));
            member(&server, format!("m{n:05}"), group.clone(), name)
        })
        .buffered(32)
        .collect()
        .await;
    let joined = owner.ok(M::GET, &format!("/rooms/{}/joined_members", enc(&group)), None).await;
    assert_eq!(joined["joined"].as_object().unwrap().len(), MEMBERS + 1);

    // A timeline filtered to messages looks through the room's newest
    // events only, not back through every join: the welcome is 2,000 joins
    // back, so the sync says `limited`, and paging back from its
    // `prev_batch` finds it.
    let messages_only = json!({"room": {"timeline": {"limit": 10, "types": ["m.room.message"]}, "state": {"lazy_load_members": true}}});
    let first = owner.sync("", Some(messages_only)).await;
    let timeline = &first["rooms"]["join"][&group]["timeline"];
    assert_eq!(timeline["events"].as_array().map(Vec::len), Some(0), "{timeline}");
    assert_eq!(timeline["limited"], true, "{timeline}");
    let from = timeline["prev_batch"].as_str().expect("prev_batch");
    let older = owner
        .ok(
            M::GET,
            &format!(
                "/rooms/{}/messages?dir=b&limit=5&from={}&filter={}",
                enc(&group),
                enc(from),
                enc(r#"{"types":["m.room.message"]}"#)
            ),
            None,
        )
        .await;
    let bodies: Vec<&str> = older["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, ["welcome"], "{older}");

    // A real client in the room, lazy-loading members.
    let reader = registered(&server.url, "reader").await;
    let group_id = OwnedRoomId::try_from(group.as_str()).unwrap();
    reader.join_room_by_id(&group_id).await.unwrap();
    let settings = SyncSettings::default()
        .timeout(Duration::from_secs(2))
        .filter(FilterDefinition::with_lazy_loading().into());
    reader.sync_once(settings.clone()).await.unwrap();

    // Everyone's starting point, lazily loaded: an initial sync names a
    // few members (the timeline's senders and themselves), not thousands.
    let group_ref = &group;
    let sinces: Vec<String> = stream::iter(&members)
        .map(|m| async move {
            let group = group_ref;
            let first = m.sync("", Some(lazy_filter())).await;
            let state_members = events(&first, group, "state")
                .iter()
                .filter(|e| e["type"] == "m.room.member")
                .count();
            assert!(state_members <= 60, "{state_members} member events in a lazy-loading initial sync");
            first["next_batch"].as_str().unwrap().to_owned()
        })
        .buffered(32)
        .collect()
        .await;

    // Members who never posted before post one message each.
    let mut sent: HashMap<String, (String, String)> = HashMap::new();
    for (n, sender) in members.iter().take(SENDERS).enumerate() {
        let id = sender.say(&group, &format!("t{n}"), &format!("hello from {n}")).await;
        sent.insert(id, (sender.user_id.clone(), format!("Sender {n}")));
    }

    // Every member gets every message once, and the member events of their
    // senders with the senders' display names.
    let checked: Vec<()> = stream::iter(members.iter().zip(sinces))
        .map(|(m, since)| {
            let (group, sent) = (group.clone(), &sent);
            async move {
                let mut seen: HashMap<String, usize> = HashMap::new();
                let mut names: HashMap<String, String> = HashMap::new();
                let mut since = since;
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while seen.len() < sent.len() {
                    assert!(std::time::Instant::now() < deadline, "{} got {seen:?}", m.user_id);
                    let next = m.sync(&since, Some(lazy_filter())).await;
                    for e in events(&next, &group, "timeline") {
                        let id = e["event_id"].as_str().unwrap_or_default();
                        if sent.contains_key(id) {
                            *seen.entry(id.to_owned()).or_default() += 1;
                        }
                    }
                    for e in events(&next, &group, "state").into_iter().chain(events(&next, &group, "timeline")) {
                        if e["type"] == "m.room.member"
                            && let (Some(key), Some(name)) = (e["state_key"].as_str(), e["content"]["displayname"].as_str())
                        {
                            names.insert(key.to_owned(), name.to_owned());
                        }
                    }
                    since = next["next_batch"].as_str().unwrap().to_owned();
                }
                assert!(seen.values().all(|&n| n == 1), "{} got a message twice: {seen:?}", m.user_id);
                for (sender, name) in sent.values() {
                    if sender != &m.user_id {
                        assert_eq!(names.get(sender), Some(name), "{} was not sent {sender}'s member event", m.user_id);
                    }
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(checked.len(), MEMBERS);

    // The real client resolves each new sender's display name from the
    // lazily loaded member events.
    reader.sync_once(settings).await.unwrap();
    let room = reader.get_room(&group_id).unwrap();
    for (sender, name) in sent.values() {
        let user = OwnedUserId::try_from(sender.as_str()).unwrap();
        let member = room
            .get_member_no_sync(&user)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("matrix-sdk knows {sender}"));
        assert_eq!(member.display_name(), Some(name.as_str()));
    }

    // Past 1,000 members a read receipt is told to its author only
    // (`kabar_domain::receipts`): another member is not told of it, neither
    // in the syncs that follow nor in an initial sync, which carries the
    // member's own receipt rather than one for everyone who ever read.
    let (a, b) = (&members[0], &members[1]);
    let start = |m: &Api| {
        let m = m.clone();
        async move { m.sync("", Some(lazy_filter())).await["next_batch"].as_str().unwrap().to_owned() }
    };
    let (a_since, b_since) = (start(a).await, start(b).await);
    let read = sent.keys().next().unwrap().clone();
    a.ok(
        M::POST,
        &format!("/rooms/{}/receipt/m.read/{}", enc(&group), enc(&read)),
        Some(json!({})),
    )
    .await;
    let after = owner.say(&group, "after-receipt", "after the receipt").await;
    for (who, since, told) in [(a, a_since, true), (b, b_since, false)] {
        let mut since = since;
        let mut readers = vec![];
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "{} never got the message after the receipt",
                who.user_id
            );
            let next = who.sync(&since, Some(lazy_filter())).await;
            readers.extend(receipt_readers(&next, &group));
            since = next["next_batch"].as_str().unwrap().to_owned();
            if events(&next, &group, "timeline").iter().any(|e| e["event_id"] == after.as_str()) {
                break;
            }
        }
        assert_eq!(
            readers.contains(&a.user_id),
            told,
            "{} told of the receipt: {readers:?}",
            who.user_id
        );
    }
    let initial = |m: &Api| {
        let (m, group) = (m.clone(), group.clone());
        async move { receipt_readers(&m.sync("", Some(lazy_filter())).await, &group) }
    };
    assert_eq!(
        initial(a).await,
        vec![a.user_id.clone()],
        "the reader's initial sync: their own receipt"
    );
    assert_eq!(initial(b).await, Vec::<String>::new(), "anyone else's: none");

    // The owner pages through the member list: everyone once, in order.
    let (listed, pages) = owner.member_pages(&group, "limit=500").await;
    assert_eq!(listed.len(), MEMBERS + 2, "every member once (and the owner and the reader)");
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "in user id order, nobody twice");
    assert_eq!(pages, (MEMBERS + 2).div_ceil(500));
    let (status, err) = owner
        .req_at(
            M::GET,
            &format!("/_matrix/client/unstable/kabar/rooms/{}/members?limit=0", enc(&group)),
            None,
        )
        .await;
    assert_eq!((status, err["errcode"].as_str()), (400, Some("M_INVALID_PARAM")));
}
