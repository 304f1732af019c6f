//! What real clients, a conformance suite and a hostile-input probe found
//! (issue 13): one test per finding, each failing before its fix. matrix-sdk
//! where a client shows the behaviour; raw HTTP where the exact answer is
//! the point.

mod common;

use std::time::Duration;

use common::{Api, Server, enc, first_null, http, post_public, registered};
use matrix_sdk::{config::SyncSettings, ruma::OwnedRoomId};
use reqwest::Method as M;
use serde_json::{Value, json};

fn settings() -> SyncSettings {
    SyncSettings::default().timeout(Duration::from_millis(200))
}

fn errcode(v: &Value) -> &str {
    v["errcode"].as_str().unwrap_or("<none>")
}

fn room_path(room: &str, rest: &str) -> String {
    format!("/rooms/{}{rest}", enc(room))
}

/// The events of a room's timeline from its start, oldest first.
async fn history(api: &Api, room: &str) -> Vec<Value> {
    let page = api.ok(M::GET, &room_path(room, "/messages?dir=f&limit=1000"), None).await;
    page["chunk"].as_array().unwrap().clone()
}

/// Alice (raw HTTP, named "Alice A") and Bob (a matrix-sdk client, and
/// his raw-HTTP view).
async fn alice_and_bob_on_matrix_sdk(server: &Server) -> (Api, matrix_sdk::Client, Api) {
    let alice = Api::register(server, "alice").await;
    alice.set_displayname("Alice A").await;
    let bob_sdk = registered(&server.url, "bob").await;
    let bob = Api::of(&bob_sdk, server);
    (alice, bob_sdk, bob)
}

/// Item 1: open registration offers only the dummy stage (Element asked every
/// newcomer for a token when a token flow was listed too); token mode only
/// the token stage. And the endpoints Element calls at start-up (item 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_offers_only_what_a_newcomer_can_complete_and_start_up_endpoints_answer() {
    let open = Server::start();
    let challenge = |url: String| async move { post_public(&url, "/register", json!({"username": "newbie", "password": "pw"})).await };
    let (status, body) = challenge(open.url.clone()).await;
    assert_eq!(status, 401);
    assert_eq!(body["flows"], json!([{"stages": ["m.login.dummy"]}]));
    // A real client completes the one flow offered.
    let sdk = registered(&open.url, "newbie").await;
    assert_eq!(sdk.user_id().unwrap().as_str(), "@newbie:localhost");

    let token_mode = Server::start_with_config("[registration]\nmode = \"token\"\n");
    let (_, body) = challenge(token_mode.url.clone()).await;
    assert_eq!(body["flows"], json!([{"stages": ["m.login.registration_token"]}]));
    let validity = |url: &str, token: &str| {
        http().get(format!(
            "{url}/_matrix/client/v1/register/m.login.registration_token/validity?token={token}"
        ))
    };
    let v: Value = validity(&token_mode.url, "nope").send().await.unwrap().json().await.unwrap();
    assert_eq!(v["valid"], false);
    let token = token_mode.admin(&["create-registration-token"]);
    let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
    let v: Value = validity(&token_mode.url, &token).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["valid"], true);

    // Item 3: what Element asks for at start-up answers instead of 404.
    let me = Api::of(&sdk, &open);
    assert_eq!(me.ok(M::GET, "/account/3pid", None).await, json!({"threepids": []}));
    assert_eq!(me.ok(M::GET, "/thirdparty/protocols", None).await, json!({}));
    assert_eq!(
        me.ok(M::GET, "/voip/turnServer", None).await,
        json!({}),
        "no TURN server configured"
    );
}

/// Item 3: with a TURN server configured, time-limited credentials for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_credentials_come_from_the_configured_shared_secret() {
    let server = Server::start_with_config(
        "[voip]\nturn_uris = [\"turn:turn.example.org:3478?transport=udp\"]\nturn_shared_secret = \"s3cret\"\nturn_user_lifetime_ms = 3600000\n",
    );
    let alice = Api::register(&server, "alice").await;
    let turn = alice.ok(M::GET, "/voip/turnServer", None).await;
    assert_eq!(turn["uris"], json!(["turn:turn.example.org:3478?transport=udp"]));
    assert_eq!(turn["ttl"], 3600);
    let (expiry, user) = turn["username"].as_str().unwrap().split_once(':').unwrap();
    assert_eq!(user, "@alice:localhost");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!((now + 3590..=now + 3610).contains(&expiry), "expires in an hour: {expiry} vs {now}");
    assert_eq!(turn["password"].as_str().unwrap().len(), 28, "base64 of an HMAC-SHA1");
}

