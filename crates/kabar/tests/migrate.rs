//! `kabar migrate`: an embedded installation copied into PostgreSQL, and a
//! server started on the copy carries on where the old one stopped.

mod common;

use std::time::Duration;

use common::{Api, Server, kabar, registered};
use kabar_store_postgres::test_cluster::TestCluster;
use matrix_sdk::{
    Client,
    ruma::{api::client::room::create_room, events::room::message::RoomMessageEventContent},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_installation_moves_to_postgres_and_carries_on() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = common::config_in(tmp.path(), "[storage]\nengine = \"sqlite\"\n");
    let mut server = Server::start_from_file(&config, &data, None);
    let alice = registered(&server.url, "alice").await;
    let bob = registered(&server.url, "bob").await;
    let mut req = create_room::v3::Request::new();
    req.invite = vec![bob.user_id().unwrap().to_owned()];
    let room = alice.create_room(req).await.unwrap();
    bob.join_room_by_id(room.room_id()).await.unwrap();
    for i in 0..30 {
        room.send(RoomMessageEventContent::text_plain(format!("before the move {i}")))
            .await
            .unwrap();
    }
    let old = Api::of(&alice, &server);
    let before = old.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(20)).is_some(), "the embedded server stops");

    let cluster = TestCluster::shared().expect("test PostgreSQL cluster");
    let url = cluster.ensure_database("migrate_target").unwrap();
    let out = kabar(&[
        "migrate",
        "--from",
        &format!("sqlite:{}", data.display()),
        "--to",
        &format!("postgres:{url}"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "migrate: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("verified:"), "{stdout}");
    let again = kabar(&["migrate", "--from", &format!("sqlite:{}", data.display()), "--to", &url]);
    assert!(!again.status.success(), "a second copy into a database with data is refused");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds data"));

    // A server on the copy, same data directory.
    let config = common::config_in(tmp.path(), &common::postgres_storage(&url));
    let server = Server::start_from_file(&config, &data, None);
    let alice_again = Api {
        url: server.url.clone(),
        ..old.clone()
    };
    alice_again.ok(reqwest::Method::GET, "/account/whoami", None).await;
    let bodies = alice_again.newest_bodies(room.room_id().as_str(), 100).await;
    assert_eq!(bodies.len(), 30, "every message was copied");
    assert_eq!(bodies[0], "before the move 29");

    // The old sync token goes on from where it was: the next message is news.
    let relogin = Client::builder().homeserver_url(&server.url).build().await.unwrap();
    relogin
        .matrix_auth()
        .login_username("bob", "bob-password")
        .send()
        .await
        .expect("bob's password works on the copy");
    let sent = alice_again
        .ok(
            reqwest::Method::PUT,
            &format!("/rooms/{}/send/m.room.message/after1", room.room_id()),
            Some(serde_json::json!({"msgtype": "m.text", "body": "after the move"})),
        )
        .await;
    let news = alice_again.sync(&before, None).await;
    let timeline = &news["rooms"]["join"][room.room_id().as_str()]["timeline"]["events"];
    let events = timeline.as_array().expect("the room has news since the old token");
    assert_eq!(events.len(), 1, "only the new message is news: {news}");
    assert_eq!(events[0]["event_id"], sent["event_id"]);
}
