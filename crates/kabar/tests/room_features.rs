//! Room versions, aliases and the directory, membership changes, context and
//! members, filters, account data, tags, push rules, thumbnails.

mod common;

use common::{Api, Server, enc, http};
use serde_json::{Value, json};

use reqwest::Method as M;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_supported_room_version_runs_the_same_chat() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    for version in ["10", "11", "12"] {
        let room = alice
            .ok(
                M::POST,
                "/createRoom",
                Some(json!({"room_version": version, "preset": "public_chat", "name": format!("v{version}")})),
            )
            .await;
        let room = room["room_id"].as_str().unwrap().to_owned();
        let create = alice.ok(M::GET, &format!("/rooms/{}/state/m.room.create/", enc(&room)), None).await;
        assert_eq!(create["room_version"], version);
        bob.ok(M::POST, &format!("/join/{}", enc(&room)), Some(json!({}))).await;
        bob.ok(
            M::PUT,
            &format!("/rooms/{}/send/m.room.message/v{version}", enc(&room)),
            Some(json!({"msgtype": "m.text", "body": "hi"})),
        )
        .await;
        // Bob may not change the name (state_default 50) in any version.
        let (s, _) = bob
            .req(
                M::PUT,
                &format!("/rooms/{}/state/m.room.name/", enc(&room)),
                Some(json!({"name": "x"})),
            )
            .await;
        assert_eq!(s, 403, "v{version}");
        let joined = alice.ok(M::GET, &format!("/rooms/{}/joined_members", enc(&room)), None).await;
        assert_eq!(joined["joined"].as_object().unwrap().len(), 2, "v{version}");
    }
    let caps = alice.ok(M::GET, "/capabilities", None).await;
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "12");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_directory_and_membership_changes() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice
        .ok(
            M::POST,
            "/createRoom",
            Some(json!({"room_alias_name": "lobby", "visibility": "public", "preset": "public_chat", "topic": "welcome"})),
        )
        .await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    let (s, v) = alice.req(M::POST, "/createRoom", Some(json!({"room_alias_name": "lobby"}))).await;
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_ROOM_IN_USE")));

    let resolved = bob.ok(M::GET, &format!("/directory/room/{}", enc("#lobby:localhost")), None).await;
    assert_eq!(resolved["room_id"], room.as_str());
    let public = bob.ok(M::GET, "/publicRooms", None).await;
    assert_eq!(public["chunk"][0]["room_id"], room.as_str());
    assert_eq!(public["chunk"][0]["topic"], "welcome");
    let searched = bob
        .ok(
            M::POST,
            "/publicRooms",
            Some(json!({"filter": {"generic_search_term": "nothing like it"}})),
        )
        .await;
    assert!(searched["chunk"].as_array().unwrap().is_empty());

    // Join by alias, leave, forget; rejoin; kicked; banned; unbanned.
    bob.ok(M::POST, &format!("/join/{}", enc("#lobby:localhost")), Some(json!({})))
        .await;
    let rooms = bob.ok(M::GET, "/joined_rooms", None).await;
    assert_eq!(rooms["joined_rooms"], json!([room]));
    bob.ok(M::POST, &format!("/rooms/{}/leave", enc(&room)), Some(json!({}))).await;
    bob.ok(M::POST, &format!("/rooms/{}/forget", enc(&room)), Some(json!({}))).await;
    assert_eq!(bob.ok(M::GET, "/joined_rooms", None).await["joined_rooms"], json!([]));
    bob.ok(M::POST, &format!("/rooms/{}/join", enc(&room)), Some(json!({}))).await;
    alice
        .ok(
            M::POST,
            &format!("/rooms/{}/kick", enc(&room)),
            Some(json!({"user_id": bob.user_id, "reason": "test"})),
        )
        .await;
    let member = alice
        .ok(
            M::GET,
            &format!("/rooms/{}/state/m.room.member/{}", enc(&room), enc(&bob.user_id)),
            None,
        )
        .await;
    assert_eq!(member["membership"], "leave");
    alice
        .ok(
            M::POST,
            &format!("/rooms/{}/ban", enc(&room)),
            Some(json!({"user_id": bob.user_id})),
        )
        .await;
    let (s, _) = bob.req(M::POST, &format!("/rooms/{}/join", enc(&room)), Some(json!({}))).await;
    assert_eq!(s, 403, "a banned user cannot rejoin");
    alice
        .ok(
            M::POST,
            &format!("/rooms/{}/unban", enc(&room)),
            Some(json!({"user_id": bob.user_id})),
        )
        .await;
    bob.ok(M::POST, &format!("/rooms/{}/join", enc(&room)), Some(json!({}))).await;

    let members = alice
        .ok(M::GET, &format!("/rooms/{}/members?membership=join", enc(&room)), None)
        .await;
    assert_eq!(members["chunk"].as_array().unwrap().len(), 2);
    let aliases = alice.ok(M::GET, &format!("/rooms/{}/aliases", enc(&room)), None).await;
    assert_eq!(aliases["aliases"], json!(["#lobby:localhost"]));
    let (s, _) = bob
        .req(M::DELETE, &format!("/directory/room/{}", enc("#lobby:localhost")), None)
        .await;
    assert_eq!(s, 403, "bob did not make the alias and lacks the power");
    alice
        .ok(M::DELETE, &format!("/directory/room/{}", enc("#lobby:localhost")), None)
        .await;
    let (s, _) = bob.req(M::GET, &format!("/directory/room/{}", enc("#lobby:localhost")), None).await;
    assert_eq!(s, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_filters_account_data_tags_and_leave_in_sync() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice
        .ok(M::POST, "/createRoom", Some(json!({"invite": [bob.user_id], "is_direct": true})))
        .await;
    let room = room["room_id"].as_str().unwrap().to_owned();

    // Bob's first sync shows the invite with stripped state.
    let first = bob.ok(M::GET, "/sync", None).await;
    let invite = &first["rooms"]["invite"][&room]["invite_state"]["events"];
    assert!(
        invite
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.member" && e["content"]["is_direct"] == true)
    );
    bob.ok(M::POST, &format!("/join/{}", enc(&room)), Some(json!({}))).await;

    let mut ids = vec![];
    for i in 0..9 {
        let kind = if i % 3 == 0 { "m.custom" } else { "m.room.message" };
        let v = alice
            .ok(
                M::PUT,
                &format!("/rooms/{}/send/{kind}/c{i}", enc(&room)),
                Some(json!({"msgtype": "m.text", "body": format!("{i}")})),
            )
            .await;
        ids.push(v["event_id"].as_str().unwrap().to_owned());
    }
    let ctx = bob
        .ok(M::GET, &format!("/rooms/{}/context/{}?limit=4", enc(&room), enc(&ids[4])), None)
        .await;
    assert_eq!(ctx["event"]["event_id"], ids[4].as_str());
    assert_eq!(ctx["events_before"][0]["event_id"], ids[3].as_str(), "before runs newest first");
    assert_eq!(ctx["events_after"][0]["event_id"], ids[5].as_str());

    // A stored filter and an inline one both limit the timeline.
    let filter = bob
        .ok(
            M::POST,
            &format!("/user/{}/filter", enc(&bob.user_id)),
            Some(json!({"room": {"timeline": {"limit": 2, "types": ["m.room.message"]}}})),
        )
        .await;
    let filter_id = filter["filter_id"].as_str().unwrap();
    let stored = bob
        .ok(M::GET, &format!("/user/{}/filter/{filter_id}", enc(&bob.user_id)), None)
        .await;
    assert_eq!(stored["room"]["timeline"]["limit"], 2);
    let synced = bob.ok(M::GET, &format!("/sync?filter={filter_id}"), None).await;
    let timeline = &synced["rooms"]["join"][&room]["timeline"];
    assert_eq!(timeline["limited"], true);
    assert!(timeline["events"].as_array().unwrap().iter().all(|e| e["type"] == "m.room.message"));
    let inline = bob
        .ok(
            M::GET,
            "/sync?filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A3%7D%7D%7D",
            None,
        )
        .await;
    assert_eq!(inline["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap().len(), 3);
    let prev_batch = inline["rooms"]["join"][&room]["timeline"]["prev_batch"].as_str().unwrap();
    let older = bob
        .ok(
            M::GET,
            &format!("/rooms/{}/messages?dir=b&limit=1&from={prev_batch}", enc(&room)),
            None,
        )
        .await;
    assert_eq!(
        older["chunk"][0]["event_id"],
        ids[5].as_str(),
        "prev_batch continues right before the timeline"
    );

    // Account data and tags arrive in the next incremental sync.
    let since = inline["next_batch"].as_str().unwrap().to_owned();
    bob.ok(
        M::PUT,
        &format!("/user/{}/account_data/m.direct", enc(&bob.user_id)),
        Some(json!({ alice.user_id.clone(): [room] })),
    )
    .await;
    bob.ok(
        M::PUT,
        &format!("/user/{}/rooms/{}/tags/m.favourite", enc(&bob.user_id), enc(&room)),
        Some(json!({"order": 0.5})),
    )
    .await;
    let (s, v) = bob
        .req(
            M::PUT,
            &format!("/user/{}/account_data/m.fully_read", enc(&bob.user_id)),
            Some(json!({})),
        )
        .await;
    assert_eq!((s, v["errcode"].as_str()), (400, Some("M_BAD_JSON")));
    let next = bob.ok(M::GET, &format!("/sync?since={since}&timeout=1000"), None).await;
    assert_eq!(next["account_data"]["events"][0]["type"], "m.direct");
    let room_data = &next["rooms"]["join"][&room]["account_data"]["events"];
    assert_eq!(room_data[0]["content"]["tags"]["m.favourite"]["order"], 0.5);
    let tags = bob
        .ok(M::GET, &format!("/user/{}/rooms/{}/tags", enc(&bob.user_id), enc(&room)), None)
        .await;
    assert!(tags["tags"]["m.favourite"].is_object());

    // Unread count falls to zero after a read receipt on the newest event.
    let unread = next["rooms"]["join"][&room]["unread_notifications"]["notification_count"].as_u64();
    assert_eq!(unread, Some(6), "six messages from alice are unread");
    bob.ok(
        M::POST,
        &format!("/rooms/{}/read_markers", enc(&room)),
        Some(json!({"m.fully_read": ids[8], "m.read": ids[8]})),
    )
    .await;
    let after = bob
        .ok(M::GET, &format!("/sync?since={}", next["next_batch"].as_str().unwrap()), None)
        .await;
    assert_eq!(after["rooms"]["join"][&room]["unread_notifications"]["notification_count"], 0);

    // Leaving puts the room in the leave section.
    let since = after["next_batch"].as_str().unwrap().to_owned();
    bob.ok(M::POST, &format!("/rooms/{}/leave", enc(&room)), Some(json!({}))).await;
    let left = bob.ok(M::GET, &format!("/sync?since={since}&timeout=1000"), None).await;
    let events = left["rooms"]["leave"][&room]["timeline"]["events"].as_array().unwrap();
    assert_eq!(events.last().unwrap()["content"]["membership"], "leave");
    // full_state returns the complete state again.
    let full = alice.ok(M::GET, &format!("/sync?since={since}&full_state=true"), None).await;
    assert!(
        full["rooms"]["join"][&room]["state"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "m.room.create")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_rules_and_thumbnails() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let rules = alice.ok(M::GET, "/pushrules/", None).await;
    assert!(
        rules["global"]["override"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["rule_id"] == ".m.rule.master")
    );
    alice
        .ok(
            M::PUT,
            "/pushrules/global/content/cats",
            Some(json!({"pattern": "cat", "actions": ["notify"]})),
        )
        .await;
    let rule = alice.ok(M::GET, "/pushrules/global/content/cats", None).await;
    assert_eq!(rule["pattern"], "cat");
    alice
        .ok(M::PUT, "/pushrules/global/content/cats/enabled", Some(json!({"enabled": false})))
        .await;
    assert_eq!(alice.ok(M::GET, "/pushrules/global/content/cats", None).await["enabled"], false);
    alice.ok(M::DELETE, "/pushrules/global/content/cats", None).await;
    let (s, _) = alice.req(M::GET, "/pushrules/global/content/cats", None).await;
    assert_eq!(s, 404);

    // A 2x2 PNG, thumbnailed down to 1x1.
    const PNG: &[u8] = &[
        0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00,
        0x00, 0x02, 0x08, 0x02, 0x00, 0x00, 0x00, 0xfd, 0xd4, 0x9a, 0x73, 0x00, 0x00, 0x00, 0x10, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63,
        0xf8, 0xcf, 0xc0, 0x00, 0x44, 0x0c, 0x10, 0x0a, 0x00, 0x1f, 0xee, 0x03, 0xfd, 0x8b, 0x5f, 0x14, 0xd4, 0x00, 0x00, 0x00, 0x00, 0x49,
        0x45, 0x4e, 0x44, 0xae, 0x42, 0x60, 0x82,
    ];
    let up: Value = http()
        .post(format!("{}/_matrix/media/v3/upload?filename=dot.png", server.url))
        .bearer_auth(&alice.token)
        .header("content-type", "image/png")
        .body(PNG.to_vec())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uri = up["content_uri"].as_str().unwrap();
    let path = uri.strip_prefix("mxc://").unwrap();
    let thumb = http()
        .get(format!(
            "{}/_matrix/client/v1/media/thumbnail/{path}?width=1&height=1&method=scale",
            server.url
        ))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(thumb.status().as_u16(), 200);
    assert_eq!(thumb.headers()["content-type"], "image/png");
    let bytes = thumb.bytes().await.unwrap();
    assert_eq!(&bytes[..8], &PNG[..8], "a PNG comes back");
    let download = http()
        .get(format!("{}/_matrix/client/v1/media/download/{path}", server.url))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(download.bytes().await.unwrap().as_ref(), PNG);
    let legacy = http()
        .get(format!("{}/_matrix/media/v3/download/{path}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        legacy.status().as_u16(),
        404,
        "media uploaded since the freeze is not served unauthenticated"
    );
    let unauthed = http()
        .get(format!("{}/_matrix/client/v1/media/download/{path}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthed.status().as_u16(), 401, "authenticated media needs a token");
    let text = http()
        .post(format!("{}/_matrix/media/v3/upload", server.url))
        .bearer_auth(&alice.token)
        .header("content-type", "text/plain")
        .body("not an image")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let path = text["content_uri"].as_str().unwrap().strip_prefix("mxc://").unwrap().to_owned();
    let thumb = http()
        .get(format!("{}/_matrix/client/v1/media/thumbnail/{path}?width=8&height=8", server.url))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(thumb.status().as_u16(), 404, "not an image: no thumbnail");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_visibility_joined_hides_what_came_before() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice
        .ok(
            M::POST,
            "/createRoom",
            Some(json!({"initial_state": [{"type": "m.room.history_visibility", "content": {"history_visibility": "joined"}}]})),
        )
        .await;
    let room = room["room_id"].as_str().unwrap().to_owned();
    alice
        .ok(
            M::PUT,
            &format!("/rooms/{}/send/m.room.message/secret", enc(&room)),
            Some(json!({"msgtype": "m.text", "body": "before bob"})),
        )
        .await;
    alice
        .ok(
            M::POST,
            &format!("/rooms/{}/invite", enc(&room)),
            Some(json!({"user_id": bob.user_id})),
        )
        .await;
    bob.ok(M::POST, &format!("/rooms/{}/join", enc(&room)), Some(json!({}))).await;
    alice
        .ok(
            M::PUT,
            &format!("/rooms/{}/send/m.room.message/open", enc(&room)),
            Some(json!({"msgtype": "m.text", "body": "after bob"})),
        )
        .await;

    let bodies = |events: &Value| -> Vec<String> {
        events
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect()
    };
    let sync = bob
        .ok(
            M::GET,
            "/sync?filter=%7B%22room%22%3A%7B%22timeline%22%3A%7B%22limit%22%3A50%7D%7D%7D",
            None,
        )
        .await;
    assert_eq!(bodies(&sync["rooms"]["join"][&room]["timeline"]["events"]), vec!["after bob"]);
    let msgs = bob
        .ok(M::GET, &format!("/rooms/{}/messages?dir=b&limit=50", enc(&room)), None)
        .await;
    assert_eq!(bodies(&msgs["chunk"]), vec!["after bob"]);
    let msgs = alice
        .ok(M::GET, &format!("/rooms/{}/messages?dir=b&limit=50", enc(&room)), None)
        .await;
    assert_eq!(
        bodies(&msgs["chunk"]),
        vec!["after bob", "before bob"],
        "the sender still sees everything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_and_relation_pages() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice.ok(M::POST, "/createRoom", Some(json!({"preset": "public_chat"}))).await["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    bob.ok(M::POST, &format!("/join/{}", enc(&room)), Some(json!({}))).await;
    async fn send(api: &Api, room: &str, txn: String, content: Value) -> String {
        let path = format!("/rooms/{}/send/m.room.message/{txn}", enc(room));
        api.ok(M::PUT, &path, Some(content)).await["event_id"].as_str().unwrap().to_owned()
    }
    let root_a = send(&alice, &room, "a".into(), json!({"msgtype": "m.text", "body": "topic A"})).await;
    let root_b = send(&alice, &room, "b".into(), json!({"msgtype": "m.text", "body": "topic B"})).await;
    let mut replies = vec![];
    for i in 0..5 {
        let content = json!({"msgtype": "m.text", "body": format!("reply {i}"), "m.relates_to": {"rel_type": "m.thread", "event_id": root_a, "is_falling_back": true, "m.in_reply_to": {"event_id": root_a}}});
        replies.push(send(&bob, &room, format!("ra{i}"), content).await);
    }
    send(
        &alice,
        &room,
        "rb".into(),
        json!({"msgtype": "m.text", "body": "on B", "m.relates_to": {"rel_type": "m.thread", "event_id": root_b}}),
    )
    .await;

    // Threads list: B is the most recently active; A has five replies from Bob.
    let threads = alice.ok(M::GET, &format!("/rooms/{}/threads", enc(&room)), None).await;
    let chunk = threads["chunk"].as_array().unwrap();
    assert_eq!(
        chunk.iter().map(|t| t["event_id"].as_str().unwrap()).collect::<Vec<_>>(),
        vec![root_b.as_str(), root_a.as_str()]
    );
    let summary = &chunk[1]["unsigned"]["m.relations"]["m.thread"];
    assert_eq!(summary["count"], 5);
    assert_eq!(summary["latest_event"]["event_id"], replies[4].as_str());
    assert_eq!(summary["current_user_participated"], true, "alice wrote the root");
    let bobs = bob
        .ok(M::GET, &format!("/rooms/{}/threads?include=participated", enc(&room)), None)
        .await;
    assert_eq!(bobs["chunk"].as_array().unwrap().len(), 1, "bob only took part in A");

    // Relation pages of two, newest first, follow next_batch to the end.
    let mut seen = vec![];
    let mut from = String::new();
    loop {
        let q = if from.is_empty() { String::new() } else { format!("&from={from}") };
        let page = alice
            .ok(
                M::GET,
                &format!("/rooms/{}/relations/{}/m.thread?limit=2{q}", enc(&room), enc(&root_a)),
                None,
            )
            .await;
        seen.extend(
            page["chunk"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["event_id"].as_str().unwrap().to_owned()),
        );
        match page["next_batch"].as_str() {
            Some(n) => from = n.to_owned(),
            None => break,
        }
    }
    replies.reverse();
    assert_eq!(seen, replies);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_loaded_members_and_state_filters() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let room = alice
        .ok(M::POST, "/createRoom", Some(json!({"preset": "public_chat", "name": "big"})))
        .await["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    for name in ["carol", "dave", "erin"] {
        let u = Api::register(&server, name).await;
        u.ok(M::POST, &format!("/join/{}", enc(&room)), Some(json!({}))).await;
    }
    bob.ok(M::POST, &format!("/join/{}", enc(&room)), Some(json!({}))).await;
    alice
        .ok(
            M::PUT,
            &format!("/rooms/{}/send/m.room.message/x", enc(&room)),
            Some(json!({"msgtype": "m.text", "body": "hi"})),
        )
        .await;

    let lazy = r#"{"room":{"timeline":{"limit":1},"state":{"lazy_load_members":true}}}"#;
    let v = bob.ok(M::GET, &format!("/sync?filter={}", enc(lazy)), None).await;
    let state = v["rooms"]["join"][&room]["state"]["events"].as_array().unwrap();
    let mut members: Vec<&str> = state
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .map(|e| e["state_key"].as_str().unwrap())
        .collect();
    members.sort();
    assert_eq!(
        members,
        vec!["@alice:localhost", "@bob:localhost"],
        "only the timeline's sender and the user"
    );
    assert!(state.iter().any(|e| e["type"] == "m.room.name"), "other state still comes");
    assert_eq!(v["rooms"]["join"][&room]["summary"]["m.joined_member_count"], 5);

    let only_name = r#"{"room":{"timeline":{"limit":1},"state":{"types":["m.room.name"]}}}"#;
    let v = bob.ok(M::GET, &format!("/sync?filter={}", enc(only_name)), None).await;
    let state = v["rooms"]["join"][&room]["state"]["events"].as_array().unwrap();
    assert!(!state.is_empty() && state.iter().all(|e| e["type"] == "m.room.name"));
}