/// Item 2: an invite shows who invited; membership events say what they
/// replaced; events say the reader's membership at them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_names_its_inviter_and_events_carry_what_clients_word_history_with() {
    let server = Server::start();
    let (alice, bob_sdk, bob) = alice_and_bob_on_matrix_sdk(&server).await;
    let room = alice.create_room(json!({"invite": [bob.user_id]})).await;
    let before_invite = alice.say(&room, "early", "said before bob was invited").await;

    bob_sdk.sync_once(settings()).await.unwrap();
    let room_id = OwnedRoomId::try_from(room.as_str()).unwrap();
    let invited = bob_sdk.get_room(&room_id).expect("the invite is known");
    let invite = invited.invite_details().await.unwrap();
    assert_eq!(invite.inviter_id.as_str(), "@alice:localhost");
    let inviter = invite.inviter.expect("the inviter's member event came with the invite");
    assert_eq!(inviter.display_name(), Some("Alice A"));

    bob_sdk.join_room_by_id(&room_id).await.unwrap();
    let nick = alice
        .ok(
            M::PUT,
            &room_path(&room, "/state/m.room.member/@alice:localhost"),
            Some(json!({"membership": "join", "displayname": "Al"})),
        )
        .await;
    let events = history(&bob, &room).await;
    let by_id = |id: &str| events.iter().find(|e| e["event_id"] == id).cloned().unwrap();
    let renamed = by_id(nick["event_id"].as_str().unwrap());
    assert_eq!(renamed["unsigned"]["prev_content"]["displayname"], "Alice A");
    assert_eq!(renamed["unsigned"]["prev_sender"], "@alice:localhost");
    assert!(renamed["unsigned"]["replaces_state"].as_str().unwrap().starts_with('$'));
    assert_eq!(renamed["unsigned"]["membership"], "join", "bob was in the room then");
    let bobs_join = events
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == bob.user_id && e["content"]["membership"] == "join")
        .unwrap();
    assert_eq!(bobs_join["unsigned"]["prev_content"]["membership"], "invite");
    assert_eq!(bobs_join["unsigned"]["membership"], "join");
    assert_eq!(
        by_id(&before_invite)["unsigned"]["membership"],
        "invite",
        "bob was invited (shared history shows him what came before his join)"
    );
    let create = events.iter().find(|e| e["type"] == "m.room.create").unwrap();
    assert_eq!(create["unsigned"]["membership"], "leave", "before bob had any membership");
}

