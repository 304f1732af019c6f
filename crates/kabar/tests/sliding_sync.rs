//! Simplified sliding sync (MSC4186) against the real binary: the room list
//! in activity order with names and counts, incremental answers that carry
//! only what changed, `M_UNKNOWN_POS`, refused requests, the to-device and
//! e2ee extensions, and matrix-sdk's own sliding-sync client.

mod common;

use std::time::{Duration, Instant};

use common::{Api, Server};
use reqwest::Method;
use serde_json::{Value, json};

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

async fn sliding(api: &Api, query: &str, body: Value) -> (u16, Value) {
    api.req_at(Method::POST, &format!("{PATH}{query}"), Some(body)).await
}

fn room_list(ranges: Value) -> Value {
    json!({
        "conn_id": "room-list",
        "lists": {
            "all": {
                "ranges": ranges,
                "timeline_limit": 1,
                "required_state": [["m.room.name", ""], ["m.room.member", "$LAZY"], ["m.room.create", ""]]
            }
        }
    })
}

fn bodies(room: &Value) -> Vec<String> {
    room["timeline"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_room_list_comes_in_activity_order_and_then_only_what_changed() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let versions: Value = common::http()
        .get(format!("{}/_matrix/client/versions", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(versions["unstable_features"]["org.matrix.simplified_msc3575"], true);

    let mut rooms = vec![];
    for name in ["first", "second", "third"] {
        let room = alice.create_room(json!({"name": name})).await;
        alice.say(&room, &format!("t-{name}"), &format!("hello {name}")).await;
        rooms.push(room);
    }
    let invite = bob.create_room(json!({"name": "bob's", "invite": [alice.user_id]})).await;

    // The first page: newest activity first (the invite came last).
    let (status, first) = sliding(&alice, "", room_list(json!([[0, 1]]))).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["lists"]["all"]["count"], 4, "three joined rooms and an invite: {first}");
    let page: Vec<&String> = first["rooms"].as_object().unwrap().keys().collect();
    assert_eq!(page.len(), 2, "the range [0, 1] holds two rooms: {first}");
    assert!(page.contains(&&invite) && page.contains(&&rooms[2]), "{page:?}");
    let third = &first["rooms"][&rooms[2]];
    assert_eq!(third["name"], "third");
    assert_eq!(third["initial"], true);
    assert_eq!(bodies(third), ["hello third"], "timeline_limit 1: {third}");
    assert_eq!(third["limited"], true);
    assert!(third["prev_batch"].is_string());
    assert_eq!(third["joined_count"], 1);
    assert!(
        first["rooms"][&invite]["bump_stamp"].as_u64().unwrap() > third["bump_stamp"].as_u64().unwrap(),
        "the invite came after the third room's message: {first}"
    );
    let state_types: Vec<&str> = third["required_state"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(
        state_types.contains(&"m.room.name") && state_types.contains(&"m.room.create"),
        "{third}"
    );
    assert!(state_types.contains(&"m.room.member"), "$LAZY: the timeline's sender: {third}");
    let invited = &first["rooms"][&invite];
    assert_eq!(invited["name"], "bob's");
    assert!(
        invited["invite_state"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["state_key"] == alice.user_id.as_str()),
        "{invited}"
    );
    let pos = first["pos"].as_str().unwrap().to_owned();

    // Nothing new: a long-poll waits, then answers with nothing.
    let asked = Instant::now();
    let (status, quiet) = sliding(&alice, &format!("?pos={pos}&timeout=300"), room_list(json!([[0, 1]]))).await;
    assert_eq!(status, 200);
    assert!(asked.elapsed() >= Duration::from_millis(250), "it waited");
    assert!(quiet["rooms"].as_object().is_none_or(|r| r.is_empty()), "{quiet}");
    let pos = quiet["pos"].as_str().unwrap().to_owned();

    // A message in the oldest room moves it to the top, and wakes the long-poll.
    let waiting = {
        let (alice, pos) = (alice.clone(), pos.clone());
        tokio::spawn(async move { sliding(&alice, &format!("?pos={pos}&timeout=20000"), room_list(json!([[0, 1]]))).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice.say(&rooms[0], "t-again", "back on top").await;
    let (status, moved) = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
    assert_eq!(status, 200, "{moved}");
    let top = &moved["rooms"][&rooms[0]];
    assert_eq!(top["initial"], true, "new to this connection's window: {moved}");
    assert_eq!(bodies(top), ["back on top"]);
    let pos = moved["pos"].as_str().unwrap().to_owned();

    // Another message in a room already told: only the new event.
    let waiting = {
        let (alice, pos) = (alice.clone(), pos.clone());
        tokio::spawn(async move { sliding(&alice, &format!("?pos={pos}&timeout=20000"), room_list(json!([[0, 1]]))).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice.say(&rooms[0], "t-more", "and more").await;
    let (_, more) = tokio::time::timeout(Duration::from_secs(10), waiting).await.unwrap().unwrap();
    let top = &more["rooms"][&rooms[0]];
    assert!(top.get("initial").is_none(), "{more}");
    assert_eq!(bodies(top), ["and more"]);
    assert_eq!(top["num_live"], 1);
    let state: Vec<(&str, &str)> = top["required_state"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["type"].as_str()?, e["state_key"].as_str()?)))
        .collect();
    assert_eq!(
        state,
        [("m.room.member", alice.user_id.as_str())],
        "no state changed, only the sender ($LAZY): {top}"
    );

    // The same pos again (a retried request) is still known; a made-up one is not.
    let (status, _) = sliding(&alice, &format!("?pos={pos}"), room_list(json!([[0, 1]]))).await;
    assert_eq!(status, 200);
    let pos = more["pos"].as_str().unwrap().to_owned();

    // Alice leaves a room this connection was told of (from another
    // device, say): told once more, with her leave, and counted out.
    alice
        .ok(Method::POST, &format!("/rooms/{}/leave", common::enc(&rooms[0])), Some(json!({})))
        .await;
    let (_, after_leave) = sliding(&alice, &format!("?pos={pos}&timeout=5000"), room_list(json!([[0, 1]]))).await;
    assert_eq!(after_leave["lists"]["all"]["count"], 3, "{after_leave}");
    let left = &after_leave["rooms"][&rooms[0]];
    assert!(
        left["required_state"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["state_key"] == alice.user_id.as_str() && e["content"]["membership"] == "leave"),
        "{after_leave}"
    );
    let (status, unknown) = sliding(&alice, "?pos=1_2_3", room_list(json!([[0, 1]]))).await;
    assert_eq!((status, unknown["errcode"].as_str()), (400, Some("M_UNKNOWN_POS")), "{unknown}");

    // Element X asks for OAuth metadata first; without it, it offers password login.
    let (status, metadata) = alice.req_at(Method::GET, "/_matrix/client/v1/auth_metadata", None).await;
    assert_eq!((status, metadata["errcode"].as_str()), (404, Some("M_UNRECOGNIZED")), "{metadata}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_v3_sync_client_and_a_sliding_sync_client_in_one_room_see_the_same_messages() {
    let server = Server::start();
    let kim = Api::register(&server, "kim").await;
    let lou = Api::register(&server, "lou").await;
    let room = kim.create_room(json!({"preset": "public_chat"})).await;
    lou.join(&room).await;
    let lou_since = lou.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let subscription = json!({"conn_id": "one", "room_subscriptions": {room.clone(): {"timeline_limit": 0}}});
    let (_, first) = sliding(&kim, "", subscription.clone()).await;
    let mut pos = first["pos"].as_str().unwrap().to_owned();
    let sent: Vec<String> = (0..5).map(|i| format!("message {i}")).collect();
    for (i, body) in sent.iter().enumerate() {
        let speaker = if i % 2 == 0 { &kim } else { &lou };
        speaker.say(&room, &format!("m{i}"), body).await;
    }
    // Kim follows with sliding sync, Lou with /v3/sync.
    let mut kim_saw: Vec<String> = vec![];
    let mut subscription = subscription;
    subscription["room_subscriptions"][&room]["timeline_limit"] = json!(10);
    let deadline = Instant::now() + Duration::from_secs(20);
    while kim_saw.len() < sent.len() {
        assert!(Instant::now() < deadline, "kim's sliding sync shows them: {kim_saw:?}");
        let (_, v) = sliding(&kim, &format!("?pos={pos}&timeout=2000"), subscription.clone()).await;
        kim_saw.extend(bodies(&v["rooms"][&room]).into_iter().filter(|b| b.starts_with("message ")));
        pos = v["pos"].as_str().unwrap().to_owned();
    }
    let mut lou_saw: Vec<String> = vec![];
    let mut since = lou_since;
    while lou_saw.len() < sent.len() {
        assert!(Instant::now() < deadline, "lou's /v3/sync shows them: {lou_saw:?}");
        let v = lou.sync(&since, None).await;
        lou_saw.extend(bodies(&json!({"timeline": v["rooms"]["join"][&room]["timeline"]["events"]})));
        since = v["next_batch"].as_str().unwrap().to_owned();
    }
    assert_eq!(kim_saw, sent);
    assert_eq!(lou_saw, sent, "the same messages, in the same order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_matrix_errors() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    for (query, body, errcode) in [
        (
            "",
            json!({"lists": {"a": {"ranges": [[5, 1]], "timeline_limit": 1}}}),
            "M_INVALID_PARAM",
        ),
        (
            "",
            json!({"lists": {"a": {"ranges": [[0, 1]], "timeline_limit": 1_000_000}}}),
            "M_INVALID_PARAM",
        ),
        ("", json!({"lists": {"a": {"ranges": [[-1, 1]]}}}), "M_BAD_JSON"),
        ("", json!({"lists": "everything"}), "M_BAD_JSON"),
        ("?timeout=-5", json!({}), "M_INVALID_PARAM"),
        ("?set_presence=dancing", json!({}), "M_INVALID_PARAM"),
    ] {
        let (status, v) = sliding(&alice, query, body.clone()).await;
        assert_eq!((status, v["errcode"].as_str()), (400, Some(errcode)), "{query} {body}: {v}");
    }
    // A huge range costs what the user's rooms cost, no more.
    let (status, v) = sliding(
        &alice,
        "",
        json!({"lists": {"a": {"ranges": [[0, u64::MAX]], "timeline_limit": 1}}}),
    )
    .await;
    assert_eq!((status, v["lists"]["a"]["count"].as_u64()), (200, Some(0)), "{v}");
    let unauthenticated = common::http()
        .post(format!("{}{PATH}", server.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status().as_u16(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_device_messages_and_key_counts_come_through_the_extensions() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let extensions = |since: Option<&str>| {
        let mut to_device = json!({"enabled": true});
        if let Some(s) = since {
            to_device["since"] = json!(s);
        }
        json!({"conn_id": "encryption", "extensions": {"to_device": to_device, "e2ee": {"enabled": true}}})
    };
    let (_, first) = sliding(&alice, "", extensions(None)).await;
    assert!(first["extensions"]["e2ee"]["device_one_time_keys_count"].is_object(), "{first}");
    let next_batch = first["extensions"]["to_device"]["next_batch"].as_str().unwrap().to_owned();
    let pos = first["pos"].as_str().unwrap().to_owned();

    bob.ok(
        Method::PUT,
        "/sendToDevice/m.kabar.test/td1",
        Some(json!({"messages": {alice.user_id.as_str(): {alice.device_id.as_str(): {"hello": "alice"}}}})),
    )
    .await;
    let (_, got) = sliding(&alice, &format!("?pos={pos}&timeout=10000"), extensions(Some(&next_batch))).await;
    let events = got["extensions"]["to_device"]["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{got}");
    assert_eq!(
        (events[0]["sender"].as_str(), &events[0]["content"]["hello"]),
        (Some(bob.user_id.as_str()), &json!("alice"))
    );
    let acknowledged = got["extensions"]["to_device"]["next_batch"].as_str().unwrap().to_owned();
    let pos = got["pos"].as_str().unwrap().to_owned();

    // Acknowledged by the next request's `since`: not delivered again.
    let (_, again) = sliding(&alice, &format!("?pos={pos}"), extensions(Some(&acknowledged))).await;
    assert!(
        again["extensions"]["to_device"]["events"].as_array().is_none_or(|e| e.is_empty()),
        "{again}"
    );

    // One-time keys uploaded show in the counts.
    alice
        .ok(
            Method::POST,
            "/keys/upload",
            Some(json!({"one_time_keys": {"signed_curve25519:AAAAAQ": {"key": "k1", "signatures": {}}}})),
        )
        .await;
    let (_, counted) = sliding(&alice, "", extensions(Some(&acknowledged))).await;
    assert_eq!(
        counted["extensions"]["e2ee"]["device_one_time_keys_count"]["signed_curve25519"], 1,
        "{counted}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matrix_sdks_sliding_sync_lists_the_rooms_and_follows_new_messages() {
    use futures::StreamExt;
    use matrix_sdk::{SlidingSyncList, SlidingSyncMode, ruma::api::client::sync::sync_events::v5 as http, sliding_sync::Version};
    let server = Server::start();
    let client = common::registered(&server.url, "carol").await;
    let carol = Api::of(&client, &server);
    let mut rooms = vec![];
    for name in ["one", "two"] {
        rooms.push(carol.create_room(json!({"name": name})).await);
    }
    client.set_sliding_sync_version(Version::Native);
    let sliding_sync = client
        .sliding_sync("carol")
        .unwrap()
        .add_list(
            SlidingSyncList::builder("all")
                .sync_mode(SlidingSyncMode::new_growing(10))
                .timeline_limit(5)
                .required_state(vec![
                    (matrix_sdk::ruma::events::StateEventType::RoomName, String::new()),
                    (matrix_sdk::ruma::events::StateEventType::RoomMember, "$LAZY".into()),
                ]),
        )
        .with_to_device_extension(assign_enabled(http::request::ToDevice::default()))
        .poll_timeout(Duration::from_secs(5))
        .build()
        .await
        .expect("a sliding sync");
    let stream = sliding_sync.sync();
    futures::pin_mut!(stream);
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.rooms().len() < 2 {
        assert!(Instant::now() < deadline, "the SDK learns both rooms");
        stream.next().await.expect("the stream goes on").expect("a sliding-sync answer");
    }
    let room_one = client
        .get_room(&matrix_sdk::ruma::OwnedRoomId::try_from(rooms[0].as_str()).unwrap())
        .expect("room one is known");
    assert_eq!(room_one.name().as_deref(), Some("one"));

    carol.say(&rooms[0], "t-sdk", "seen by the sdk").await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let summary = stream.next().await.expect("the stream goes on").expect("a sliding-sync answer");
        if summary.rooms.iter().any(|r| r.as_str() == rooms[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "the new message's room is in an update");
    }
}

fn assign_enabled(
    mut to_device: matrix_sdk::ruma::api::client::sync::sync_events::v5::request::ToDevice,
) -> matrix_sdk::ruma::api::client::sync::sync_events::v5::request::ToDevice {
    to_device.enabled = Some(true);
    to_device
}

/// The rooms a matrix-sdk-ui room list shows, in its order, as
/// `(room id, display name, unread notifications)`.
type Listed = Vec<(String, String, u64)>;

async fn listed(items: &matrix_sdk_ui::eyeball_im::Vector<matrix_sdk_ui::room_list_service::RoomListItem>) -> Listed {
    let mut out = vec![];
    for item in items {
        let name = item.display_name().await.map(|n| n.to_string()).unwrap_or_default();
        out.push((item.room_id().to_string(), name, item.num_unread_notifications()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn element_xs_room_list_shows_rooms_by_activity_with_names_unread_counts_and_invites() {
    use futures::StreamExt;
    use matrix_sdk_ui::{eyeball_im::Vector, room_list_service::filters::new_filter_non_left, sync_service::SyncService};
    let server = Server::start();
    let client = common::registered(&server.url, "erin").await;
    let erin = Api::of(&client, &server);
    let frank = Api::register(&server, "frank").await;
    let older = erin.create_room(json!({"name": "older", "preset": "public_chat"})).await;
    erin.say(&older, "t-1", "first words").await;
    let newer = erin.create_room(json!({"name": "newer"})).await;
    erin.say(&newer, "t-2", "later words").await;
    frank.join(&older).await;

    let sync_service = SyncService::builder(client.clone()).build().await.expect("a sync service");
    sync_service.start().await;
    let room_list = sync_service.room_list_service();
    let all_rooms = room_list.all_rooms().await.expect("the all-rooms list");
    let (entries, controller) = all_rooms.entries_with_dynamic_adapters(20);
    futures::pin_mut!(entries);
    controller.set_filter(Box::new(new_filter_non_left()));
    let mut items: Vector<matrix_sdk_ui::room_list_service::RoomListItem> = Vector::new();
    // Applies the list's diffs until `done` holds for what it shows.
    let mut wait_for = async |what: &str, done: &dyn Fn(&Listed) -> bool| -> Listed {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let now = listed(&items).await;
            if done(&now) {
                return now;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some(diffs)) = tokio::time::timeout(left, entries.next()).await else {
                panic!("{what}: the room list shows {now:?}");
            };
            for diff in diffs {
                diff.apply(&mut items);
            }
        }
    };

    let shown = wait_for("both rooms, newest activity first", &|l: &Listed| {
        l.len() == 2 && l[0].1 == "newer" && l[1].1 == "older"
    })
    .await;
    assert_eq!((shown[0].0.as_str(), shown[1].0.as_str()), (newer.as_str(), older.as_str()));

    // Frank writes in the older room: it moves to the top, with an unread count.
    frank.say(&older, "t-f", "hello erin").await;
    wait_for("the older room on top, unread", &|l: &Listed| {
        l.first().is_some_and(|(id, _, unread)| *id == older && *unread >= 1)
    })
    .await;

    // An invite appears, and can be accepted.
    let invited = frank.create_room(json!({"name": "frank's", "invite": [erin.user_id]})).await;
    wait_for("the invite", &|l: &Listed| l.iter().any(|(id, _, _)| *id == invited)).await;
    let room = client
        .get_room(&matrix_sdk::ruma::OwnedRoomId::try_from(invited.as_str()).unwrap())
        .expect("the invited room is known");
    assert_eq!(room.state(), matrix_sdk::RoomState::Invited);
    room.join().await.expect("erin accepts the invite");
    let deadline = Instant::now() + Duration::from_secs(20);
    while room.state() != matrix_sdk::RoomState::Joined {
        assert!(Instant::now() < deadline, "the joined room comes through sliding sync");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sync_service.stop().await;
}

/// The text bodies a matrix-sdk-ui timeline shows, decrypted ones included.
async fn timeline_bodies(timeline: &matrix_sdk_ui::Timeline) -> Vec<String> {
    timeline
        .items()
        .await
        .iter()
        .filter_map(|item| item.as_event())
        .filter_map(|event| event.content().as_message().map(|m| m.body().to_owned()))
        .collect()
}

async fn wait_for_body(timeline: &matrix_sdk_ui::Timeline, body: &str, who: &str) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let bodies = timeline_bodies(timeline).await;
        if bodies.iter().any(|b| b == body) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{who} never read {body:?} (the timeline shows {bodies:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encrypted_dm_between_two_sliding_sync_clients_decrypts_on_both_sides() {
    use matrix_sdk::ruma::{
        api::client::room::create_room,
        events::{InitialStateEvent, room::encryption::RoomEncryptionEventContent, room::message::RoomMessageEventContent},
    };
    use matrix_sdk_ui::{sync_service::SyncService, timeline::RoomExt};
    let server = Server::start();
    let gina = common::registered(&server.url, "gina").await;
    let hank = common::registered(&server.url, "hank").await;
    let mut services = vec![];
    for client in [&gina, &hank] {
        let service = SyncService::builder(client.clone()).build().await.expect("a sync service");
        service.start().await;
        services.push(service);
    }

    let mut request = create_room::v3::Request::new();
    request.is_direct = true;
    request.invite = vec![hank.user_id().unwrap().to_owned()];
    request.initial_state =
        vec![InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any()];
    let room = gina.create_room(request).await.expect("gina opens an encrypted DM");
    let room_id = room.room_id().to_owned();

    let deadline = Instant::now() + Duration::from_secs(30);
    let hanks_room = loop {
        if let Some(r) = hank.get_room(&room_id)
            && r.state() == matrix_sdk::RoomState::Invited
        {
            break r;
        }
        assert!(Instant::now() < deadline, "hank's room list shows gina's invite");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    hanks_room.join().await.expect("hank accepts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while room.joined_members_count() < 2 {
        assert!(Instant::now() < deadline, "gina sees hank join");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let gina_timeline = room.timeline().await.expect("gina's timeline");
    let hank_timeline = hanks_room.timeline().await.expect("hank's timeline");
    gina_timeline
        .send(RoomMessageEventContent::text_plain("a secret for hank").into())
        .await
        .expect("gina sends");
    wait_for_body(&hank_timeline, "a secret for hank", "hank").await;
    hank_timeline
        .send(RoomMessageEventContent::text_plain("and one for gina").into())
        .await
        .expect("hank replies");
    wait_for_body(&gina_timeline, "and one for gina", "gina").await;
    assert!(room.latest_encryption_state().await.unwrap().is_encrypted());

    // The server only ever saw ciphertext.
    let stored = common::stored_bytes(&server);
    let haystack = String::from_utf8_lossy(&stored);
    assert!(!haystack.contains("a secret for hank") && !haystack.contains("and one for gina"));
    for service in services {
        service.stop().await;
    }
}

/// The event id of the timeline item whose body is `body`.
async fn item_id(timeline: &matrix_sdk_ui::Timeline, body: &str) -> Option<String> {
    timeline
        .items()
        .await
        .iter()
        .filter_map(|i| i.as_event())
        .find_map(|e| (e.content().as_message().map(|m| m.body()) == Some(body)).then(|| e.event_id().map(|id| id.to_string()))?)
}

/// Waits until the timeline item with event id `id` satisfies `holds`.
async fn wait_for_item(
    timeline: &matrix_sdk_ui::Timeline,
    id: &str,
    what: &str,
    holds: impl Fn(&matrix_sdk_ui::timeline::EventTimelineItem) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let items = timeline.items().await;
        let item = items
            .iter()
            .filter_map(|i| i.as_event())
            .find(|e| e.event_id().is_some_and(|e| e.as_str() == id));
        if item.is_some_and(&holds) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: never seen on {id}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn element_xs_timeline_pages_back_shows_edits_reactions_redactions_receipts_and_typing_and_recovers_from_a_restart() {
    use matrix_sdk_ui::{sync_service::SyncService, timeline::RoomExt};
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let listen = ["--listen".to_owned(), format!("127.0.0.1:{port}")];
    let mut server = Server::start_in(dir.path(), &listen);
    let client = common::registered(&server.url, "iris").await;
    let iris = Api::of(&client, &server);
    let jack = Api::register(&server, "jack").await;
    let room_id = iris.create_room(json!({"preset": "public_chat", "name": "history"})).await;
    jack.join(&room_id).await;
    for i in 0..30 {
        jack.say(&room_id, &format!("h{i}"), &format!("history {i}")).await;
    }

    let sync_service = SyncService::builder(client.clone()).build().await.expect("a sync service");
    sync_service.start().await;
    let owned = matrix_sdk::ruma::OwnedRoomId::try_from(room_id.as_str()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let room = loop {
        if let Some(r) = client.get_room(&owned) {
            break r;
        }
        assert!(Instant::now() < deadline, "the room comes through sliding sync");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let timeline = room.timeline().await.expect("a timeline");

    // Back-pagination reaches the whole history.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let bodies = timeline_bodies(&timeline).await;
        if (0..30).all(|i| bodies.contains(&format!("history {i}"))) {
            break;
        }
        assert!(Instant::now() < deadline, "back-pagination shows all history: {bodies:?}");
        timeline.paginate_backwards(20).await.expect("paginate back");
    }

    // An edit, a reaction and a redaction by jack, and his read receipt.
    let edited = item_id(&timeline, "history 29").await.expect("history 29 is shown");
    jack.ok(
        Method::PUT,
        &format!("/rooms/{}/send/m.room.message/edit1", common::enc(&room_id)),
        Some(json!({
            "msgtype": "m.text", "body": "* edited 29",
            "m.new_content": {"msgtype": "m.text", "body": "edited 29"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": edited}
        })),
    )
    .await;
    wait_for_item(&timeline, &edited, "the edit", |e| {
        e.content().as_message().is_some_and(|m| m.body() == "edited 29" && m.is_edited())
    })
    .await;
    jack.ok(
        Method::PUT,
        &format!("/rooms/{}/send/m.reaction/react1", common::enc(&room_id)),
        Some(json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": edited, "key": "👍"}})),
    )
    .await;
    wait_for_item(&timeline, &edited, "the reaction", |e| {
        e.content().reactions().is_some_and(|r| r.contains_key("👍"))
    })
    .await;
    let redacted = item_id(&timeline, "history 28").await.expect("history 28 is shown");
    jack.ok(
        Method::PUT,
        &format!("/rooms/{}/redact/{}/redact1", common::enc(&room_id), common::enc(&redacted)),
        Some(json!({"reason": "oops"})),
    )
    .await;
    wait_for_item(&timeline, &redacted, "the redaction", |e| e.content().is_redacted()).await;
    jack.ok(
        Method::POST,
        &format!("/rooms/{}/receipt/m.read/{}", common::enc(&room_id), common::enc(&edited)),
        Some(json!({})),
    )
    .await;
    wait_for_item(&timeline, &edited, "jack's read receipt", |e| {
        e.read_receipts().keys().any(|u| u.as_str() == jack.user_id)
    })
    .await;

    // Jack types: the typing extension tells the room list's connection.
    let (_guard, mut typing) = room.subscribe_to_typing_notifications();
    jack.ok(
        Method::PUT,
        &format!("/rooms/{}/typing/{}", common::enc(&room_id), common::enc(&jack.user_id)),
        Some(json!({"typing": true, "timeout": 20000})),
    )
    .await;
    let typists = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let users = typing.recv().await.expect("typing notifications go on");
            if users.iter().any(|u| u.as_str() == jack.user_id) {
                return users;
            }
        }
    })
    .await
    .expect("iris's client shows jack typing");
    assert_eq!(typists.len(), 1);

    // The server restarts: the client's pos is unknown to the new process
    // (M_UNKNOWN_POS); the client starts its connections again and goes on.
    server.kill9();
    let server = Server::start_in(dir.path(), &listen);
    jack.say(&room_id, "after", "after the restart").await;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if timeline_bodies(&timeline).await.iter().any(|b| b == "after the restart") {
            break;
        }
        assert!(Instant::now() < deadline, "the message sent after the restart arrives");
        // What an app does when its sync service stopped on an error.
        if !matches!(sync_service.state().get(), matrix_sdk_ui::sync_service::State::Running) {
            sync_service.start().await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sync_service.stop().await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushers_are_stored_listed_replaced_and_removed() {
    let server = Server::start();
    let mia = Api::register(&server, "mia").await;
    let ned = Api::register(&server, "ned").await;
    let pusher = |pushkey: &str, device: &str| {
        json!({
            "app_id": "io.element.elementx", "pushkey": pushkey, "kind": "http",
            "app_display_name": "Element X", "device_display_name": device, "lang": "en",
            "data": {"url": "https://push.example.org/_matrix/push/v1/notify", "format": "event_id_only"}
        })
    };
    assert_eq!(mia.ok(Method::GET, "/pushers", None).await, json!({"pushers": []}));
    mia.ok(Method::POST, "/pushers/set", Some(pusher("phone-key", "phone"))).await;
    mia.ok(Method::POST, "/pushers/set", Some(pusher("tablet-key", "tablet"))).await;
    mia.ok(Method::POST, "/pushers/set", Some(pusher("phone-key", "new phone"))).await;
    let listed = mia.ok(Method::GET, "/pushers", None).await;
    let devices: Vec<&str> = listed["pushers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["device_display_name"].as_str())
        .collect();
    assert_eq!(devices, ["new phone", "tablet"], "{listed}");
    assert_eq!(listed["pushers"][0]["data"]["format"], "event_id_only");

    // The tablet changes hands: Ned registers its push key, Mia's goes.
    ned.ok(Method::POST, "/pushers/set", Some(pusher("tablet-key", "tablet"))).await;
    assert_eq!(mia.ok(Method::GET, "/pushers", None).await["pushers"].as_array().unwrap().len(), 1);
    let mut gone = pusher("phone-key", "x");
    gone["kind"] = serde_json::Value::Null;
    mia.ok(Method::POST, "/pushers/set", Some(gone)).await;
    assert_eq!(mia.ok(Method::GET, "/pushers", None).await, json!({"pushers": []}));

    let mut email = pusher("mia@example.org", "mail");
    email["kind"] = json!("email");
    let mut bad_url = pusher("k", "d");
    bad_url["data"]["url"] = json!("https://push.example.org/elsewhere");
    for (body, errcode) in [
        (email, "M_INVALID_PARAM"),
        (bad_url, "M_INVALID_PARAM"),
        (json!({"app_id": 5}), "M_BAD_JSON"),
    ] {
        let (status, v) = mia.req(Method::POST, "/pushers/set", Some(body.clone())).await;
        assert_eq!((status, v["errcode"].as_str()), (400, Some(errcode)), "{body}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_restart_the_room_list_comes_in_the_same_order_from_rooms_not_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    let pia = Api::register(&server, "pia").await;
    let mut rooms = vec![];
    for name in ["a", "b", "c", "d"] {
        rooms.push(pia.create_room(json!({"name": name})).await);
    }
    // Activity in the opposite order of creation, and an encrypted room.
    for (i, room) in rooms.iter().enumerate().rev() {
        pia.say(room, &format!("r{i}"), &format!("in room {i}")).await;
    }
    pia.ok(
        Method::PUT,
        &format!("/rooms/{}/state/m.room.encryption/", common::enc(&rooms[3])),
        Some(json!({"algorithm": "m.megolm.v1.aes-sha2"})),
    )
    .await;
    let list = |filters: Value| json!({"lists": {"all": {"ranges": [[0, 9]], "timeline_limit": 1, "filters": filters}}});
    let order = |v: &Value| -> Vec<String> {
        let mut rooms: Vec<(u64, String)> = v["rooms"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(id, r)| (r["bump_stamp"].as_u64().unwrap(), id.clone()))
            .collect();
        rooms.sort();
        rooms.into_iter().rev().map(|(_, id)| id).collect()
    };
    let (_, warm) = sliding(&pia, "", list(json!({}))).await;
    let (_, warm_encrypted) = sliding(&pia, "", list(json!({"is_encrypted": true}))).await;
    server.kill9();
    let server = Server::start_in(dir.path(), &[]);
    let pia = Api {
        url: server.url.clone(),
        ..pia
    };
    let (_, cold) = sliding(&pia, "", list(json!({}))).await;
    let (_, cold_encrypted) = sliding(&pia, "", list(json!({"is_encrypted": true}))).await;
    assert_eq!(order(&cold), order(&warm), "warm {warm}\ncold {cold}");
    assert_eq!(order(&cold)[0], rooms[0], "the room with the newest message first");
    assert_eq!(cold_encrypted["lists"]["all"]["count"], 1);
    assert_eq!(order(&cold_encrypted), order(&warm_encrypted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_filtered_by_space_holds_the_spaces_children_and_follows_new_ones() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let space = alice
        .create_room(json!({"name": "club", "creation_content": {"type": "m.space"}}))
        .await;
    let (general, random, elsewhere) = (
        alice.create_room(json!({"name": "general"})).await,
        alice.create_room(json!({"name": "random"})).await,
        alice.create_room(json!({"name": "elsewhere"})).await,
    );
    let add_child = |child: String, via: Value| {
        let (alice, space) = (alice.clone(), space.clone());
        async move {
            let path = format!("/rooms/{}/state/m.space.child/{}", common::enc(&space), common::enc(&child));
            alice.ok(Method::PUT, &path, Some(json!({ "via": via }))).await;
        }
    };
    add_child(general.clone(), json!(["localhost"])).await;
    // A child event without a way in names no child (the spec's removal).
    add_child(elsewhere.clone(), json!([])).await;
    let lists = json!({
        "conn_id": "spaces",
        "lists": {
            "club": {"ranges": [[0, 9]], "timeline_limit": 0, "filters": {"spaces": [space]}},
            "spaces": {"ranges": [[0, 9]], "timeline_limit": 0, "filters": {"room_types": ["m.space"]}}
        }
    });
    let (status, first) = sliding(&alice, "", lists.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["lists"]["club"]["count"], 1, "{first}");
    assert_eq!(first["lists"]["spaces"]["count"], 1, "{first}");
    let mut shown: Vec<&String> = first["rooms"].as_object().unwrap().keys().collect();
    shown.sort();
    let mut expected = vec![&general, &space];
    expected.sort();
    assert_eq!(shown, expected, "{first}");
    let not_spaces = json!({"lists": {"rooms": {"ranges": [[0, 9]], "filters": {"not_room_types": ["m.space"]}}}});
    let (_, rooms) = sliding(&alice, "", not_spaces).await;
    assert_eq!(rooms["lists"]["rooms"]["count"], 3, "{rooms}");

    // A new child: the list that was kept takes it in.
    add_child(random.clone(), json!(["localhost"])).await;
    let pos = first["pos"].as_str().unwrap();
    let (status, next) = sliding(&alice, &format!("?pos={pos}&timeout=5000"), lists).await;
    assert_eq!(status, 200, "{next}");
    assert_eq!(next["lists"]["club"]["count"], 2, "{next}");
    assert!(next["rooms"].get(&random).is_some(), "{next}");
}
