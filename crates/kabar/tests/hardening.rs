//! Hostile input that needs no login (or very little): what a probe found
//! could exhaust memory, hold connections forever, or fill queues (issue 13,
//! items 19 to 24). Raw HTTP and TCP, since these are not requests a client
//! library sends.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use common::{Api, Server, enc, http, post_public};
use reqwest::Method as M;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn errcode(v: &Value) -> &str {
    v["errcode"].as_str().unwrap_or("<none>")
}

/// A client whose connections come from `source` (another loopback address).
fn http_from(source: Ipv4Addr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(source))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The server process's resident memory, in KiB.
fn rss_kib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn address(server: &Server) -> SocketAddr {
    server.url.strip_prefix("http://").unwrap().parse().unwrap()
}

/// Reads until the server closes the connection; false if it is still
/// open after `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Item 19: the HTTP method is never an unbounded metrics label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_share_one_metrics_bucket() {
    let server = Server::start_with_config("metrics_listen = \"127.0.0.1:0\"");
    let metrics = || async {
        http()
            .get(server.metrics_url.clone().unwrap())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let before = metrics().await.lines().count();
    for i in 0..300 {
        let method = reqwest::Method::from_bytes(format!("PROBE{i}").as_bytes()).unwrap();
        let r = http()
            .request(method, format!("{}/_matrix/client/versions", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405);
    }
    let after = metrics().await;
    assert!(!after.contains("PROBE"), "a made-up method became a label");
    assert!(after.contains("method=\"other\""), "they are counted, in one bucket");
    let grew = after.lines().count() - before;
    assert!(grew < 60, "300 made-up methods added {grew} lines of metrics");
}

/// Item 20: downloads stream from disk (memory does not grow with the file
/// times the readers), each address may hold only so many, and the
/// unauthenticated paths follow the media freeze.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_downloads_stream_are_bounded_per_address_and_follow_the_freeze() {
    // Loopback is a reverse proxy's address and unlimited by default: not here.
    let server = Server::start_with_config("[media]\nmax_downloads_per_address = 24\n[limits]\nunlimited_addresses = []\n");
    let alice = Api::register(&server, "alice").await;
    let file: Vec<u8> = (0..20 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let media = alice.upload(file.clone(), "application/octet-stream").await;
    let url = format!("{}/_matrix/client/v1/media/download/{media}", server.url);

    // Slow readers: each takes the first bytes and then stops reading.
    let before = rss_kib(&server);
    let mut slow = vec![];
    for _ in 0..24 {
        let mut r = http().get(&url).bearer_auth(&alice.token).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], "20971520");
        let first = r.chunk().await.unwrap().unwrap();
        assert_eq!(first[0], 0);
        slow.push(r);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grew_mib = rss_kib(&server).saturating_sub(before) / 1024;
    assert!(grew_mib < 120, "24 slow readers of a 20 MiB file took {grew_mib} MiB");

    // The address has all its downloads; another address does not.
    let r = http().get(&url).bearer_auth(&alice.token).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(errcode(&r.json().await.unwrap()), "M_LIMIT_EXCEEDED");
    let other = http_from(Ipv4Addr::new(127, 0, 0, 2))
        .get(&url)
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(other.bytes().await.unwrap().len(), file.len());
    drop(slow);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http().get(&url).bearer_auth(&alice.token).send().await.unwrap();
        if r.status() == 200 {
            assert_eq!(r.bytes().await.unwrap().as_ref(), file.as_slice(), "the whole file, intact");
            break;
        }
        assert!(Instant::now() < deadline, "slots are given back when readers go");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Media uploaded since the freeze is not served without a token...
    let legacy = format!("{}/_matrix/media/v3/download/{media}", server.url);
    let r = http().get(&legacy).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(errcode(&r.json().await.unwrap()), "M_NOT_FOUND");
    // ...unless the operator says so.
    let open = Server::start_with_config("[media]\nlegacy_unauthenticated = \"all\"\n");
    let bob = Api::register(&open, "bob").await;
    let media = bob.upload("hello", "text/plain").await;
    let r = http()
        .get(format!("{}/_matrix/media/v3/download/{media}", open.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello");
}

/// Item 21: a client trickling its headers is cut off, and one address
/// cannot hold more than its share of connections, unless it is a reverse
/// proxy's (`unlimited_addresses`, here 127.0.0.2 and not 127.0.0.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_and_connections_per_address_are_bounded() {
    let server = Server::start_with_config(
        "[limits]\nheader_read_timeout_ms = 1000\nmax_connections_per_address = 8\nunlimited_addresses = [\"127.0.0.2\"]\n",
    );
    let addr = address(&server);
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /_matrix/client/versions HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if slow.write_all(b"X-Trickle: 1\r\n").await.is_err() {
            break;
        }
    }
    assert!(
        closed_within(&mut slow, Duration::from_secs(5)).await,
        "a trickling client is cut off"
    );
    assert!(started.elapsed() < Duration::from_secs(8));

    let mut held = vec![];
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ninth = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(&mut ninth, Duration::from_secs(3)).await,
        "the ninth connection is closed at once"
    );
    let other = http_from(Ipv4Addr::new(127, 0, 0, 3))
        .get(format!("{}/_matrix/client/versions", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200, "other addresses are served");
    let mut proxied = vec![];
    for _ in 0..12 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        proxied.push(socket.connect(addr).await.unwrap());
    }
    let last = proxied.last_mut().unwrap();
    last.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), last.read_to_string(&mut answer))
        .await
        .expect("the proxy's twelfth connection is answered")
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "an unlimited address is served past the limit: {answer}"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while http().get(format!("{}/health", server.url)).send().await.is_err() {
        assert!(Instant::now() < deadline, "closed connections give their places back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Item 22: send-to-device has a size limit per message and per request and
/// a rate per sender, and a sync response stays bounded in size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_device_sizes_and_rates_are_bounded() {
    let server = Server::start_with_config("[limits]\nto_device_messages_per_second = 1\nto_device_burst = 3\n");
    let alice = Api::register(&server, "alice").await;
    let bob = Api::register(&server, "bob").await;
    let send = |txn: &str, messages: Value| {
        let alice = &alice;
        let path = format!("/sendToDevice/m.test/{txn}");
        async move { alice.req(M::PUT, &path, Some(json!({"messages": messages}))).await }
    };
    let big = "x".repeat(70 * 1024);
    let (s, v) = send("big", json!({bob.user_id.clone(): {bob.device_id.clone(): {"blob": big}}})).await;
    assert_eq!((s, errcode(&v)), (413, "M_TOO_LARGE"), "one message over 64 KiB");
    let to_bob = |n: usize| json!({bob.user_id.clone(): {bob.device_id.clone(): {"n": n}}});
    for i in 0..3 {
        let (s, v) = send(&format!("t{i}"), to_bob(i)).await;
        assert_eq!(s, 200, "{v}");
    }
    let (s, v) = send("t3", to_bob(3)).await;
    assert_eq!((s, errcode(&v)), (429, "M_LIMIT_EXCEEDED"), "past the burst: {v}");
    assert!(v["retry_after_ms"].as_u64().unwrap() > 0);
    let many: serde_json::Map<String, Value> = (0..10).map(|i| (format!("D{i}"), json!({}))).collect();
    let (s, v) = send("many", json!({bob.user_id.clone(): many})).await;
    assert_eq!(
        (s, errcode(&v)),
        (413, "M_TOO_LARGE"),
        "more than a whole burst in one request: {v}"
    );

    // A sync carries at most about half a MiB of messages; the rest follow.
    let roomy = Server::start();
    let alice = Api::register(&roomy, "alice").await;
    let bob = Api::register(&roomy, "bob").await;
    let chunk = "y".repeat(60 * 1024);
    let mut sent = 0;
    for request in 0..10 {
        let messages: serde_json::Map<String, Value> = [(bob.device_id.clone(), json!({"n": request, "pad": chunk}))].into_iter().collect();
        for k in 0..4 {
            alice
                .ok(
                    M::PUT,
                    &format!("/sendToDevice/m.test/r{request}-{k}"),
                    Some(json!({"messages": {bob.user_id.clone(): messages}})),
                )
                .await;
            sent += 1;
        }
    }
    let mut since = String::new();
    let mut received = 0;
    let mut responses = 0;
    while received < sent {
        let path = if since.is_empty() {
            "/sync?timeout=0".to_owned()
        } else {
            format!("/sync?timeout=0&since={since}")
        };
        let r = http()
            .get(format!("{}/_matrix/client/v3{path}", roomy.url))
            .bearer_auth(&bob.token)
            .send()
            .await
            .unwrap();
        let body = r.bytes().await.unwrap();
        assert!(body.len() < 1024 * 1024, "one sync response is {} bytes", body.len());
        let v: Value = serde_json::from_slice(&body).unwrap();
        received += v["to_device"]["events"].as_array().unwrap().len();
        since = v["next_batch"].as_str().unwrap().to_owned();
        responses += 1;
        assert!(responses < 20, "every message arrives");
    }
    assert_eq!(received, sent, "each exactly once");
    assert!(responses > 2, "spread over several responses");
}

/// Item 23: control characters are refused in ids, names, types and state
/// keys; names people trust as staff are reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_and_reserved_names_are_refused() {
    let server = Server::start();
    let alice = Api::register(&server, "alice").await;
    let room = alice.create_room(json!({})).await;
    for login in [
        json!({"type": "m.login.password", "user": "alice", "password": "pw", "device_id": "BAD\u{0}ID"}),
        json!({"type": "m.login.password", "user": "alice", "password": "pw", "initial_device_display_name": "two\nlines"}),
    ] {
        let (s, v) = post_public(&server.url, "/login", login).await;
        assert_eq!((s, errcode(&v)), (400, "M_INVALID_PARAM"), "{v}");
    }
    let devices = alice.ok(M::GET, "/devices", None).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1, "no device was made");

    for (method, path, body) in [
        (
            M::PUT,
            "/profile/@alice:localhost/displayname".to_owned(),
            json!({"displayname": "nul\u{0}name"}),
        ),
        (
            M::PUT,
            format!("/devices/{}", alice.device_id),
            json!({"display_name": "bell\u{7}"}),
        ),
        (
            M::PUT,
            format!("/rooms/{}/state/m.room.topic/key%00", enc(&room)),
            json!({"topic": "x"}),
        ),
        (M::PUT, format!("/rooms/{}/send/m.bad%01type/t1", enc(&room)), json!({})),
        (M::PUT, "/user/@alice:localhost/account_data/m.bad%0Atype".to_owned(), json!({})),
    ] {
        let (s, v) = alice.req(method, &path, Some(body)).await;
        assert_eq!((s, errcode(&v)), (400, "M_INVALID_PARAM"), "{path}: {v}");
    }
    let profile = alice.ok(M::GET, "/profile/@alice:localhost", None).await;
    assert!(profile.get("displayname").is_none(), "nothing was stored: {profile}");

    for name in ["admin", "postmaster", "abuse", "support", "root", "_bridge_bot"] {
        let signup = json!({"username": name, "password": "pw", "auth": {"type": "m.login.dummy"}});
        let (s, v) = post_public(&server.url, "/register", signup).await;
        assert_eq!((s, errcode(&v)), (400, "M_INVALID_USERNAME"), "{name}: {v}");
    }
    let (s, v) = alice.req(M::GET, "/register/available?username=admin", None).await;
    assert_eq!((s, errcode(&v)), (400, "M_INVALID_USERNAME"), "{v}");
    // The operator may still make one.
    let out = server.admin(&["create-user", "admin", "--password", "operator-pw"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The list is the operator's to change.
    let relaxed = Server::start_with_config("[registration]\nreserved_localparts = []\n");
    Api::register(&relaxed, "admin").await;
}

/// Item 24: the user directory finds users who share a room with the
/// searcher or are in a public room, not everyone; all of them if configured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_user_directory_shows_only_users_one_may_know_of() {
    for (config, everyone) in [("", false), ("[user_directory]\nsearch_all_users = true\n", true)] {
        let server = Server::start_with_config(config);
        let searcher = Api::register(&server, "searcher").await;
        let friend = Api::register(&server, "friend").await;
        let public = Api::register(&server, "publicperson").await;
        Api::register(&server, "stranger").await;
        let shared = searcher.create_room(json!({"invite": [friend.user_id]})).await;
        friend.join(&shared).await;
        public.create_room(json!({"preset": "public_chat"})).await;
        let found = |term: &'static str| {
            let searcher = &searcher;
            async move {
                let r = searcher
                    .ok(M::POST, "/user_directory/search", Some(json!({"search_term": term})))
                    .await;
                r["results"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|u| u["user_id"].as_str().unwrap().to_owned())
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(found("friend").await, ["@friend:localhost"], "shares a room");
        assert_eq!(found("publicperson").await, ["@publicperson:localhost"], "is in a public room");
        let strangers = found("stranger").await;
        if everyone {
            assert_eq!(strangers, ["@stranger:localhost"], "search_all_users finds everyone");
        } else {
            assert!(strangers.is_empty(), "a stranger is not listed: {strangers:?}");
        }
    }
}