/// Item 4: each initial state event once (`initial_state` overriding the
/// preset's), a trusted private chat's invitees as powerful as the creator,
/// and identical requests in the same millisecond each getting a room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_room_writes_each_piece_of_state_once_and_twin_requests_each_get_a_room() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice
        .create_room(json!({
            "preset": "private_chat",
            "initial_state": [
                {"type": "m.room.guest_access", "state_key": "", "content": {"guest_access": "forbidden"}},
                {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
            ]
        }))
        .await;
    let events = history(&alice, &room).await;
    let guest: Vec<&Value> = events.iter().filter(|e| e["type"] == "m.room.guest_access").collect();
    assert_eq!(guest.len(), 1, "one guest_access event: {guest:?}");
    assert_eq!(
        guest[0]["content"]["guest_access"], "forbidden",
        "initial_state wins over the preset"
    );
    let mut kinds: Vec<(&str, &str)> = events
        .iter()
        .filter_map(|e| Some((e["type"].as_str()?, e["state_key"].as_str()?)))
        .collect();
    let all = kinds.len();
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds.len(), all, "no piece of state is written twice");

    for version in ["11", "12"] {
        let trusted = alice
            .create_room(json!({"preset": "trusted_private_chat", "invite": [bob.user_id], "room_version": version}))
            .await;
        let power = alice.ok(M::GET, &room_path(&trusted, "/state/m.room.power_levels/"), None).await;
        assert_eq!(power["users"][&bob.user_id], 100, "v{version}: {power}");
    }

    // Twenty identical requests at once: room version 12 names a room by
    // its create event, so these must not collide.
    let requests = (0..20).map(|_| {
        let (url, token) = (alice.url.clone(), alice.token.clone());
        tokio::spawn(async move {
            let r = http()
                .post(format!("{url}/_matrix/client/v3/createRoom"))
                .bearer_auth(token)
                .json(&json!({"preset": "private_chat"}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    });
    let mut ids = vec![];
    for r in futures::future::join_all(requests).await {
        let (status, body) = r.unwrap();
        assert_eq!(status, 200, "{body}");
        ids.push(body["room_id"].as_str().unwrap().to_owned());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20, "twenty rooms");
}

/// Item 5: a room without a name is named by its heroes, with the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nameless_room_is_named_by_its_heroes() {
    let server = Server::start();
    let (alice, bob_sdk, bob) = alice_and_bob_on_matrix_sdk(&server).await;
    let carol = Api::register(&server, "carol").await;
    let dm = alice
        .create_room(json!({"invite": [bob.user_id, carol.user_id], "is_direct": true}))
        .await;
    bob.join(&dm).await;

    let sync = bob.sync("", None).await;
    let summary = &sync["rooms"]["join"][&dm]["summary"];
    assert_eq!(summary["m.heroes"], json!(["@alice:localhost", "@carol:localhost"]));
    assert_eq!(
        (
            summary["m.joined_member_count"].as_u64(),
            summary["m.invited_member_count"].as_u64()
        ),
        (Some(2), Some(1))
    );

    bob_sdk.sync_once(settings()).await.unwrap();
    let room = bob_sdk.get_room(&OwnedRoomId::try_from(dm.as_str()).unwrap()).unwrap();
    let name = room.display_name().await.unwrap().to_string();
    assert!(name.contains("Alice A"), "the client names the room after alice: {name}");

    let named = alice.create_room(json!({"name": "Lobby", "invite": [bob.user_id]})).await;
    bob.join(&named).await;
    let sync = bob.sync("", None).await;
    let summary = &sync["rooms"]["join"][&named]["summary"];
    assert!(summary.get("m.heroes").is_none(), "a named room needs no heroes: {summary}");
    assert_eq!(summary["m.joined_member_count"], 2);
}

/// Item 6: optional fields are left out, never null; `/devices` says where
/// and when each device was last seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_fields_are_left_out_never_null() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice.create_room(json!({"visibility": "public", "preset": "public_chat"})).await;
    bob.join(&room).await;
    let keys = json!({"device_keys": {
        "user_id": bob.user_id, "device_id": bob.device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
        "keys": {format!("curve25519:{}", bob.device_id): "c", format!("ed25519:{}", bob.device_id): "e"},
        "signatures": {}
    }});
    bob.ok(M::POST, "/keys/upload", Some(keys)).await;

    let answers = [
        ("publicRooms", alice.ok(M::GET, "/publicRooms", None).await),
        (
            "user directory",
            alice
                .ok(M::POST, "/user_directory/search", Some(json!({"search_term": "bob"})))
                .await,
        ),
        ("devices", bob.ok(M::GET, "/devices", None).await),
        ("joined_members", alice.ok(M::GET, &room_path(&room, "/joined_members"), None).await),
        (
            "keys/query",
            alice
                .ok(M::POST, "/keys/query", Some(json!({"device_keys": {bob.user_id.clone(): []}})))
                .await,
        ),
    ];
    for (what, answer) in &answers {
        assert_eq!(first_null(answer), None, "{what}: {answer}");
    }
    assert_eq!(answers[0].1["chunk"][0]["room_id"], room.as_str());
    assert_eq!(answers[1].1["results"][0]["user_id"], "@bob:localhost");
    let device = &answers[2].1["devices"][0];
    assert_eq!(device["last_seen_ip"], "127.0.0.1", "{device}");
    assert!(device["last_seen_ts"].as_u64().unwrap() > 1_600_000_000_000, "{device}");
    assert!(device.get("display_name").is_none(), "no name: left out");
}

/// Item 7: the errors the spec gives, where strict clients look for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_the_status_and_errcode_the_spec_gives() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let eve = Api::register(&server, "eve").await;
    let room = alice.create_room(json!({})).await;
    let other = alice.create_room(json!({})).await;
    let event = alice.say(&room, "t1", "hello").await;

    let alias = format!("/directory/room/{}", enc("#taken:localhost"));
    alice.ok(M::PUT, &alias, Some(json!({"room_id": room}))).await;
    let (s, v) = alice.req(M::PUT, &alias, Some(json!({"room_id": other}))).await;
    assert_eq!((s, errcode(&v)), (409, "M_UNKNOWN"), "a taken alias");

    let (s, v) = alice
        .req(M::PUT, &room_path(&other, &format!("/redact/{}/r1", enc(&event))), Some(json!({})))
        .await;
    assert_eq!((s, errcode(&v)), (400, "M_INVALID_PARAM"), "redacting another room's event: {v}");

    let (s, v) = eve.req(M::GET, &room_path(&room, &format!("/context/{}", enc(&event))), None).await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"), "context of a room eve is not in");

    for path in [
        room_path(&room, "/members?not_membership=lurking"),
        room_path(&room, "/members?membership=everyone"),
        room_path(&room, "/messages?dir=sideways"),
        room_path(&room, &format!("/relations/{}?dir=up", enc(&event))),
        "/sync?set_presence=dancing".to_owned(),
    ] {
        let (s, v) = alice.req(M::GET, &path, None).await;
        assert_eq!((s, errcode(&v)), (400, "M_INVALID_PARAM"), "{path}: {v}");
    }

    let whoami = http()
        .get(format!("{}/_matrix/client/v3/account/whoami", server.url))
        .header("authorization", format!("bearer {}", alice.token))
        .send()
        .await
        .unwrap();
    assert_eq!(whoami.status(), 200, "the scheme is case-insensitive");

    let (s, v) = alice
        .req(
            M::POST,
            "/room_keys/version",
            Some(json!({"algorithm": "m.no.such.algorithm", "auth_data": {}})),
        )
        .await;
    assert_eq!((s, errcode(&v)), (400, "M_INVALID_PARAM"), "{v}");

    for path in ["/_matrix/client/v1/media/config", "/_matrix/media/v3/config"] {
        let r = http().get(format!("{}{path}", server.url)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} needs a token");
        assert_eq!(alice.req_at(M::GET, path, None).await.0, 200, "{path}");
    }
}

