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

/// `n` nodes sharing database `name` (of the shared test cluster) and the
/// NATS server `nats`.
fn nodes(name: &str, n: usize, nats: &NatsServer) -> Vec<Server> {
    let cluster = TestCluster::shared().expect("start the test PostgreSQL cluster");
    let url = cluster.ensure_database(name).expect("create the database");
    nodes_on(&url, n, nats)
}

/// `n` nodes sharing the database at `url` and the NATS server `nats`.
fn nodes_on(url: &str, n: usize, nats: &NatsServer) -> Vec<Server> {
    nodes_configured(url, n, nats, "")
}

/// [`nodes_on`], each node's configuration ending with `extra`.
fn nodes_configured(url: &str, n: usize, nats: &NatsServer, extra: &str) -> Vec<Server> {
    (0..n)
        .map(|i| {
            let toml = format!(
                "{}\n[bus]\nengine = \"nats\"\nnats.urls = [\"{}\"]\nnode_name = \"node-{i}\"\ncatch_up_interval_ms = {CATCH_UP_MS}\n\n[media]\nstorage = \"database\"\n{extra}",
                common::postgres_storage(url),
                nats.url()
            );
            Server::start_with_config(&toml)
        })
        .collect()
}

/// Alice signed in through `a`, Bob through `b`, both in a public room.
async fn alice_on_a_and_bob_on_b_in_a_room(a: &Server, b: &Server) -> (Api, Api, String) {
    let alice = Api::register(a, "alice").await;
    let bob = Api {
        url: b.url.clone(),
        ..Api::register(a, "bob").await
    };
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await;
    (alice, bob, room)
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
    let (alice, bob, room) = alice_on_a_and_bob_on_b_in_a_room(a, b).await;

    let took = delivery_time(&alice, &bob, &room, "hello from node 0").await;
    assert!(took < BUS_BOUND, "delivered on node 1 in {took:?}, not at its next catch-up");
    let took = delivery_time(&bob, &alice, &room, "hello from node 1").await;
    assert!(took < BUS_BOUND, "and the other way in {took:?}");

    // A send retried through the other node (same device, same transaction
    // id) gets the first event back, and the room holds it once.
    let first = alice.say(&room, "retried-on-another-node", "sent once").await;
    let alice_via_b = Api {
        url: b.url.clone(),
        ..alice.clone()
    };
    assert_eq!(alice_via_b.say(&room, "retried-on-another-node", "sent once").await, first);
    let copies = bob.newest_bodies(&room, 20).await.iter().filter(|b| *b == "sent once").count();
    assert_eq!(copies, 1);

    // To-device messages and read receipts are in the stream: node 1 gets
    // them at once through the bus too.
    let since = bob.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    alice
        .ok(
            Method::PUT,
            "/sendToDevice/m.kabar.test/td1",
            Some(json!({"messages": {bob.user_id.as_str(): {bob.device_id.as_str(): {"hello": "from node 0"}}}})),
        )
        .await;
    let newest = alice.newest_event(&room).await;
    alice
        .ok(
            Method::POST,
            &format!("/rooms/{}/receipt/m.read/{}", common::enc(&room), common::enc(&newest)),
            Some(json!({})),
        )
        .await;
    let asked = Instant::now();
    let (mut got_to_device, mut got_receipt, mut since) = (false, false, since);
    while !(got_to_device && got_receipt) {
        let v = bob.ok(Method::GET, &format!("/sync?timeout=5000&since={since}"), None).await;
        got_to_device |= v["to_device"]["events"]
            .as_array()
            .is_some_and(|evs| evs.iter().any(|e| e["content"]["hello"] == "from node 0"));
        got_receipt |= v["rooms"]["join"][room.as_str()]["ephemeral"]["events"]
            .as_array()
            .is_some_and(|evs| {
                evs.iter()
                    .any(|e| e["type"] == "m.receipt" && e["content"][newest.as_str()].is_object())
            });
        assert!(
            asked.elapsed() < BUS_BOUND,
            "node 1 delivers node 0's to-device message and receipt: {v}"
        );
        since = v["next_batch"].as_str().unwrap().to_owned();
    }

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

    // So is every token of a user the operator deactivates on node 0.
    let dave = Api::register(a, "dave").await;
    let dave_on_b = Api {
        url: b.url.clone(),
        ..dave.clone()
    };
    dave_on_b.ok(Method::GET, "/account/whoami", None).await;
    let out = a.admin(&["deactivate-user", &dave.user_id]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deactivated = Instant::now();
    while dave_on_b.req(Method::GET, "/account/whoami", None).await.0 != 401 {
        assert!(deactivated.elapsed() < BUS_BOUND, "node 1 still accepts a deactivated user's token");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_nats_gone_for_ten_seconds_nodes_report_not_ready_keep_serving_and_recover_when_it_returns() {
    let mut nats = NatsServer::start();
    let nodes = nodes("cluster_nats_outage", 2, &nats);
    let (a, b) = (&nodes[0], &nodes[1]);
    let (alice, bob, room) = alice_on_a_and_bob_on_b_in_a_room(a, b).await;

    // Bob waits on node 1 across the whole outage.
    let since = bob.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let waiting = {
        let (bob, room) = (bob.clone(), room.clone());
        tokio::spawn(async move { wait_for_message(&bob, &room, since, "sent while NATS was away").await })
    };
    nats.stop();
    let stopped = Instant::now();
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
    // Sends still commit; node 1 cannot hear of them yet. NATS stays away
    // for 10 s.
    for n in 0..5 {
        alice.say(&room, &format!("during-{n}"), &format!("during the outage {n}")).await;
    }
    alice.say(&room, "during", "sent while NATS was away").await;
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(stopped.elapsed())).await;

    nats.restart();
    let back = Instant::now();
    // Once NATS is back, every node announces its head again and reads what
    // it may have missed: the waiting sync is answered without waiting for
    // node 1's next catch-up (a minute away) or for another send.
    let arrived = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the sync waiting across the outage is answered")
        .unwrap();
    let after = arrived.saturating_duration_since(back);
    assert!(after < Duration::from_secs(10), "answered {after:?} after NATS returned");
    let deadline = Instant::now() + Duration::from_secs(20);
    while ready(a).await != 200 || ready(b).await != 200 {
        assert!(Instant::now() < deadline, "both nodes are ready again once NATS is back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = delivery_time(&alice, &bob, &room, "after NATS returned").await;
    assert!(took < BUS_BOUND, "the bus wakes node 1 again: {took:?}");
    let bodies = bob.newest_bodies(&room, 20).await;
    let during: Vec<&String> = bodies.iter().filter(|b| b.starts_with("during the outage")).collect();
    let expected: Vec<String> = (0..5).rev().map(|n| format!("during the outage {n}")).collect();
    assert_eq!(
        during,
        expected.iter().collect::<Vec<_>>(),
        "node 1 has every message sent during the outage, once and in order"
    );
    assert!(
        bodies.iter().any(|b| b == "sent while NATS was away"),
        "the message sent during the outage is on node 1: {bodies:?}"
    );
}

/// HAProxy in front of `backends` (loopback ports), on a free port, as
/// `scripts/haproxy.cfg.in` configures it (each room's writes to one node,
/// the rest round robin), with `/ready` health checks every 200 ms. Killed
/// when dropped.
struct LoadBalancer {
    child: std::process::Child,
    url: String,
    stats: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl LoadBalancer {
    fn start(backends: &[u16]) -> Self {
        let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).is_file())
            .expect("haproxy (install Debian's haproxy package)");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, p)| format!("    server node-{i} 127.0.0.1:{p} check\n"))
            .collect();
        let stats = dir.path().join("stats.sock");
        let config = include_str!("../../../scripts/haproxy.cfg.in")
            .replacen("global\n", &format!("global\n    stats socket {}\n", stats.display()), 1)
            .replace("@BIND@", &format!("127.0.0.1:{port}"))
            .replace("@CHECK@", "inter 200ms fall 1 rise 2")
            .replace("@SERVERS@\n", &servers)
            .replace("@FALLBACKS@\n", "");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = std::process::Command::new(bin)
            .arg("-f")
            .arg(&path)
            .arg("-db")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start haproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "haproxy listens");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            stats,
            _dir: dir,
        }
    }

    /// The index of the node that took the most requests of `backend`
    /// (from HAProxy's `show stat`: each server's total sessions).
    fn busiest(&self, backend: &str) -> usize {
        use std::io::{Read, Write};
        let mut socket = std::os::unix::net::UnixStream::connect(&self.stats).expect("haproxy's stats socket");
        socket.write_all(b"show stat\n").unwrap();
        let mut csv = String::new();
        socket.read_to_string(&mut csv).unwrap();
        csv.lines()
            .map(|line| line.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > 7 && f[0] == backend && f[1].starts_with("node-"))
            .max_by_key(|f| f[7].parse::<u64>().unwrap_or(0))
            .and_then(|f| f[1].strip_prefix("node-")?.parse().ok())
            .unwrap_or_else(|| panic!("no server of {backend} in {csv}"))
    }
}

