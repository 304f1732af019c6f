//! Durability across kill -9, send idempotency, and the sync long-poll.

mod common;

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use common::{Server, enc, http};
use futures::{StreamExt, stream};
use serde_json::{Value, json};

async fn post(url: String, token: Option<&str>, body: Value) -> Value {
    let mut r = http().post(url).json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap().json().await.unwrap()
}

async fn get(url: String, token: &str) -> Value {
    http().get(url).bearer_auth(token).send().await.unwrap().json().await.unwrap()
}

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
