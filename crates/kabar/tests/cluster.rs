//! Several `kabar serve` nodes on one PostgreSQL database with a NATS bus
//! between them (a real `nats-server`). Each node's periodic catch-up is
//! set to a minute here, so whatever reaches another node within seconds
//! came through the bus.

mod common;

use std::time::{Duration, Instant};

use common::{Api, Server};
use kabar_bus::test_server::NatsServer;
use kabar_store_postgres::test_cluster::TestCluster;
use reqwest::Method;
use serde_json::json;

/// Much longer than any wait below: only the bus can beat it.
const CATCH_UP_MS: u64 = 60_000;
/// How soon another node must know of a write through the bus.
const BUS_BOUND: Duration = Duration::from_secs(5);

/// `n` nodes sharing database `name` and the NATS server `nats`.
fn nodes(name: &str, n: usize, nats: &NatsServer) -> Vec<Server> {
    let cluster = TestCluster::shared().expect("start the test PostgreSQL cluster");
    let url = cluster.ensure_database(name).expect("create the database");
    (0..n)
        .map(|i| {
            let toml = format!(
                "{}\n[bus]\nengine = \"nats\"\nnats.urls = [\"{}\"]\nnode_name = \"node-{i}\"\ncatch_up_interval_ms = {CATCH_UP_MS}\n\n[media]\nstorage = \"database\"\n",
                common::postgres_storage(&url),
                nats.url()
            );
            Server::start_with_config(&toml)
        })
        .collect()
}

/// Long-polls as `api` from `since` until a message with `body` arrives in
/// `room`; returns when it arrived.
async fn wait_for_message(api: &Api, room: &str, since: String, body: &str) -> Instant {
    let mut since = since;
    loop {
        let v = api.ok(Method::GET, &format!("/sync?timeout=30000&since={since}"), None).await;
        let timeline = &v["rooms"]["join"][room]["timeline"]["events"];
        if timeline
            .as_array()
            .is_some_and(|evs| evs.iter().any(|e| e["content"]["body"] == body))
        {
            return Instant::now();
        }
        since = v["next_batch"].as_str().unwrap().to_owned();
    }
}