impl Drop for LoadBalancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A node listening on a fixed `port` (so that it comes back where the load
/// balancer expects it), with its data in `dir`.
fn fixed_node(dir: &std::path::Path, port: u16, index: usize, db_url: &str, nats: &NatsServer) -> Server {
    let config = dir.join("kabar.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n{}\n{}\n[bus]\nengine = \"nats\"\nnats.urls = [\"{}\"]\nnode_name = \"node-{index}\"\n\n[media]\nstorage = \"database\"\n",
            dir.join("data").display(),
            common::HARNESS_CONFIG,
            common::postgres_storage(db_url),
            nats.url()
        ),
    )
    .unwrap();
    Server::start_from_file(&config, &dir.join("data"), None)
}

/// Sends `body` with transaction `txn` through the load balancer until a
/// node acknowledges it (a retry of the same transaction after a node died
/// mid-request returns the first event, never a second one).
async fn send_until_acknowledged(api: &Api, room: &str, txn: &str, body: &str) -> String {
    let path = format!(
        "{}/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}",
        api.url,
        common::enc(room)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let sent = common::http()
            .put(&path)
            .bearer_auth(&api.token)
            .json(&json!({"msgtype": "m.text", "body": body}))
            .send()
            .await;
        if let Ok(response) = sent
            && response.status().is_success()
            && let Ok(v) = response.json::<serde_json::Value>().await
            && let Some(id) = v["event_id"].as_str()
        {
            return id.to_owned();
        }
        assert!(Instant::now() < deadline, "{body} was never acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_mid_load_loses_and_duplicates_nothing_and_it_rejoins() {
    const SENDERS: usize = 6;
    const EACH: usize = 40;
    let nats = NatsServer::start();
    let cluster = TestCluster::shared().expect("start the test PostgreSQL cluster");
    let db = cluster.ensure_database("cluster_kill9").expect("create the database");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut nodes: Vec<Server> = (0..3).map(|i| fixed_node(dirs[i].path(), ports[i], i, &db, &nats)).collect();
    let lb = LoadBalancer::start(&ports);
    let via_lb = |api: &Api| Api {
        url: lb.url.clone(),
        ..api.clone()
    };

    let alice = via_lb(&Api::register(&nodes[0], "alice").await);
    let bob = via_lb(&Api::register(&nodes[1], "bob").await);
    let room = alice.create_room(json!({"preset": "public_chat"})).await;
    bob.join(&room).await;
    // A matrix-sdk client follows the room through the load balancer.
    let carol = common::registered(&lb.url, "carol").await;
    carol
        .join_room_by_id(&matrix_sdk::ruma::OwnedRoomId::try_from(room.as_str()).unwrap())
        .await
        .expect("carol joins through the load balancer");

    // Bob follows the room with raw long-polls (a timeline big enough never
    // to be cut), counting every message body his syncs deliver.
    let since = bob.sync("", None).await["next_batch"].as_str().unwrap().to_owned();
    let total = SENDERS * EACH;
    let follower = {
        let (bob, room) = (bob.clone(), room.clone());
        tokio::spawn(async move {
            let filter = common::enc(&json!({"room": {"timeline": {"limit": 1000}}}).to_string());
            let mut seen: Vec<String> = vec![];
            let mut since = since;
            let deadline = Instant::now() + Duration::from_secs(120);
            while seen.len() < total && Instant::now() < deadline {
                let got = common::http()
                    .get(format!(
                        "{}/_matrix/client/v3/sync?timeout=5000&since={since}&filter={filter}",
                        bob.url
                    ))
                    .bearer_auth(&bob.token)
                    .send()
                    .await;
                // A long-poll cut by the killed node is simply made again.
                let Ok(response) = got else { continue };
                let Ok(v) = response.json::<serde_json::Value>().await else {
                    continue;
                };
                let Some(next) = v["next_batch"].as_str() else { continue };
                let timeline = &v["rooms"]["join"][room.as_str()]["timeline"];
                assert_ne!(timeline["limited"], true, "a sync stream must show no gap");
                for e in timeline["events"].as_array().into_iter().flatten() {
                    if let Some(body) = e["content"]["body"].as_str().filter(|b| b.starts_with("load ")) {
                        seen.push(body.to_owned());
                    }
                }
                since = next.to_owned();
            }
            seen
        })
    };

    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut senders = vec![];
    for s in 0..SENDERS {
        let (api, room, done) = (if s % 2 == 0 { alice.clone() } else { bob.clone() }, room.clone(), done.clone());
        senders.push(tokio::spawn(async move {
            let mut acknowledged = vec![];
            for n in 0..EACH {
                let body = format!("load {s}/{n}");
                acknowledged.push(send_until_acknowledged(&api, &room, &format!("k{s}-{n}"), &body).await);
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            acknowledged
        }));
    }
    while done.load(std::sync::atomic::Ordering::Relaxed) < total / 4 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The node the balancer sends the room's writes to: its senders must
    // move to another node.
    let victim = lb.busiest("kabar_by_room");
    eprintln!("killing node-{victim}, where the balancer sends the room's writes");
    nodes[victim].kill9();
    let at_kill = done.load(std::sync::atomic::Ordering::Relaxed);
    assert!(at_kill < total, "the node died mid-load ({at_kill} of {total} acknowledged)");
    let mut acknowledged = vec![];
    for s in senders {
        acknowledged.extend(s.await.unwrap());
    }
    assert_eq!(acknowledged.len(), total);

    // Every acknowledged send is in the room exactly once.
    let history = alice
        .ok(
            Method::GET,
            &format!("/rooms/{}/messages?dir=f&limit=1000", common::enc(&room)),
            None,
        )
        .await;
    let stored: Vec<(&str, &str)> = history["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["event_id"].as_str()?, e["content"]["body"].as_str()?)))
        .filter(|(_, body)| body.starts_with("load "))
        .collect();
    assert_eq!(stored.len(), total, "every send stored exactly once");
    let ids: std::collections::HashSet<&str> = stored.iter().map(|(id, _)| *id).collect();
    assert!(
        acknowledged.iter().all(|id| ids.contains(id.as_str())),
        "every acknowledged event is stored"
    );

    // Bob's sync stream showed every message once.
    let mut seen = tokio::time::timeout(Duration::from_secs(130), follower).await.unwrap().unwrap();
    assert_eq!(seen.len(), total, "every message reached the sync stream");
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), total, "no message twice in the sync stream");

    // The killed node comes back on its port and serves what it missed.
    nodes[victim] = fixed_node(dirs[victim].path(), ports[victim], victim, &db, &nats);
    let direct = Api {
        url: nodes[victim].url.clone(),
        ..alice.clone()
    };
    let history = direct
        .ok(Method::GET, &format!("/rooms/{}/messages?dir=b&limit=5", common::enc(&room)), None)
        .await;
    assert_eq!(history["chunk"].as_array().unwrap().len(), 5, "the restarted node serves the room");
    assert_eq!(
        common::http()
            .get(format!("{}/ready", nodes[victim].url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    // Carol's matrix-sdk client, through the load balancer, reads the
    // newest message of the load.
    carol
        .sync_once(matrix_sdk::config::SyncSettings::default().timeout(Duration::from_millis(500)))
        .await
        .unwrap();
    let room_id = matrix_sdk::ruma::OwnedRoomId::try_from(room.as_str()).unwrap();
    let page = carol
        .get_room(&room_id)
        .expect("carol is in the room")
        .messages(matrix_sdk::room::MessagesOptions::backward())
        .await
        .expect("carol's client pages the room");
    let newest = page
        .chunk
        .iter()
        .filter_map(|e| e.raw().get_field::<String>("event_id").ok().flatten())
        .collect::<Vec<_>>();
    let settled = acknowledged.iter().any(|id| newest.contains(id));
    assert!(settled, "carol's client syncs the room through the load balancer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_postgres_stopped_for_ten_seconds_nodes_fail_fast_stay_up_and_resume_by_themselves() {
    // A PostgreSQL cluster of its own: this test stops it.
    let postgres = TestCluster::start().expect("start a PostgreSQL cluster");
    let db = postgres.create_database("cluster_outage").unwrap();
    let nats = NatsServer::start();
    let mut nodes = nodes_on(&db, 2, &nats);
    let (alice, bob, room) = alice_on_a_and_bob_on_b_in_a_room(&nodes[0], &nodes[1]).await;

    postgres.stop().unwrap();
    let stopped = Instant::now();
    let send_path = format!(
        "{}/_matrix/client/v3/rooms/{}/send/m.room.message/down",
        alice.url,
        common::enc(&room)
    );
    let mut refused = 0;
    while stopped.elapsed() < Duration::from_secs(10) {
        let asked = Instant::now();
        let send = common::http()
            .put(&send_path)
            .bearer_auth(&alice.token)
            .json(&json!({"msgtype": "m.text", "body": "while the database was down"}))
            .send()
            .await
            .unwrap();
        let took = asked.elapsed();
        if send.status().as_u16() == 503 {
            assert!(send.headers().get("retry-after").is_some(), "told when to come back");
            let body: serde_json::Value = send.json().await.unwrap();
            assert_eq!(body["errcode"], "M_UNKNOWN", "{body}");
            assert!(took < Duration::from_secs(5), "a refusal comes fast, not after {took:?}");
            refused += 1;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(refused > 0, "sends were refused while the database was down");
    for node in nodes.iter_mut() {
        assert!(node.wait_exit(Duration::ZERO).is_none(), "no node exits without its database");
        let ready = common::http().get(format!("{}/ready", node.url)).send().await.unwrap();
        assert_eq!(ready.status().as_u16(), 503, "a node without its database is not ready");
    }

    postgres.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in &nodes {
        while common::http()
            .get(format!("{}/ready", node.url))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
            != 200
        {
            assert!(Instant::now() < deadline, "every node is ready again once the database is back");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // The retried send lands once; the other node delivers it through the bus.
    let took = delivery_time(&alice, &bob, &room, "after the database returned").await;
    assert!(took < BUS_BOUND, "node 1 delivers again: {took:?}");
    let sent = alice
        .ok(
            Method::PUT,
            &format!("/rooms/{}/send/m.room.message/down", common::enc(&room)),
            Some(json!({"msgtype": "m.text", "body": "while the database was down"})),
        )
        .await;
    let bodies = bob.newest_bodies(&room, 50).await;
    let copies = bodies.iter().filter(|b| *b == "while the database was down").count();
    assert_eq!(copies, 1, "nothing of the refused sends was kept, the retry landed once");
    assert!(sent["event_id"].is_string());
}

/// A rate limit is configured for the server: with two live nodes behind a
/// balancer that alternates between them, each node enforces half of it, so
/// a client gets the configured allowance from the cluster, not twice it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_hold_a_login_allowance_as_configured_for_the_whole_server() {
    let nats = NatsServer::start();
    let cluster = TestCluster::shared().expect("start the test PostgreSQL cluster");
    let url = cluster.ensure_database("cluster_shared_limits").expect("create the database");
    let nodes = nodes_configured(
        &url,
        2,
        &nats,
        "[admission.login]\nper_address_per_minute = 6\nper_address_burst = 4\n",
    );
    for node in &nodes {
        let deadline = Instant::now() + BUS_BOUND;
        loop {
            let status = node.admin_json(&["status"]);
            if status["bus"]["rate_limits_shared_by"] == 2 {
                assert_eq!(status["bus"]["rate_limits"], "share");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the nodes share their limits once they hear each other: {status}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let attempt = json!({
        "type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": "nobody"},
        "password": "wrong",
    });
    let mut answers = vec![];
    for i in 0..6 {
        let (status, body) = common::post_public(&nodes[i % 2].url, "/login", attempt.clone()).await;
        answers.push((
            status,
            body["errcode"].as_str().unwrap_or_default().to_owned(),
            body["retry_after_ms"].as_u64(),
        ));
    }
    let refused: Vec<_> = answers.iter().filter(|(status, ..)| *status == 429).collect();
    assert_eq!(
        answers
            .iter()
            .take(4)
            .map(|(status, errcode, _)| (*status, errcode.as_str()))
            .collect::<Vec<_>>(),
        vec![(403, "M_FORBIDDEN"); 4],
        "the configured burst of four is admitted across the nodes: {answers:?}"
    );
    assert_eq!(refused.len(), 2, "the fifth and sixth are over the server's allowance: {answers:?}");
    for (_, errcode, retry_after_ms) in refused {
        assert_eq!(errcode, "M_LIMIT_EXCEEDED");
        // 6 a minute over two nodes: each admits one every 20 s.
        let wait = retry_after_ms.expect("an honest wait");
        assert!((10_000..=20_001).contains(&wait), "{wait} ms");
    }
}

/// A sliding-sync connection's state lives on the node that answers it: the
/// balancer sends each client's sliding syncs to one node, so a client
/// going through it keeps its connection (never `M_UNKNOWN_POS`) while its
/// other requests go round robin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_balancer_a_sliding_sync_connection_stays_on_one_node() {
    let nats = NatsServer::start();
    let cluster = TestCluster::shared().expect("start the test PostgreSQL cluster");
    let db = cluster.ensure_database("cluster_sliding").expect("create the database");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let _nodes: Vec<Server> = (0..3).map(|i| fixed_node(dirs[i].path(), ports[i], i, &db, &nats)).collect();
    let lb = LoadBalancer::start(&ports);
    let via_lb = |api: Api| Api {
        url: lb.url.clone(),
        ..api
    };
    let nora = via_lb(Api::register(&_nodes[0], "nora").await);
    let omar = via_lb(Api::register(&_nodes[1], "omar").await);
    let room = nora.create_room(json!({"preset": "public_chat"})).await;
    omar.join(&room).await;
    let path = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";
    let body = json!({"conn_id": "list", "lists": {"all": {"ranges": [[0, 9]], "timeline_limit": 10}}});
    let (status, first) = nora.req_at(Method::POST, path, Some(body.clone())).await;
    assert_eq!(status, 200, "{first}");
    let mut pos = first["pos"].as_str().unwrap().to_owned();
    let mut seen: Vec<String> = vec![];
    for n in 0..6 {
        omar.say(&room, &format!("s{n}"), &format!("through the balancer {n}")).await;
        let deadline = Instant::now() + BUS_BOUND;
        loop {
            let (status, v) = nora
                .req_at(Method::POST, &format!("{path}?pos={pos}&timeout=2000"), Some(body.clone()))
                .await;
            assert_eq!(status, 200, "request {n} kept its connection: {v}");
            pos = v["pos"].as_str().unwrap().to_owned();
            seen.extend(
                v["rooms"][&room]["timeline"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned)),
            );
            if seen.iter().any(|b| *b == format!("through the balancer {n}")) {
                break;
            }
            assert!(Instant::now() < deadline, "message {n} arrives through the bus: {seen:?}");
        }
    }
    assert_eq!(seen.len(), 6, "each message once: {seen:?}");
}
