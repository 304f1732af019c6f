//! Broadcast channels (issue 17): the staff post, subscribers read, react
//! and leave; subscribers do not see one another, through matrix-sdk and
//! every endpoint that shows members.

mod common;

use std::time::Duration;

use common::{Api, Server, enc, registered};
use matrix_sdk::{
    RoomMemberships,
    config::SyncSettings,
    ruma::{
        OwnedRoomId, RoomOrAliasId,
        api::error::ErrorKind,
        events::{reaction::ReactionEventContent, relation::Annotation, room::message::RoomMessageEventContent},
    },
};
use reqwest::Method as M;
use serde_json::{Value, json};

fn settings() -> SyncSettings {
    SyncSettings::default().timeout(Duration::from_secs(2))
}

/// Every member event anywhere in one raw `/sync` answer for `room`: its
/// timeline and its state.
fn member_keys(sync: &Value, room: &str) -> Vec<String> {
    let joined = &sync["rooms"]["join"][room];
    ["timeline", "state"]
        .iter()
        .flat_map(|section| joined[section]["events"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["type"] == "m.room.member")
        .filter_map(|e| e["state_key"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_read_and_react_but_neither_post_nor_see_each_other() {
    let server = Server::start();
    let admin = Api::register(&server, "newsdesk").await;
    let channel = admin
        .create_room(json!({
            "name": "Daily news",
            "preset": "public_chat",
            "visibility": "public",
            "room_alias_name": "news",
            "creation_content": {"type": "kabar.channel"}
        }))
        .await;
    admin.say(&channel, "p1", "first post").await;

    // Two subscribers join from the link's alias, with matrix-sdk.
    let alias = <&RoomOrAliasId>::try_from("#news:localhost").unwrap();
    let (ann, ben) = (registered(&server.url, "ann").await, registered(&server.url, "ben").await);
    for client in [&ann, &ben] {
        client.join_room_by_id_or_alias(alias, &[]).await.expect("join from the alias");
    }
    let room_id = OwnedRoomId::try_from(channel.as_str()).unwrap();
    admin.say(&channel, "p2", "second post").await;

    // Ann reads both posts, may react, may not post.
    ann.sync_once(settings()).await.unwrap();
    let room = ann.get_room(&room_id).expect("ann is in the channel");
    let messages = room.messages(matrix_sdk::room::MessagesOptions::backward()).await.unwrap();
    let bodies: Vec<String> = messages
        .chunk
        .iter()
        .filter_map(|e| e.raw().get_field::<Value>("content").ok().flatten())
        .filter_map(|c| c["body"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(bodies, ["second post", "first post"]);
    let refused = room
        .send(RoomMessageEventContent::text_plain("me too"))
        .await
        .expect_err("a subscriber may not post");
    assert_eq!(refused.client_api_error_kind(), Some(&ErrorKind::Forbidden));
    let newest = messages.chunk[0].event_id().unwrap();
    room.send(ReactionEventContent::new(Annotation::new(newest, "👍".into())))
        .await
        .expect("a subscriber may react");

    // Ann sees the staff and herself, never Ben: not in matrix-sdk's member
    // list, not in /members, /joined_members, /state, /sync or /messages.
    let members: Vec<String> = room
        .members(RoomMemberships::JOIN)
        .await
        .unwrap()
        .iter()
        .map(|m| m.user_id().to_string())
        .collect();
    let (ann_id, ben_id) = (ann.user_id().unwrap().to_string(), ben.user_id().unwrap().to_string());
    assert!(members.contains(&admin.user_id) && members.contains(&ann_id), "{members:?}");
    assert!(!members.contains(&ben_id), "{members:?}");
    let ann_api = Api::of(&ann, &server);
    let path = |what: &str| format!("/rooms/{}/{what}", enc(&channel));
    let listed = ann_api.ok(M::GET, &path("members"), None).await;
    let listed: Vec<&str> = listed["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["state_key"].as_str())
        .collect();
    assert!(
        !listed.contains(&ben_id.as_str()) && listed.contains(&ann_id.as_str()),
        "{listed:?}"
    );
    let joined = ann_api.ok(M::GET, &path("joined_members"), None).await;
    assert!(
        joined["joined"].get(&ben_id).is_none() && joined["joined"].get(&admin.user_id).is_some(),
        "{joined}"
    );
    let state = ann_api.ok(M::GET, &path("state"), None).await;
    assert!(!state.to_string().contains(&ben_id), "{state}");
    let (status, _) = ann_api
        .req(M::GET, &format!("{}/{}", path("state/m.room.member"), enc(&ben_id)), None)
        .await;
    assert_eq!(status, 404, "another subscriber's member event is not there for her");
    let history = ann_api.ok(M::GET, &format!("{}?dir=b&limit=50", path("messages")), None).await;
    assert!(!history.to_string().contains(&ben_id), "{history}");
    let full = ann_api.sync("", None).await;
    assert!(!member_keys(&full, &channel).contains(&ben_id), "{full}");
    assert!(member_keys(&full, &channel).contains(&ann_id));

    // Ben leaves and Carl joins: Ann's incremental sync shows neither.
    let since = full["next_batch"].as_str().unwrap().to_owned();
    ben.get_room(&room_id).unwrap().leave().await.unwrap();
    let carl = Api::register(&server, "carl").await;
    carl.ok(M::POST, &format!("/join/{}", enc("#news:localhost")), Some(json!({})))
        .await;
    admin.say(&channel, "p3", "third post").await;
    let next = ann_api.sync(&since, None).await;
    let timeline = next["rooms"]["join"][&channel]["timeline"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(timeline.iter().any(|e| e["content"]["body"] == "third post"), "{next}");
    assert!(member_keys(&next, &channel).is_empty(), "no joins or leaves: {next}");

    // The staff see every member.
    let everyone = admin.ok(M::GET, &path("joined_members"), None).await;
    let everyone = everyone["joined"].as_object().unwrap();
    assert!(everyone.contains_key(&ann_id) && everyone.contains_key(&carl.user_id) && !everyone.contains_key(&ben_id));
    let admin_history = admin.ok(M::GET, &format!("{}?dir=b&limit=50", path("messages")), None).await;
    assert!(admin_history.to_string().contains(&ben_id), "the staff see joins and leaves");

    // The staff page through the subscribers, one at a time here; a
    // subscriber's pages hold the staff and themselves.
    let mut subscribers = vec![admin.user_id.clone(), ann_id.clone(), carl.user_id.clone()];
    subscribers.sort();
    let query = "membership=join&limit=1";
    assert_eq!(admin.member_pages(&channel, query).await.0, subscribers);
    let mut seen_by_ann = vec![admin.user_id.clone(), ann_id.clone()];
    seen_by_ann.sort();
    assert_eq!(ann_api.member_pages(&channel, query).await.0, seen_by_ann);
}

/// Whether `user` appears anywhere in `room`'s section of a `/sync` answer.
fn names(sync: &Value, room: &str, user: &str) -> bool {
    sync["rooms"]["join"][room].to_string().contains(user)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribers_reactions_receipts_and_typing_are_shown_to_them_and_the_staff_only() {
    let server = Server::start();
    let admin = Api::register(&server, "desk").await;
    let channel = admin
        .create_room(json!({"preset": "public_chat", "creation_content": {"type": "kabar.channel"}}))
        .await;
    let post = admin.say(&channel, "p1", "first post").await;
    let (ann, ben) = (Api::register(&server, "ann").await, Api::register(&server, "ben").await);
    for who in [&ann, &ben] {
        who.join(&channel).await;
    }
    let since = |sync: &Value| sync["next_batch"].as_str().unwrap().to_owned();
    let (ann_since, ben_since, admin_since) = (
        since(&ann.sync("", None).await),
        since(&ben.sync("", None).await),
        since(&admin.sync("", None).await),
    );

    // Ann reacts, reads, and starts typing; then the staff post.
    let path = |what: &str| format!("/rooms/{}/{what}", enc(&channel));
    let reaction = ann
        .ok(
            M::PUT,
            &path("send/m.reaction/r1"),
            Some(json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": post, "key": "👍"}})),
        )
        .await["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    ann.ok(M::POST, &path(&format!("receipt/m.read/{}", enc(&post))), Some(json!({})))
        .await;
    ann.ok(
        M::PUT,
        &path(&format!("typing/{}", enc(&ann.user_id))),
        Some(json!({"typing": true, "timeout": 30000})),
    )
    .await;
    admin.say(&channel, "p2", "second post").await;

    // Ben sees the post and nothing of Ann: not her reaction in his sync,
    // the post's relations, the history or by its id; not her receipt; not
    // her typing.
    let ben_next = ben.sync(&ben_since, None).await;
    let timeline = ben_next["rooms"]["join"][&channel]["timeline"].to_string();
    assert!(timeline.contains("second post"), "{ben_next}");
    assert!(!names(&ben_next, &channel, &ann.user_id), "{ben_next}");
    let relations = ben.ok(M::GET, &path(&format!("relations/{}", enc(&post))), None).await;
    assert_eq!(relations["chunk"].as_array().map(Vec::len), Some(0), "{relations}");
    let history = ben.ok(M::GET, &format!("{}?dir=b&limit=50", path("messages")), None).await;
    assert!(!history.to_string().contains(&ann.user_id), "{history}");
    let (status, _) = ben.req(M::GET, &path(&format!("event/{}", enc(&reaction))), None).await;
    assert_eq!(status, 404, "another subscriber's reaction is not there for him");
    let ben_first = ben.sync("", None).await;
    assert!(
        !names(&ben_first, &channel, &ann.user_id),
        "not in an initial sync either: {ben_first}"
    );

    // Ann sees her own reaction and her own receipt.
    let ann_next = ann.sync(&ann_since, None).await;
    let joined = &ann_next["rooms"]["join"][&channel];
    assert!(joined["timeline"].to_string().contains(&reaction), "{ann_next}");
    let receipts: Vec<&Value> = joined["ephemeral"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.receipt")
        .collect();
    assert_eq!(receipts.len(), 1, "{ann_next}");
    assert!(receipts[0]["content"][&post]["m.read"].get(&ann.user_id).is_some(), "{ann_next}");

    // The staff see her reaction; her receipt is hers alone (the post's
    // view count is what it tells anyone else).
    let admin_next = admin.sync(&admin_since, None).await;
    let admin_joined = &admin_next["rooms"]["join"][&channel];
    assert!(admin_joined["timeline"].to_string().contains(&reaction), "{admin_next}");
    assert!(!admin_joined["ephemeral"].to_string().contains(&ann.user_id), "{admin_next}");
    let relations = admin.ok(M::GET, &path(&format!("relations/{}", enc(&post))), None).await;
    assert_eq!(relations["chunk"][0]["event_id"], reaction.as_str(), "{relations}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_admins_let_everyone_post_is_an_ordinary_room() {
    let server = Server::start();
    let admin = Api::register(&server, "host").await;
    let channel = admin
        .create_room(json!({
            "preset": "public_chat",
            "creation_content": {"type": "kabar.channel"},
            "power_level_content_override": {"events_default": 0}
        }))
        .await;
    let (one, two) = (Api::register(&server, "one").await, Api::register(&server, "two").await);
    one.join(&channel).await;
    two.join(&channel).await;
    one.say(&channel, "t1", "anyone may post here").await;
    let joined = two.ok(M::GET, &format!("/rooms/{}/joined_members", enc(&channel)), None).await;
    assert!(joined["joined"].get(&one.user_id).is_some(), "nobody hidden: {joined}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_counts_rise_as_subscribers_read_never_count_anyone_twice_and_survive_a_restart() {
    let mut server = Server::start();
    let admin = Api::register(&server, "editor").await;
    let channel = admin
        .create_room(json!({"preset": "public_chat", "creation_content": {"type": "kabar.channel"}}))
        .await;
    let before = admin.say(&channel, "p0", "before anyone joined").await;
    let (ann, ben) = (Api::register(&server, "ann").await, Api::register(&server, "ben").await);
    ann.join(&channel).await;
    ben.join(&channel).await;
    let one = admin.say(&channel, "p1", "one").await;
    let two = admin.say(&channel, "p2", "two").await;

    let receipt = |who: &Api, event: &str, kind: &str| {
        let (who, event, kind) = (who.clone(), event.to_owned(), kind.to_owned());
        let channel = channel.clone();
        async move {
            who.ok(
                M::POST,
                &format!("/rooms/{}/receipt/{kind}/{}", enc(&channel), enc(&event)),
                Some(json!({})),
            )
            .await;
        }
    };
    let views = |server: &Server, event: &str| {
        let admin = Api {
            url: server.url.clone(),
            ..admin.clone()
        };
        let (channel, event) = (channel.clone(), event.to_owned());
        async move {
            let path = format!("/_matrix/client/unstable/kabar/rooms/{}/views/{}", enc(&channel), enc(&event));
            admin.req_at(M::GET, &path, None).await.1["views"].as_u64()
        }
    };
    assert_eq!(views(&server, &one).await, Some(0));

    // Ann reads up to the newest: both posts since she joined count her once.
    receipt(&ann, &two, "m.read").await;
    receipt(&ann, &two, "m.read.private").await;
    receipt(&ann, &one, "m.read").await;
    assert_eq!(views(&server, &one).await, Some(1));
    assert_eq!(views(&server, &two).await, Some(1));
    assert_eq!(views(&server, &before).await, Some(0), "posted before anyone joined");
    // Ben has read the first only (a private receipt counts too).
    receipt(&ben, &one, "m.read.private").await;
    assert_eq!(views(&server, &one).await, Some(2));
    assert_eq!(views(&server, &two).await, Some(1));

    // Counts travel with the posts: in history and in sync, for everyone.
    let history = ben
        .ok(M::GET, &format!("/rooms/{}/messages?dir=b&limit=10", enc(&channel)), None)
        .await;
    let shown: Vec<(String, Option<u64>)> = history["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| {
            (
                e["content"]["body"].as_str().unwrap().to_owned(),
                e["unsigned"]["kabar.views"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            ("two".into(), Some(1)),
            ("one".into(), Some(2)),
            ("before anyone joined".into(), Some(0))
        ]
    );
    let sync = ann.sync("", None).await;
    let timeline = sync["rooms"]["join"][&channel]["timeline"]["events"].as_array().unwrap();
    let newest = timeline.iter().rev().find(|e| e["type"] == "m.room.message").unwrap();
    assert_eq!(newest["unsigned"]["kabar.views"], 1, "{newest}");

    // A subscriber may not ask the endpoint; the counts survive a restart.
    let (status, refused) = ann
        .req_at(
            M::GET,
            &format!("/_matrix/client/unstable/kabar/rooms/{}/views/{}", enc(&channel), enc(&one)),
            None,
        )
        .await;
    assert_eq!((status, refused["errcode"].as_str()), (403, Some("M_FORBIDDEN")));
    server.kill9();
    let tmp = server.take_tmp();
    let restarted = Server::start_in(server.data_dir(), &[]);
    assert_eq!(views(&restarted, &one).await, Some(2));
    assert_eq!(views(&restarted, &two).await, Some(1));
    drop(tmp);
}