/// Sends `body` as `sender` while `receiver` long-polls on its node;
/// returns how long the message took to arrive.
async fn delivery_time(sender: &Api, receiver: &Api, room: &str, body: &str) -> Duration {
    let since = receiver.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let waiting = {
        let (receiver, room, body) = (receiver.clone(), room.to_owned(), body.to_owned());
        tokio::spawn(async move { wait_for_message(&receiver, &room, since, &body).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = Instant::now();
    sender.say(room, &format!("t-{body}"), body).await;
    let arrived = tokio::time::timeout(Duration::from_secs(40), waiting)
        .await
        .expect("the long-poll is answered")
        .unwrap();
    arrived.duration_since(sent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_bus_a_send_on_one_node_wakes_a_long_poll_on_another_and_a_logout_reaches_it() {
    let nats = NatsServer::start();
    let nodes = nodes("cluster_bus", 2, &nats);
    let (a, b) = (&nodes[0], &nodes[1]);
    let alice = Api::register(a, "alice").await;
    let bob_on_a = Api::register(a, "bob").await;
    let bob = Api {
        url: b.url.clone(),
        ..bob_on_a.clone()
    };
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await;

    let took = delivery_time(&alice, &bob, &room, "hello from node 0").await;
    assert!(took < BUS_BOUND, "delivered on node 1 in {took:?}, not at its next catch-up");
    let took = delivery_time(&bob, &alice, &room, "hello from node 1").await;
    assert!(took < BUS_BOUND, "and the other way in {took:?}");

    // Typing lives in memory: node 1 hears of it on the bus.
    let since = bob.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    alice
        .ok(
            Method::PUT,
            &format!("/rooms/{}/typing/{}", common::enc(&room), common::enc(&alice.user_id)),
            Some(json!({"typing": true, "timeout": 20000})),
        )
        .await;
    let typed = Instant::now();
    let mut since = since;
    loop {
        let v = bob.ok(Method::GET, &format!("/sync?timeout=10000&since={since}"), None).await;
        let typing = v["rooms"]["join"][room.as_str()]["ephemeral"]["events"]
            .as_array()
            .and_then(|evs| evs.iter().find(|e| e["type"] == "m.typing").cloned());
        if let Some(t) = typing
            && t["content"]["user_ids"] == json!([alice.user_id])
        {
            break;
        }
        assert!(typed.elapsed() < BUS_BOUND, "node 1 shows alice typing on node 0: {v}");
        since = v["next_batch"].as_str().unwrap().to_owned();
    }

    for node in [a, b] {
        let status = node.admin_json(&["status"]);
        assert_eq!(status["bus"]["engine"], "nats", "{status}");
        assert_eq!(status["bus"]["connected"], true, "{status}");
    }
    assert_eq!(b.admin_json(&["status"])["bus"]["node"], "node-1");
    // Each node lists every live node from their heartbeats.
    let deadline = Instant::now() + BUS_BOUND;
    loop {
        let status = a.admin_json(&["status"]);
        let nodes: Vec<&str> = status["bus"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["node"].as_str())
            .collect();
        if nodes == ["node-0", "node-1"] {
            let other = &status["bus"]["nodes"][1];
            assert_eq!(other["this_node"], false);
            assert!(other["applied_position"].as_u64().unwrap() > 0, "{other}");
            break;
        }
        assert!(Instant::now() < deadline, "node 0 lists both nodes: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Media uploaded through node 0 downloads through node 1 (the files are
    // in the database: nothing is shared between the nodes but it).
    let file: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let mxc = alice.upload(file.clone(), "application/octet-stream").await;
    let downloaded = common::http()
        .get(format!("{}/_matrix/client/v1/media/download/{mxc}", b.url))
        .bearer_auth(&bob.token)
        .send()
        .await
        .unwrap();
    assert_eq!(downloaded.status().as_u16(), 200);
    assert_eq!(downloaded.bytes().await.unwrap().to_vec(), file, "node 1 serves what node 0 stored");

    // A logout on node 0 is refused on node 1 at once, not in a minute.
    let carol = Api::register(a, "carol").await;
    let carol_on_b = Api {
        url: b.url.clone(),
        ..carol.clone()
    };
    carol_on_b.ok(Method::GET, "/account/whoami", None).await;
    carol.ok(Method::POST, "/logout", Some(json!({}))).await;
    let revoked = Instant::now();
    loop {
        let (status, body) = carol_on_b.req(Method::GET, "/account/whoami", None).await;
        if status == 401 {
            assert_eq!(body["errcode"], "M_UNKNOWN_TOKEN");
            break;
        }
        assert!(revoked.elapsed() < BUS_BOUND, "node 1 still accepts a token revoked on node 0");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_gone_nodes_report_not_ready_keep_serving_and_recover_when_it_returns() {
    let mut nats = NatsServer::start();
    let nodes = nodes("cluster_nats_outage", 2, &nats);
    let (a, b) = (&nodes[0], &nodes[1]);
    let alice = Api::register(a, "alice").await;
    let bob_on_a = Api::register(a, "bob").await;
    let bob = Api {
        url: b.url.clone(),
        ..bob_on_a.clone()
    };
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await;

    nats.stop();
    let ready = |server: &Server| {
        let url = format!("{}/ready", server.url);
        async move { common::http().get(url).send().await.unwrap().status().as_u16() }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready(a).await != 503 || ready(b).await != 503 {
        assert!(Instant::now() < deadline, "both nodes report not ready without the bus");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = alice.req(Method::GET, "/account/whoami", None).await;
    assert_eq!((status, body["user_id"].as_str()), (200, Some(alice.user_id.as_str())), "{body}");
    // A send still commits; the other node learns of it from the store.
    alice.say(&room, "during", "sent while NATS was away").await;

    nats.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready(a).await != 200 || ready(b).await != 200 {
        assert!(Instant::now() < deadline, "both nodes are ready again once NATS is back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = delivery_time(&alice, &bob, &room, "after NATS returned").await;
    assert!(took < BUS_BOUND, "the bus wakes node 1 again: {took:?}");
    let history = bob
        .ok(Method::GET, &format!("/rooms/{}/messages?dir=b&limit=20", common::enc(&room)), None)
        .await;
    let bodies: Vec<&str> = history["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert!(
        bodies.contains(&"sent while NATS was away"),
        "the message sent during the outage is on node 1: {bodies:?}"
    );
}
