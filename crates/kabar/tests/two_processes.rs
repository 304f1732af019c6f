//! Two `kabar serve` processes on one PostgreSQL database, with no bus
//! between them: everything one learns of the other's writes comes from the
//! committed stream (the applier's catch-up, every 250 ms).

mod common;

use std::time::{Duration, Instant};

use common::{Api, Server, registered};
use kabar_store_postgres::test_cluster::TestCluster;
use matrix_sdk::{
    config::SyncSettings,
    ruma::{
        api::client::room::create_room,
        events::{AnySyncTimelineEvent, room::message::RoomMessageEventContent},
    },
};

/// How long a process may take to learn another's write: the applier's
/// catch-up interval (250 ms), with room for a slow test machine.
const CATCH_UP_BOUND: Duration = Duration::from_secs(2);

/// Two servers sharing database `name`.
fn two_servers(name: &str) -> (Server, Server) {
    let cluster = TestCluster::shared().expect("start the test PostgreSQL cluster");
    let url = cluster.ensure_database(name).expect("create the database");
    let toml = common::postgres_storage(&url);
    (Server::start_with_config(&toml), Server::start_with_config(&toml))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_sent_through_one_process_reaches_syncs_and_history_on_the_other() {
    let (a, b) = two_servers("two_processes_chat");
    let alice = registered(&a.url, "alice").await;
    let bob = registered(&b.url, "bob").await;
    let mut req = create_room::v3::Request::new();
    req.invite = vec![bob.user_id().unwrap().to_owned()];
    let room = alice.create_room(req).await.expect("create room on a");
    let room_id = room.room_id().to_owned();

    // Bob, on b, sees the invite a wrote and joins through b.
    let deadline = Instant::now() + CATCH_UP_BOUND;
    loop {
        bob.sync_once(SyncSettings::default().timeout(Duration::from_millis(500)))
            .await
            .unwrap();
        if bob.get_room(&room_id).is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "b never showed the invite written through a");
    }
    bob.join_room_by_id(&room_id).await.expect("join through b");

    // A long-poll on b is woken by a send through a.
    let bob_api = Api {
        url: b.url.clone(),
        token: bob.access_token().unwrap(),
        user_id: bob.user_id().unwrap().to_string(),
        device_id: bob.device_id().unwrap().to_string(),
    };
    let since = bob_api.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let waiting = {
        let (bob_api, room_id) = (bob_api.clone(), room_id.to_string());
        tokio::spawn(async move {
            // Long-polls (other news, such as alice's keys, may answer one
            // early) until the message arrives.
            let mut since = since;
            loop {
                let v = bob_api
                    .ok(reqwest::Method::GET, &format!("/sync?timeout=20000&since={since}"), None)
                    .await;
                let timeline = &v["rooms"]["join"][room_id.as_str()]["timeline"]["events"];
                if let Some(e) = timeline
                    .as_array()
                    .and_then(|evs| evs.iter().find(|e| e["content"]["body"] == "hello from a"))
                {
                    return (e["event_id"].as_str().unwrap().to_owned(), Instant::now());
                }
                since = v["next_batch"].as_str().unwrap().to_owned();
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice
        .sync_once(SyncSettings::default().timeout(Duration::from_millis(100)))
        .await
        .unwrap();
    let sent_at = Instant::now();
    let sent = alice
        .get_room(&room_id)
        .unwrap()
        .send(RoomMessageEventContent::text_plain("hello from a"))
        .await
        .unwrap()
        .response
        .event_id;
    let (received, arrived) = tokio::time::timeout(Duration::from_secs(15), waiting)
        .await
        .expect("b's long-poll delivers a's message")
        .unwrap();
    assert_eq!(received, sent.as_str());
    assert!(
        arrived.duration_since(sent_at) < CATCH_UP_BOUND,
        "delivered through b within the catch-up bound, in {:?}",
        arrived.duration_since(sent_at)
    );

    // And it is in b's history, through matrix-sdk.
    let b_room = bob.get_room(&room_id).unwrap();
    let history = b_room.messages(matrix_sdk::room::MessagesOptions::backward()).await.unwrap();
    let ids: Vec<_> = history
        .chunk
        .iter()
        .filter_map(|e| e.raw().deserialize().ok())
        .map(|e: AnySyncTimelineEvent| e.event_id().to_owned())
        .collect();
    assert!(ids.contains(&sent), "/messages on b has a's message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_revoked_on_one_process_is_refused_by_the_other_within_the_catch_up_interval() {
    let (a, b) = two_servers("two_processes_tokens");
    let on_a = Api::register(&a, "carol").await;
    let on_b = Api {
        url: b.url.clone(),
        ..on_a.clone()
    };
    // b has the token in its cache now.
    on_b.ok(reqwest::Method::GET, "/account/whoami", None).await;
    on_a.ok(reqwest::Method::POST, "/logout", Some(serde_json::json!({}))).await;
    let revoked = Instant::now();
    loop {
        let (status, body) = on_b.req(reqwest::Method::GET, "/account/whoami", None).await;
        if status == 401 {
            assert_eq!(body["errcode"], "M_UNKNOWN_TOKEN");
            break;
        }
        assert!(
            revoked.elapsed() < CATCH_UP_BOUND,
            "b still accepts a token a revoked {:?} ago",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_up_started_on_one_process_completes_on_the_other() {
    let (a, b) = two_servers("two_processes_signup");
    let (status, challenge) = common::post_public(&a.url, "/register", serde_json::json!({"username": "dana", "password": "pw"})).await;
    assert_eq!(status, 401, "{challenge}");
    let session = challenge["session"].as_str().expect("a UIA session").to_owned();
    let (status, done) = common::post_public(
        &b.url,
        "/register",
        serde_json::json!({"username": "dana", "password": "pw", "auth": {"type": "m.login.dummy", "session": session}}),
    )
    .await;
    assert_eq!(status, 200, "{done}");
    let token = done["access_token"].as_str().unwrap();
    let whoami = common::get_json(format!("{}/_matrix/client/v3/account/whoami", a.url), token).await;
    assert_eq!(whoami["user_id"], done["user_id"], "the account works on a too");
    // The spent session is spent on both.
    let (status, _) = common::post_public(
        &a.url,
        "/register",
        serde_json::json!({"username": "dana2", "password": "pw", "auth": {"type": "m.login.dummy", "session": session}}),
    )
    .await;
    assert_ne!(status, 200, "a completed session cannot sign anyone else up");
}