/// Item 8: the timeline limit counts what the filter lets through, and state
/// changes the filter hides from the timeline still arrive as state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_filters_count_after_filtering_and_never_lose_state() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await;
    let since = bob.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let noise = |n: usize| {
        let alice = &alice;
        let room = room.clone();
        async move {
            for i in 0..n {
                alice
                    .ok(
                        M::PUT,
                        &room_path(&room, &format!("/send/org.example.noise/n{n}-{i}")),
                        Some(json!({})),
                    )
                    .await;
            }
        }
    };
    alice.say(&room, "m1", "first").await;
    noise(15).await;
    alice.say(&room, "m2", "second").await;
    alice
        .ok(M::PUT, &room_path(&room, "/state/m.room.topic/"), Some(json!({"topic": "news"})))
        .await;
    noise(15).await;

    let messages_only = json!({"room": {"timeline": {"limit": 2, "types": ["m.room.message"]}}});
    let sync = bob.sync(&since, Some(messages_only.clone())).await;
    let joined = &sync["rooms"]["join"][&room];
    let bodies: Vec<&str> = joined["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["first", "second"], "the limit counts messages, not the noise between them");
    let state = joined["state"]["events"].as_array().unwrap();
    assert!(
        state.iter().any(|e| e["type"] == "m.room.topic" && e["content"]["topic"] == "news"),
        "the topic change the filter hid from the timeline is in state: {state:?}"
    );
    let initial = bob.sync("", Some(messages_only)).await;
    assert_eq!(initial["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap().len(), 2);

    let nothing = json!({"room": {"timeline": {"types": []}}});
    let sync = bob.sync(&since, Some(nothing)).await;
    let joined = &sync["rooms"]["join"][&room];
    assert!(joined["timeline"]["events"].as_array().unwrap().is_empty());
    assert!(
        joined["state"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.topic"),
        "types: [] loses no state: {joined}"
    );

    // Lazy-loaded members across a gap: the senders' member events come
    // with a limited timeline, and no one else's.
    let carol = Api::register(&server, "carol").await;
    let dave = Api::register(&server, "dave").await;
    carol.join(&room).await;
    dave.join(&room).await;
    let mid = bob.sync(&since, None).await["next_batch"].as_str().unwrap().to_owned();
    for i in 0..30 {
        carol.say(&room, &format!("c{i}"), "from carol").await;
    }
    let lazy = json!({"room": {"timeline": {"limit": 3}, "state": {"lazy_load_members": true}}});
    let sync = bob.sync(&mid, Some(lazy.clone())).await;
    let joined = &sync["rooms"]["join"][&room];
    assert_eq!(joined["timeline"]["limited"], true);
    let members: Vec<&str> = joined["state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["@carol:localhost"], "only the timeline's sender");

    // /context with lazy loading: members of the events shown (and the
    // requester), no one else.
    let shown = history(&bob, &room).await;
    let carols = shown.iter().rev().find(|e| e["sender"] == "@carol:localhost").unwrap();
    let filter = enc(&json!({"lazy_load_members": true}).to_string());
    let context = bob
        .ok(
            M::GET,
            &room_path(
                &room,
                &format!("/context/{}?limit=2&filter={filter}", enc(carols["event_id"].as_str().unwrap())),
            ),
            None,
        )
        .await;
    let mut members: Vec<&str> = context["state"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    members.sort();
    assert_eq!(members, ["@bob:localhost", "@carol:localhost"], "{context}");
    assert!(context["state"].as_array().unwrap().iter().any(|e| e["type"] == "m.room.create"));
    // /messages with lazy loading names the chunk's senders in `state`.
    let page = bob
        .ok(M::GET, &room_path(&room, &format!("/messages?dir=b&limit=2&filter={filter}")), None)
        .await;
    let members: Vec<&str> = page["state"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    assert_eq!(members, ["@carol:localhost"], "{page}");
}

/// Item 9: a member changing their own member event (a room nickname) gets
/// a new event; nobody else may change it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_member_event_changes_and_nobody_else_may() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await;
    let member = room_path(&room, "/state/m.room.member/@alice:localhost");
    let before = alice.ok(M::GET, &format!("{member}?format=event"), None).await;
    let changed = alice
        .ok(M::PUT, &member, Some(json!({"membership": "join", "displayname": "Room Nick"})))
        .await;
    assert_ne!(changed["event_id"], before["event_id"], "a new event");
    let now = alice.ok(M::GET, &member, None).await;
    assert_eq!(now["displayname"], "Room Nick");

    let (s, v) = bob
        .req(M::PUT, &member, Some(json!({"membership": "join", "displayname": "hacked"})))
        .await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"), "{v}");
    assert_eq!(alice.ok(M::GET, &member, None).await["displayname"], "Room Nick");
}

/// Item 10: a profile change is one member event in each room, not a reason
/// to send a room's whole state again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_change_does_not_resend_the_room() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice.create_room(json!({"preset": "public_chat", "name": "Lobby"})).await;
    bob.join(&room).await;
    let alice_since = alice.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let bob_since = bob.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    alice.set_displayname("Alice Renamed").await;
    for (who, since) in [(&alice, alice_since), (&bob, bob_since)] {
        let sync = who.sync(&since, None).await;
        let joined = &sync["rooms"]["join"][&room];
        let state = joined["state"]["events"].as_array().unwrap();
        assert!(
            !state.iter().any(|e| e["type"] == "m.room.create" || e["type"] == "m.room.name"),
            "{}: the room's state is not sent again: {state:?}",
            who.user_id
        );
        let timeline = joined["timeline"]["events"].as_array().unwrap();
        assert_eq!(
            timeline.len(),
            1,
            "{}: only what happened since, not the room's history: {timeline:?}",
            who.user_id
        );
        assert_eq!(timeline[0]["type"], "m.room.member");
        assert_eq!(timeline[0]["content"]["displayname"], "Alice Renamed");
    }
}

/// Item 11: a kick removes someone present; it cannot undo a ban or touch an outsider.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kick_of_a_banned_or_absent_user_is_refused() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let carol = Api::register(&server, "carol").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await;
    alice
        .ok(M::POST, &room_path(&room, "/ban"), Some(json!({"user_id": bob.user_id})))
        .await;
    for target in [&bob.user_id, &carol.user_id] {
        let (s, v) = alice
            .req(M::POST, &room_path(&room, "/kick"), Some(json!({"user_id": target})))
            .await;
        assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"), "kick {target}: {v}");
    }
    let member = alice
        .ok(M::GET, &room_path(&room, "/state/m.room.member/@bob:localhost"), None)
        .await;
    assert_eq!(member["membership"], "ban", "the ban stays");
}

/// Item 12: a former member reads the room as it was when they left:
/// its state, members and history up to there, never what came since.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn former_members_read_up_to_where_they_left_and_no_further() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice
        .create_room(json!({"preset": "public_chat", "topic": "before", "name": "Club"}))
        .await;
    bob.join(&room).await;
    let while_there = alice.say(&room, "m1", "while bob is here").await;
    bob.ok(M::POST, &room_path(&room, "/leave"), Some(json!({}))).await;
    alice
        .ok(M::PUT, &room_path(&room, "/state/m.room.topic/"), Some(json!({"topic": "after"})))
        .await;
    alice
        .ok(
            M::PUT,
            &room_path(&room, "/state/m.room.join_rules/"),
            Some(json!({"join_rule": "invite"})),
        )
        .await;
    let carol = Api::register(&server, "carol").await;
    alice
        .ok(M::POST, &room_path(&room, "/invite"), Some(json!({"user_id": carol.user_id})))
        .await;
    let after = alice.say(&room, "m2", "after bob left").await;

    let state = bob.ok(M::GET, &room_path(&room, "/state"), None).await;
    let topic = state.as_array().unwrap().iter().find(|e| e["type"] == "m.room.topic").unwrap();
    assert_eq!(topic["content"]["topic"], "before", "the state as bob left it");
    assert_eq!(
        bob.ok(M::GET, &room_path(&room, "/state/m.room.topic/"), None).await["topic"],
        "before"
    );
    let members = bob.ok(M::GET, &room_path(&room, "/members"), None).await;
    let members: Vec<(&str, &str)> = members["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["state_key"].as_str().unwrap(), e["content"]["membership"].as_str().unwrap()))
        .collect();
    assert_eq!(members.len(), 2, "carol was invited after bob left: {members:?}");
    assert!(members.contains(&("@bob:localhost", "leave")));

    let history = history(&bob, &room).await;
    let ids: Vec<&str> = history.iter().map(|e| e["event_id"].as_str().unwrap()).collect();
    assert!(ids.contains(&while_there.as_str()));
    assert!(!ids.contains(&after.as_str()), "nothing from after bob left");
    assert_eq!(history.last().unwrap()["content"]["membership"], "leave", "his leave ends it");

    let context = bob
        .ok(M::GET, &room_path(&room, &format!("/context/{}?limit=20", enc(&while_there))), None)
        .await;
    assert!(
        context["events_after"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["event_id"] != after.as_str()),
        "{context}"
    );
    let topic = context["state"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.topic")
        .unwrap();
    assert_eq!(topic["content"]["topic"], "before", "no state from after he left");
    assert!(
        !context["state"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["state_key"] == "@carol:localhost"),
        "{context}"
    );

    // Someone who never joined reads nothing.
    let (s, v) = carol.req(M::GET, &room_path(&room, "/state"), None).await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"));
}

fn changed_users(sync: &Value) -> Vec<String> {
    sync["device_lists"]["changed"]
        .as_array()
        .map(|a| a.iter().map(|u| u.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// Item 13: a new login, a renamed device and a deleted one (keys or not)
/// change the user's device list for those who share a room, and for the
/// user's own other devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_lists_change_on_login_rename_and_delete_for_others_and_oneself() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await;
    let mut alice_since = alice.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let mut bob_since = bob.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let mut expect_change = async |what: &str| {
        let a = alice.sync(&alice_since, None).await;
        let b = bob.sync(&bob_since, None).await;
        assert!(changed_users(&a).contains(&bob.user_id), "{what}: alice is told: {a}");
        assert!(changed_users(&b).contains(&bob.user_id), "{what}: bob's own device is told: {b}");
        alice_since = a["next_batch"].as_str().unwrap().to_owned();
        bob_since = b["next_batch"].as_str().unwrap().to_owned();
    };

    let (_, login) = post_public(
        &server.url,
        "/login",
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bob"}, "password": "pw", "device_id": "LAPTOP"}),
    )
    .await;
    assert_eq!(login["device_id"], "LAPTOP");
    expect_change("a new login").await;
    bob.ok(M::PUT, "/devices/LAPTOP", Some(json!({"display_name": "Bob's laptop"})))
        .await;
    expect_change("a rename").await;
    let (s, challenge) = bob.req(M::POST, "/delete_devices", Some(json!({"devices": ["LAPTOP"]}))).await;
    assert_eq!(s, 401);
    bob.ok(
        M::POST,
        "/delete_devices",
        Some(json!({"devices": ["LAPTOP"], "auth": {"type": "m.login.password", "session": challenge["session"], "identifier": {"type": "m.id.user", "user": "bob"}, "password": "pw"}})),
    )
    .await;
    expect_change("a deletion (the device had no keys)").await;
}

/// Item 14: invites from ignored users are not delivered; `shared` history
/// shows a joiner what was sent while it was shared (and only that); members
/// met for the first time come with their presence; a status message is for
/// those who share a room only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_invites_shared_history_and_presence_go_where_they_should() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let spammer = Api::register(&server, "spammer").await;
    alice
        .ok(
            M::PUT,
            "/user/@alice:localhost/account_data/m.ignored_user_list",
            Some(json!({"ignored_users": {"@spammer:localhost": {}}})),
        )
        .await;
    let since = alice.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let spam = spammer.create_room(json!({"invite": [alice.user_id]})).await;
    let friendly = bob.create_room(json!({"invite": [alice.user_id]})).await;
    let sync = alice.sync(&since, None).await;
    let invites = sync["rooms"]["invite"].as_object().unwrap();
    assert!(invites.contains_key(&friendly), "{sync}");
    assert!(!invites.contains_key(&spam), "an ignored user's invite is not delivered");
    assert!(
        alice.sync("", None).await["rooms"]["invite"].get(&spam).is_none(),
        "not in an initial sync either"
    );

    // Shared, then joined-only history: a later joiner sees the first era only.
    let room = bob.create_room(json!({"preset": "public_chat"})).await;
    let shared = bob.say(&room, "s1", "said while shared").await;
    bob.ok(
        M::PUT,
        &room_path(&room, "/state/m.room.history_visibility/"),
        Some(json!({"history_visibility": "joined"})),
    )
    .await;
    let hidden = bob.say(&room, "j1", "said while joined-only").await;
    bob.ok(
        M::PUT,
        "/presence/@bob:localhost/status",
        Some(json!({"presence": "online", "status_msg": "on holiday"})),
    )
    .await;
    let alice_since = alice.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let bob_since = bob.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let (s, v) = alice.req(M::GET, "/presence/@bob:localhost/status", None).await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"), "a stranger's status is not for alice");
    alice.join(&room).await;
    let seen: Vec<String> = history(&alice, &room)
        .await
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    assert!(seen.contains(&shared), "what was said while history was shared");
    assert!(!seen.contains(&hidden), "not what was said while it was joined-only");
    let status = alice.ok(M::GET, "/presence/@bob:localhost/status", None).await;
    assert_eq!(status["status_msg"], "on holiday", "now they share a room");

    // Each sees the other's presence, though neither changed it since.
    let a = alice.sync(&alice_since, None).await;
    let b = bob.sync(&bob_since, None).await;
    let senders = |v: &Value| -> Vec<String> {
        v["presence"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["sender"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(senders(&a).contains(&bob.user_id), "alice meets bob: {a}");
    assert!(senders(&b).contains(&alice.user_id), "bob meets alice: {b}");
}

/// Item 15: `end` is left out exactly when no further events are available,
/// at both edges of the room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_end_is_left_out_exactly_at_the_edges() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let room = alice.create_room(json!({})).await;
    for i in 0..5 {
        alice.say(&room, &format!("m{i}"), &format!("{i}")).await;
    }
    let total = history(&alice, &room).await.len();
    let back = alice
        .ok(M::GET, &room_path(&room, &format!("/messages?dir=b&limit={total}")), None)
        .await;
    assert_eq!(back["chunk"].as_array().unwrap().len(), total);
    assert!(back.get("end").is_none(), "the whole room fits: nothing further back: {back}");
    let part = alice
        .ok(M::GET, &room_path(&room, &format!("/messages?dir=b&limit={}", total - 1)), None)
        .await;
    let end = part["end"].as_str().expect("one event is left");
    let rest = alice
        .ok(M::GET, &room_path(&room, &format!("/messages?dir=b&limit=10&from={end}")), None)
        .await;
    assert_eq!(rest["chunk"].as_array().unwrap().len(), 1);
    assert!(rest.get("end").is_none());

    let forward = alice
        .ok(M::GET, &room_path(&room, &format!("/messages?dir=f&limit={total}")), None)
        .await;
    assert_eq!(forward["chunk"].as_array().unwrap().len(), total);
    assert!(forward.get("end").is_none(), "the live edge: nothing further: {forward}");
    let at_edge = alice
        .ok(M::GET, &room_path(&room, "/messages?dir=f&limit=5&from=t999999"), None)
        .await;
    assert!(at_edge["chunk"].as_array().unwrap().is_empty());
    assert!(at_edge.get("end").is_none());
}

/// Item 16: a rule's `actions` and `enabled` can be read; ids and kinds are
/// checked as the spec says; what the user's own rules highlight counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_rules_are_readable_checked_and_count_toward_highlights() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let enabled = bob.ok(M::GET, "/pushrules/global/override/.m.rule.master/enabled", None).await;
    assert_eq!(enabled, json!({"enabled": false}));
    let actions = bob.ok(M::GET, "/pushrules/global/underride/.m.rule.message/actions", None).await;
    assert_eq!(actions["actions"], json!(["notify"]));
    for (path, body) in [
        ("/pushrules/global/content/.mine", json!({"pattern": "x", "actions": []})),
        ("/pushrules/global/content/a%2Fb", json!({"pattern": "x", "actions": []})),
        ("/pushrules/global/room/not-a-room", json!({"actions": []})),
        ("/pushrules/global/sender/not-a-user", json!({"actions": []})),
        ("/pushrules/global/sideways/x", json!({"actions": []})),
        ("/pushrules/device/content/x", json!({"pattern": "x", "actions": []})),
    ] {
        let (s, v) = bob.req(M::PUT, path, Some(body)).await;
        assert_eq!((s, errcode(&v)), (400, "M_INVALID_PARAM"), "{path}: {v}");
    }
    let (s, v) = bob
        .req(
            M::PUT,
            "/pushrules/global/content/x?before=nonexistent",
            Some(json!({"pattern": "x", "actions": []})),
        )
        .await;
    assert_eq!((s, errcode(&v)), (404, "M_NOT_FOUND"), "{v}");
    bob.ok(
        M::PUT,
        "/pushrules/global/content/deploys",
        Some(json!({"pattern": "deploy", "actions": ["notify", {"set_tweak": "highlight"}]})),
    )
    .await;

    let room = alice.create_room(json!({"invite": [bob.user_id]})).await;
    bob.join(&room).await;
    alice.say(&room, "m1", "lunch?").await;
    alice.say(&room, "m2", "the deploy is done").await;
    alice
        .ok(
            M::PUT,
            &room_path(&room, "/send/m.room.message/m3"),
            Some(json!({"msgtype": "m.text", "body": "bob, look", "m.mentions": {"user_ids": ["@bob:localhost"]}})),
        )
        .await;
    let sync = bob.sync("", None).await;
    let counts = &sync["rooms"]["join"][&room]["unread_notifications"];
    assert_eq!(counts["notification_count"], 3, "{counts}");
    assert_eq!(counts["highlight_count"], 2, "a keyword of bob's and a mention: {counts}");
}

/// Item 17: a transaction id is scoped to the device and the request path:
/// the same id in another room, for another event type or on /redact is a
/// new request, never silently answered with the first event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_ids_are_scoped_to_the_request_path() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let one = alice.create_room(json!({})).await;
    let two = alice.create_room(json!({})).await;
    let first = alice.say(&one, "same", "in room one").await;
    assert_eq!(alice.say(&one, "same", "a retry").await, first, "a retry is the same request");
    let second = alice.say(&two, "same", "in room two").await;
    assert_ne!(second, first);
    let reaction = alice
        .ok(
            M::PUT,
            &room_path(&one, "/send/m.reaction/same"),
            Some(json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": first, "key": "👍"}})),
        )
        .await;
    assert_ne!(reaction["event_id"], first.as_str());
    let redaction = alice
        .ok(M::PUT, &room_path(&one, &format!("/redact/{}/same", enc(&first))), Some(json!({})))
        .await;
    assert_ne!(redaction["event_id"], first.as_str());
    let redacted = alice.ok(M::GET, &room_path(&one, &format!("/event/{}", enc(&first))), None).await;
    assert_eq!(redacted["content"], json!({}), "the redaction happened: {redacted}");
    let bodies: Vec<Value> = history(&alice, &two).await.iter().map(|e| e["content"]["body"].clone()).collect();
    assert!(bodies.contains(&json!("in room two")), "room two got its message");
}

/// Item 18: a user-interactive auth session completes only the request it
/// was started for; `inhibit_login` gives no session; authenticating as
/// someone else is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uia_sessions_are_bound_to_their_request() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    for device in ["A", "B"] {
        let login = json!({"type": "m.login.password", "user": "alice", "password": "pw", "device_id": device});
        assert_eq!(post_public(&server.url, "/login", login).await.0, 200);
    }
    let (s, challenge) = alice.req(M::DELETE, "/devices/A", Some(json!({}))).await;
    assert_eq!(s, 401);
    let password = |session: &Value, user: &str| json!({"type": "m.login.password", "session": session, "identifier": {"type": "m.id.user", "user": user}, "password": "pw"});
    let (s, v) = alice
        .req(
            M::DELETE,
            "/devices/B",
            Some(json!({"auth": password(&challenge["session"], "alice")})),
        )
        .await;
    assert_eq!(
        (s, errcode(&v)),
        (403, "M_FORBIDDEN"),
        "a session for deleting A cannot delete B: {v}"
    );
    let devices = alice.ok(M::GET, "/devices", None).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 3, "nothing was deleted");

    let (_, challenge) = alice.req(M::DELETE, "/devices/A", Some(json!({}))).await;
    let (s, v) = alice
        .req(
            M::DELETE,
            "/devices/A",
            Some(json!({"auth": password(&challenge["session"], "bob")})),
        )
        .await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"), "authenticating as another user: {v}");
    let (_, challenge) = alice.req(M::DELETE, "/devices/A", Some(json!({}))).await;
    alice
        .ok(
            M::DELETE,
            "/devices/A",
            Some(json!({"auth": password(&challenge["session"], "alice")})),
        )
        .await;

    let (_, r) = post_public(
        &server.url,
        "/register",
        json!({"username": "quiet", "password": "pw", "inhibit_login": true, "auth": {"type": "m.login.dummy"}}),
    )
    .await;
    assert_eq!(r["user_id"], "@quiet:localhost");
    assert!(r.get("access_token").is_none() && r.get("device_id").is_none(), "{r}");
}
