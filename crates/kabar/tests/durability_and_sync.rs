//! Durability across kill -9 and SIGTERM, send idempotency, and the sync long-poll.

mod common;

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use common::{Server, enc, get_json as get, http, post_json as post};
use futures::{StreamExt, stream};
use serde_json::{Value, json};

async fn put(url: String, token: &str, body: Value) -> (u16, Value) {
    let resp = http().put(url).bearer_auth(token).json(&body).send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

async fn setup(server: &Server) -> (String, String) {
    let r = post(
        format!("{}/_matrix/client/v3/register", server.url),
        None,
        json!({"username": "alice", "password": "pw", "auth": {"type": "m.login.dummy"}}),
    )
    .await;
    let token = r["access_token"].as_str().unwrap().to_owned();
    let room = post(format!("{}/_matrix/client/v3/createRoom", server.url), Some(&token), json!({})).await;
    (token, room["room_id"].as_str().unwrap().to_owned())
}

/// Every message in the room, oldest first, by paging backwards.
async fn all_messages(url: &str, token: &str, room: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut from = String::new();
    loop {
        let q = if from.is_empty() { String::new() } else { format!("&from={from}") };
        let page = get(
            format!("{url}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100{q}", enc(room)),
            token,
        )
        .await;
        for e in page["chunk"].as_array().unwrap() {
            if e["type"] == "m.room.message" {
                out.push((
                    e["event_id"].as_str().unwrap().to_owned(),
                    e["content"]["body"].as_str().unwrap().to_owned(),
                ));
            }
        }
        match page["end"].as_str() {
            Some(end) => from = end.to_owned(),
            None => break,
        }
    }
    out.reverse();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_sends_survive_kill_9_exactly_once() {
    let mut server = Server::start();
    let (token, room) = setup(&server).await;
    let url = server.url.clone();

    // A burst of concurrent sends; keep every acknowledgement.
    let acked: Vec<(String, String)> = stream::iter(0..400)
        .map(|i| {
            let (url, token, room) = (url.clone(), token.clone(), room.clone());
            async move {
                let (s, v) = put(
                    format!("{url}/_matrix/client/v3/rooms/{}/send/m.room.message/burst{i}", enc(&room)),
                    &token,
                    json!({"msgtype": "m.text", "body": format!("m{i}")}),
                )
                .await;
                assert_eq!(s, 200, "{v}");
                (v["event_id"].as_str().unwrap().to_owned(), format!("burst{i}"))
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    server.kill9();

    let tmp = server.take_tmp();
    let restarted = Server::start_in(server.data_dir(), &[]);
    let stored = all_messages(&restarted.url, &token, &room).await;
    let ids: Vec<&String> = stored.iter().map(|(id, _)| id).collect();
    let unique: HashSet<&String> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "no event stored twice");
    for (id, _) in &acked {
        assert!(unique.contains(id), "acknowledged event {id} lost after kill -9");
    }
    assert_eq!(stored.len(), 400);

    // The transaction ids are remembered across the restart: a retry is not a new event.
    let (s, v) = put(
        format!(
            "{}/_matrix/client/v3/rooms/{}/send/m.room.message/{}",
            restarted.url,
            enc(&room),
            acked[7].1
        ),
        &token,
        json!({"msgtype": "m.text", "body": "retry"}),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["event_id"].as_str().unwrap(), acked[7].0);
    assert_eq!(all_messages(&restarted.url, &token, &room).await.len(), 400);
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_traffic_loses_no_acknowledged_message_and_answers_waiting_syncs() {
    let mut server = Server::start();
    let (token, room) = setup(&server).await;
    let url = server.url.clone();

    // Bob is in no room: his long-poll has nothing to wake it but shutdown.
    let bob = post(
        format!("{url}/_matrix/client/v3/register"),
        None,
        json!({"username": "bob", "password": "pw", "auth": {"type": "m.login.dummy"}}),
    )
    .await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let since = get(format!("{url}/_matrix/client/v3/sync"), &bob).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();
    let waiting = {
        let url = format!("{url}/_matrix/client/v3/sync?since={since}&timeout=60000");
        tokio::spawn(async move {
            let r = http().get(url).bearer_auth(bob).send().await;
            (Instant::now(), r.map(|r| r.status().as_u16()))
        })
    };

    // Eight senders send as fast as they can until the server stops answering.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let mut senders = vec![];
    for sender in 0..8 {
        let (url, token, room, acked) = (url.clone(), token.clone(), room.clone(), acked.clone());
        senders.push(tokio::spawn(async move {
            for i in 0.. {
                let txn = format!("term{sender}-{i}");
                let sent = http()
                    .put(format!("{url}/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room)))
                    .bearer_auth(&token)
                    .json(&json!({"msgtype": "m.text", "body": txn}))
                    .send()
                    .await;
                let Ok(resp) = sent else { break };
                if resp.status() != 200 {
                    break;
                }
                let Ok(v) = resp.json::<Value>().await else { break };
                acked.lock().unwrap().push((v["event_id"].as_str().unwrap().to_owned(), txn));
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.signal("TERM");
    let signalled = Instant::now();
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server exits within its shutdown deadline");
    assert!(status.success(), "a graceful shutdown exits cleanly: {status:?}");
    for s in senders {
        s.await.unwrap();
    }
    let (answered_at, answer) = waiting.await.unwrap();
    assert_eq!(answer.expect("the waiting sync was answered, not dropped"), 200);
    assert!(
        answered_at.duration_since(signalled) < Duration::from_secs(5),
        "the waiting sync was answered at shutdown, not at its timeout"
    );

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 10, "traffic was flowing: {} acknowledged", acked.len());
    let tmp = server.take_tmp();
    let restarted = Server::start_in(server.data_dir(), &[]);
    let stored = all_messages(&restarted.url, &token, &room).await;
    let ids: HashSet<&String> = stored.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), stored.len(), "no event stored twice");
    for (id, txn) in &acked {
        assert!(ids.contains(id), "acknowledged {txn} ({id}) lost across SIGTERM");
    }
    eprintln!("SIGTERM: {} acknowledged, {} stored", acked.len(), stored.len());
    drop(tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_wakes_on_a_new_message_and_sends_are_idempotent() {
    let server = Server::start();
    let (token, room) = setup(&server).await;
    let url = server.url.clone();
    let first = get(format!("{url}/_matrix/client/v3/sync"), &token).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();

    // A sync with nothing new waits; a send wakes it long before its timeout.
    let waiter = {
        let (url, token, since) = (url.clone(), token.clone(), since.clone());
        tokio::spawn(async move {
            let start = Instant::now();
            let v = get(format!("{url}/_matrix/client/v3/sync?since={since}&timeout=20000"), &token).await;
            (start.elapsed(), v)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, sent) = put(
        format!("{url}/_matrix/client/v3/rooms/{}/send/m.room.message/once", enc(&room)),
        &token,
        json!({"msgtype": "m.text", "body": "wake up"}),
    )
    .await;
    assert_eq!(s, 200);
    let (elapsed, v) = waiter.await.unwrap();
    assert!(
        elapsed < Duration::from_secs(15),
        "the sync returned on the event, not the timeout ({elapsed:?})"
    );
    let timeline = &v["rooms"]["join"][&room]["timeline"]["events"];
    let event = timeline
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_id"] == sent["event_id"])
        .expect("event in the woken sync");
    assert_eq!(
        event["unsigned"]["transaction_id"], "once",
        "the sender's device sees its transaction id"
    );

    // Same transaction id again: same event, nothing new stored.
    let (_, again) = put(
        format!("{url}/_matrix/client/v3/rooms/{}/send/m.room.message/once", enc(&room)),
        &token,
        json!({"msgtype": "m.text", "body": "wake up"}),
    )
    .await;
    assert_eq!(again["event_id"], sent["event_id"]);
    assert_eq!(all_messages(&url, &token, &room).await.len(), 1);

    // An empty incremental sync times out with the same position.
    let next = v["next_batch"].as_str().unwrap();
    let start = Instant::now();
    let empty = get(format!("{url}/_matrix/client/v3/sync?since={next}&timeout=300"), &token).await;
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert!(empty["rooms"]["join"].as_object().unwrap().is_empty());

    // A token from the future cannot be trusted: the client gets a fresh initial sync.
    let reset = get(format!("{url}/_matrix/client/v3/sync?since=s999999999_0&timeout=5000"), &token).await;
    let state = reset["rooms"]["join"][&room]["state"]["events"]
        .as_array()
        .expect("room in a full sync");
    let timeline = reset["rooms"]["join"][&room]["timeline"]["events"].as_array().unwrap();
    assert!(state.iter().chain(timeline).any(|e| e["type"] == "m.room.create"));
}

/// A user with a token, registered on `server`.
async fn register(server: &Server, name: &str) -> String {
    let r = post(
        format!("{}/_matrix/client/v3/register", server.url),
        None,
        json!({"username": name, "password": "pw", "auth": {"type": "m.login.dummy"}}),
    )
    .await;
    r["access_token"].as_str().unwrap().to_owned()
}

/// An incremental sync with a timeline limit, returning the room's section and the next token.
async fn sync_room(url: &str, token: &str, since: &str, limit: u32, room: &str) -> (Value, String) {
    let filter = json!({"room": {"timeline": {"limit": limit}}}).to_string();
    let v = get(
        format!("{url}/_matrix/client/v3/sync?since={since}&timeout=0&filter={}", enc(&filter)),
        token,
    )
    .await;
    (v["rooms"]["join"][room].clone(), v["next_batch"].as_str().unwrap().to_owned())
}

fn bodies(room_section: &Value) -> Vec<String> {
    room_section["timeline"]["events"]
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter(|e| e["type"] == "m.room.message")
                .map(|e| e["content"]["body"].as_str().unwrap_or("<redacted>").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Recent timelines, unread counts, receipts and account data come from memory
/// when a sync is only a little behind and from the store otherwise; both must
/// give the same answers, before and after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incremental_syncs_agree_whether_served_from_memory_or_the_store() {
    let mut server = Server::start();
    let (alice, room) = setup(&server).await;
    let bob = register(&server, "bob").await;
    let url = server.url.clone();
    post(
        format!("{url}/_matrix/client/v3/rooms/{}/invite", enc(&room)),
        Some(&alice),
        json!({"user_id": "@bob:localhost"}),
    )
    .await;
    let joined = post(format!("{url}/_matrix/client/v3/join/{}", enc(&room)), Some(&bob), json!({})).await;
    assert_eq!(joined["room_id"], room.as_str(), "{joined}");
    let t0 = get(format!("{url}/_matrix/client/v3/sync?timeout=0"), &bob).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut ids = vec![];
    let mut t90 = String::new();
    for i in 0..100 {
        let (s, v) = put(
            format!("{url}/_matrix/client/v3/rooms/{}/send/m.room.message/m{i}", enc(&room)),
            &alice,
            json!({"msgtype": "m.text", "body": format!("m{i}")}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        ids.push(v["event_id"].as_str().unwrap().to_owned());
        if i == 89 {
            t90 = sync_room(&url, &bob, &t0, 1, &room).await.1;
        }
    }
    let expected = |range: std::ops::Range<usize>| range.map(|i| format!("m{i}")).collect::<Vec<_>>();

    // Ten behind: within the in-memory window.
    let (near, _) = sync_room(&url, &bob, &t90, 50, &room).await;
    assert_eq!(bodies(&near), expected(90..100), "{near} since {t90} from {t0}");
    assert_eq!(near["timeline"]["limited"], false);
    assert_eq!(near["unread_notifications"]["notification_count"], 100);
    // A hundred behind: past the window, from the store.
    let (far, _) = sync_room(&url, &bob, &t0, 200, &room).await;
    assert_eq!(bodies(&far), expected(0..100));
    assert_eq!(far["timeline"]["limited"], false);
    // A small limit gives the newest events and a gap to page back through.
    let (short, _) = sync_room(&url, &bob, &t0, 5, &room).await;
    assert_eq!(bodies(&short), expected(95..100));
    assert_eq!(short["timeline"]["limited"], true);
    let prev = short["timeline"]["prev_batch"].as_str().unwrap();
    let page = get(
        format!("{url}/_matrix/client/v3/rooms/{}/messages?dir=b&limit=3&from={prev}", enc(&room)),
        &bob,
    )
    .await;
    let paged: Vec<&str> = page["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(paged, ["m94", "m93", "m92"]);

    // A read receipt moves the unread count; later messages are counted on top.
    let (_, mut since) = sync_room(&url, &bob, &t90, 50, &room).await;
    let receipt = post(
        format!("{url}/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&ids[49])),
        Some(&bob),
        json!({}),
    )
    .await;
    assert_eq!(receipt, json!({}));
    let (section, next) = sync_room(&url, &bob, &since, 50, &room).await;
    let receipt = section["ephemeral"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.receipt")
        .expect("the receipt in the next sync");
    assert!(receipt["content"][&ids[49]]["m.read"].get("@bob:localhost").is_some(), "{receipt}");
    assert_eq!(section["unread_notifications"]["notification_count"], 50);
    since = next;
    put(
        format!("{url}/_matrix/client/v3/rooms/{}/send/m.room.message/extra", enc(&room)),
        &alice,
        json!({"msgtype": "m.text", "body": "m100"}),
    )
    .await;
    let (section, next) = sync_room(&url, &bob, &since, 50, &room).await;
    assert_eq!(bodies(&section), ["m100"]);
    assert_eq!(section["unread_notifications"]["notification_count"], 51);
    assert!(
        section["ephemeral"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["type"] != "m.receipt"),
        "an unchanged receipt is not sent again"
    );
    since = next;

    // Account data shows once, in the sync after it was set.
    let (s, _) = put(
        format!("{url}/_matrix/client/v3/user/@bob:localhost/account_data/org.example.x"),
        &bob,
        json!({"n": 1}),
    )
    .await;
    assert_eq!(s, 200);
    let v = get(format!("{url}/_matrix/client/v3/sync?since={since}&timeout=0"), &bob).await;
    assert!(
        v["account_data"]["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["type"] == "org.example.x")
    );
    let v = get(
        format!("{url}/_matrix/client/v3/sync?since={}&timeout=0", v["next_batch"].as_str().unwrap()),
        &bob,
    )
    .await;
    assert!(v["account_data"]["events"].as_array().unwrap().is_empty());

    // A redaction in the window: the old token now sees the event redacted.
    put(
        format!("{url}/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room), enc(&ids[99])),
        &alice,
        json!({}),
    )
    .await;
    let (near, _) = sync_room(&url, &bob, &t90, 50, &room).await;
    let events = near["timeline"]["events"].as_array().unwrap();
    let redacted = events.iter().find(|e| e["event_id"] == ids[99].as_str()).unwrap();
    assert_eq!(redacted["content"], json!({}));
    assert!(events.iter().any(|e| e["type"] == "m.room.redaction"));

    // After a restart every answer comes from the store, and is the same.
    server.kill9();
    let tmp = server.take_tmp();
    let restarted = Server::start_in(server.data_dir(), &[]);
    let url = restarted.url.clone();
    let (near_again, _) = sync_room(&url, &bob, &t90, 50, &room).await;
    assert_eq!(bodies(&near_again), bodies(&near));
    assert_eq!(near_again["unread_notifications"]["notification_count"], 51);
    let (far, _) = sync_room(&url, &bob, &t0, 200, &room).await;
    assert_eq!(bodies(&far).len(), 101);

    // Leaving shows the room under "leave"; forgetting it removes it for good.
    let leave_filter = enc(&json!({"room": {"include_leave": true}}).to_string());
    post(format!("{url}/_matrix/client/v3/rooms/{}/leave", enc(&room)), Some(&bob), json!({})).await;
    let v = get(format!("{url}/_matrix/client/v3/sync?timeout=0&filter={leave_filter}"), &bob).await;
    assert!(v["rooms"]["leave"].get(&room).is_some(), "{}", v["rooms"]);
    post(
        format!("{url}/_matrix/client/v3/rooms/{}/forget", enc(&room)),
        Some(&bob),
        json!({}),
    )
    .await;
    let v = get(format!("{url}/_matrix/client/v3/sync?timeout=0&filter={leave_filter}"), &bob).await;
    assert!(v["rooms"]["leave"].get(&room).is_none(), "{}", v["rooms"]);
    drop(tmp);
}
