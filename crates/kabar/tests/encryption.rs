//! End-to-end encryption against the real binary: real clients (matrix-sdk
//! with its e2e-encryption feature) chat in an encrypted room, a later device
//! restores the history from key backup and is cross-signed; one-time keys
//! under concurrent claims; to-device delivery across a kill -9; no
//! plaintext in the database.

mod common;

use std::{collections::HashSet, time::Duration};

use common::{Server, get_json, http, post_json, registered};
use matrix_sdk::{
    Client,
    config::SyncSettings,
    deserialized_responses::TimelineEvent,
    encryption::{BackupDownloadStrategy, EncryptionSettings},
    room::MessagesOptions,
    ruma::{
        OwnedRoomId,
        api::client::room::create_room,
        events::{
            AnySyncMessageLikeEvent, AnySyncTimelineEvent, InitialStateEvent, SyncMessageLikeEvent,
            room::{encryption::RoomEncryptionEventContent, message::RoomMessageEventContent},
        },
    },
};
use serde_json::{Value, json};

fn settings() -> SyncSettings {
    SyncSettings::default().timeout(Duration::from_secs(2))
}

/// The bodies of the decrypted text messages among `events`.
fn decrypted_bodies(events: &[TimelineEvent]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.encryption_info().is_some())
        .filter_map(|e| match e.raw().deserialize().ok()? {
            AnySyncTimelineEvent::MessageLike(AnySyncMessageLikeEvent::RoomMessage(SyncMessageLikeEvent::Original(m))) => {
                Some(m.content.body().to_owned())
            }
            _ => None,
        })
        .collect()
}

/// Syncs `client` until the room's timeline has delivered every body in
/// `wanted`, decrypted.
async fn sync_until_decrypted(client: &Client, room_id: &OwnedRoomId, wanted: &[&str]) {
    let mut seen: Vec<String> = vec![];
    for _ in 0..20 {
        let response = client.sync_once(settings()).await.expect("sync");
        if let Some(room) = response.rooms.joined.get(room_id) {
            seen.extend(decrypted_bodies(&room.timeline.events));
        }
        if wanted.iter().all(|w| seen.iter().any(|s| s == w)) {
            return;
        }
    }
    panic!("{} never decrypted {wanted:?}; decrypted: {seen:?}", client.user_id().unwrap());
}

async fn device_client(url: &str) -> Client {
    Client::builder()
        .homeserver_url(url)
        .with_encryption_settings(EncryptionSettings {
            backup_download_strategy: BackupDownloadStrategy::AfterDecryptionFailure,
            ..EncryptionSettings::default()
        })
        .build()
        .await
        .expect("build client")
}

/// Every stored byte of the server's database (main file and write-ahead log).
fn database_bytes(server: &Server) -> Vec<u8> {
    common::stored_bytes(server)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_chat_then_a_new_device_restores_history_from_backup_and_is_cross_signed() {
    let server = Server::start();
    let alice = registered(&server.url, "alice").await;
    let bob = registered(&server.url, "bob").await;
    let (alice_id, bob_id) = (alice.user_id().unwrap().to_owned(), bob.user_id().unwrap().to_owned());
    // First syncs upload each device's identity and one-time keys.
    alice.sync_once(settings()).await.unwrap();
    bob.sync_once(settings()).await.unwrap();

    // Alice sets up cross-signing (the first keys need no password), then
    // recovery: a key backup and secret storage, all on the server.
    alice.encryption().bootstrap_cross_signing(None).await.expect("cross-signing keys");
    assert!(alice.encryption().cross_signing_status().await.unwrap().is_complete());
    let recovery_key = alice.encryption().recovery().enable().await.expect("enable recovery");

    let mut req = create_room::v3::Request::new();
    req.invite = vec![bob_id.clone()];
    req.is_direct = true;
    req.initial_state = vec![InitialStateEvent::with_empty_state_key(RoomEncryptionEventContent::with_recommended_defaults()).to_raw_any()];
    let room = alice.create_room(req).await.expect("create encrypted room");
    let room_id = room.room_id().to_owned();
    bob.sync_once(settings()).await.unwrap();
    bob.join_room_by_id(&room_id).await.expect("bob joins");
    alice.sync_once(settings()).await.unwrap();
    assert!(room.latest_encryption_state().await.unwrap().is_encrypted());

    let from_alice = ["tea at five? 7f3c9a", "bring the cake 7f3c9a"];
    for body in from_alice {
        room.send(RoomMessageEventContent::text_plain(body)).await.expect("alice sends");
    }
    sync_until_decrypted(&bob, &room_id, &from_alice).await;
    let bob_room = bob.get_room(&room_id).unwrap();
    let from_bob = "five is fine 7f3c9a";
    bob_room
        .send(RoomMessageEventContent::text_plain(from_bob))
        .await
        .expect("bob sends");
    sync_until_decrypted(&alice, &room_id, &[from_bob]).await;
    alice
        .encryption()
        .backups()
        .wait_for_steady_state()
        .await
        .expect("room keys backed up");

    // Alice's second device logs in later: it had no keys when the messages
    // were sent, so it reads them only through the backup.
    let alice2 = device_client(&server.url).await;
    alice2
        .matrix_auth()
        .login_username("alice", "alice-password")
        .initial_device_display_name("laptop")
        .send()
        .await
        .expect("second login");
    alice2.sync_once(settings()).await.unwrap();
    alice2
        .encryption()
        .recovery()
        .recover(&recovery_key)
        .await
        .expect("recover from secret storage");
    let own = alice2.encryption().get_own_device().await.unwrap().unwrap();
    assert!(
        own.is_cross_signed_by_owner(),
        "recovery signs the new device with the self-signing key"
    );
    alice2
        .encryption()
        .backups()
        .download_room_keys_for_room(&room_id)
        .await
        .expect("download room keys");
    let room2 = alice2.get_room(&room_id).expect("room known to the new device");
    let mut options = MessagesOptions::backward();
    options.limit = 50u32.into();
    let history = room2.messages(options).await.expect("history");
    let bodies = decrypted_bodies(&history.chunk);
    for body in from_alice.iter().chain([&from_bob]) {
        assert!(
            bodies.iter().any(|b| b == body),
            "new device could not read {body:?}; read {bodies:?}"
        );
    }

    // Bob sees the new device as Alice's: its signature reached him through /keys/query.
    bob.sync_once(settings()).await.unwrap();
    let device = bob
        .encryption()
        .get_device(&alice_id, alice2.device_id().unwrap())
        .await
        .unwrap()
        .expect("bob knows alice's new device");
    assert!(device.is_cross_signed_by_owner(), "the new device's cross-signature is published");

    // The server stored ciphertext only. The same check finds a marker that
    // was sent in the clear, so it would find a leaked message too.
    let plain = alice.create_room(create_room::v3::Request::new()).await.expect("unencrypted room");
    plain
        .send(RoomMessageEventContent::text_plain("in the clear 5d1e08"))
        .await
        .unwrap();
    let stored = database_bytes(&server);
    assert!(contains(&stored, "in the clear 5d1e08"), "the check reads what the server stored");
    for body in from_alice.iter().chain([&from_bob]) {
        assert!(!contains(&stored, body), "plaintext {body:?} is in the database");
    }
    assert!(!contains(&stored, "7f3c9a"), "no fragment of the encrypted messages is stored");
}

/// Logs in a fresh device of `user` over raw HTTP; returns its token and device id.
async fn login(url: &str, user: &str) -> (String, String) {
    let r = post_json(
        format!("{url}/_matrix/client/v3/login"),
        None,
        json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": user }, "password": format!("{user}-password"), "initial_device_display_name": format!("{user}'s laptop") }),
    )
    .await;
    (
        r["access_token"].as_str().unwrap().to_owned(),
        r["device_id"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_never_hand_out_a_one_time_key_twice() {
    let server = Server::start();
    let url = server.url.clone();
    registered(&url, "owner").await;
    registered(&url, "claimer").await;
    let (owner_token, owner_device) = login(&url, "owner").await;
    let (claimer_token, _) = login(&url, "claimer").await;
    let pool: serde_json::Map<String, Value> = (0..20)
        .map(|i| {
            (
                format!("signed_curve25519:K{i:02}"),
                json!({ "key": format!("pub{i}"), "signatures": {} }),
            )
        })
        .collect();
    let uploaded = post_json(
        format!("{url}/_matrix/client/v3/keys/upload"),
        Some(&owner_token),
        json!({ "one_time_keys": pool, "fallback_keys": { "signed_curve25519:FB": { "key": "fallback", "fallback": true, "signatures": {} } } }),
    )
    .await;
    assert_eq!(uploaded["one_time_key_counts"]["signed_curve25519"], 20);

    let claims = (0..100).map(|_| {
        let (url, token, device) = (url.clone(), claimer_token.clone(), owner_device.clone());
        tokio::spawn(async move {
            let r = post_json(
                format!("{url}/_matrix/client/v3/keys/claim"),
                Some(&token),
                json!({ "one_time_keys": { "@owner:localhost": { device.clone(): "signed_curve25519" } } }),
            )
            .await;
            let keys = r["one_time_keys"]["@owner:localhost"][device.as_str()]
                .as_object()
                .cloned()
                .unwrap_or_default();
            keys.keys().cloned().collect::<Vec<_>>()
        })
    });
    let mut handed_out = vec![];
    for c in claims.collect::<Vec<_>>() {
        handed_out.extend(c.await.unwrap());
    }
    assert_eq!(handed_out.len(), 100, "every claim got a key (one-time or fallback)");
    let one_time: Vec<&String> = handed_out.iter().filter(|k| *k != "signed_curve25519:FB").collect();
    let distinct: HashSet<&&String> = one_time.iter().collect();
    assert_eq!(one_time.len(), 20, "the whole pool was handed out: {one_time:?}");
    assert_eq!(distinct.len(), 20, "no one-time key was handed out twice: {one_time:?}");

    let sync = get_json(format!("{url}/_matrix/client/v3/sync"), &owner_token).await;
    assert_eq!(sync["device_one_time_keys_count"]["signed_curve25519"], 0);
    assert_eq!(
        sync["device_unused_fallback_key_types"],
        json!([]),
        "the fallback key was used, so the client should upload a new one"
    );
}

/// One raw `/sync` of a device; returns the to-device contents' `n` and the next token.
async fn to_device_sync(url: &str, token: &str, since: Option<&str>) -> (Vec<u64>, String) {
    let query = since.map(|s| format!("?since={s}&timeout=0")).unwrap_or_default();
    let r = get_json(format!("{url}/_matrix/client/v3/sync{query}"), token).await;
    let numbers = r["to_device"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["type"], "m.test.ping");
            assert_eq!(e["sender"], "@sender:localhost");
            e["content"]["n"].as_u64().unwrap()
        })
        .collect();
    (numbers, r["next_batch"].as_str().unwrap().to_owned())
}

async fn send_to_device(url: &str, token: &str, txn: &str, device: &str, n: u64) {
    let r = http()
        .put(format!("{url}/_matrix/client/v3/sendToDevice/m.test.ping/{txn}"))
        .bearer_auth(token)
        .json(&json!({ "messages": { "@receiver:localhost": { device: { "n": n } } } }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn to_device_messages_arrive_in_order_once_acknowledged_and_survive_kill_9() {
    let mut server = Server::start();
    let url = server.url.clone();
    registered(&url, "sender").await;
    registered(&url, "receiver").await;
    let (sender, _) = login(&url, "sender").await;
    let (phone, phone_id) = login(&url, "receiver").await;
    let (laptop, _) = login(&url, "receiver").await;

    // 250 messages: more than one response carries (100), so three syncs.
    for n in 1..=250 {
        send_to_device(&url, &sender, &format!("t{n}"), &phone_id, n).await;
    }
    // A retried transaction queues nothing new.
    send_to_device(&url, &sender, "t7", &phone_id, 9999).await;
    let mut received = vec![];
    let mut since: Option<String> = None;
    for _ in 0..3 {
        let (batch, next) = to_device_sync(&url, &phone, since.as_deref()).await;
        assert!(batch.len() <= 100);
        received.extend(batch);
        since = Some(next);
    }
    assert_eq!(received, (1..=250).collect::<Vec<_>>(), "all, once each, in order");
    let acknowledged = since.clone().unwrap();

    // Sent to every device of the user.
    send_to_device(&url, &sender, "all", "*", 1000).await;
    let (batch, _) = to_device_sync(&url, &laptop, None).await;
    assert_eq!(batch, [1000], "the laptop gets the wildcard message only");

    // More messages; the phone receives them but its next sync never comes
    // (the response was lost), then the server is killed.
    for n in 251..=260 {
        send_to_device(&url, &sender, &format!("t{n}"), &phone_id, n).await;
    }
    let (batch, unacknowledged_next) = to_device_sync(&url, &phone, Some(&acknowledged)).await;
    assert_eq!(batch, [&[1000u64][..], &(251..=260).collect::<Vec<_>>()].concat());
    server.kill9();
    let restarted = Server::start_in(server.data_dir(), &[]);
    let url = restarted.url.clone();

    // Retrying from the acknowledged token delivers what was not acknowledged, again,
    // and nothing from before the acknowledged position.
    let (batch, next) = to_device_sync(&url, &phone, Some(&acknowledged)).await;
    assert_eq!(batch, [&[1000u64][..], &(251..=260).collect::<Vec<_>>()].concat(), "nothing lost");
    assert_eq!(next, unacknowledged_next);
    send_to_device(&url, &sender, "after-restart", &phone_id, 261).await;
    let (batch, _) = to_device_sync(&url, &phone, Some(&next)).await;
    assert_eq!(batch, [261], "acknowledged messages are not delivered again");
    let (batch, _) = to_device_sync(&url, &phone, Some(&acknowledged)).await;
    assert_eq!(
        batch,
        [261],
        "messages acknowledged by a later token are deleted; the rest is delivered again"
    );
}

/// A device-keys object for `user`'s `device` (the server checks its shape, not its keys).
fn device_keys(user: &str, device: &str, curve: &str) -> Value {
    json!({
        "user_id": user, "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": { format!("curve25519:{device}"): curve, format!("ed25519:{device}"): format!("ed-{device}") },
        "signatures": {}
    })
}

async fn sync_raw(url: &str, token: &str, since: &str, timeout_ms: u64) -> Value {
    get_json(format!("{url}/_matrix/client/v3/sync?since={since}&timeout={timeout_ms}"), token).await
}

fn users_in(v: &Value) -> Vec<String> {
    v.as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_lists_tell_who_changed_and_who_left() {
    let server = Server::start();
    let url = server.url.clone();
    for name in ["alice", "bob", "carol"] {
        registered(&url, name).await;
    }
    let (alice, _) = login(&url, "alice").await;
    let (bob, bob_device) = login(&url, "bob").await;
    let (carol, carol_device) = login(&url, "carol").await;
    let room = post_json(
        format!("{url}/_matrix/client/v3/createRoom"),
        Some(&alice),
        json!({
            "invite": ["@bob:localhost", "@carol:localhost"],
            "initial_state": [{ "type": "m.room.encryption", "state_key": "", "content": { "algorithm": "m.megolm.v1.aes-sha2" } }]
        }),
    )
    .await["room_id"]
        .as_str()
        .unwrap()
        .to_owned();
    post_json(format!("{url}/_matrix/client/v3/join/{room}"), Some(&bob), json!({})).await;
    let start = get_json(format!("{url}/_matrix/client/v3/sync"), &alice).await["next_batch"]
        .as_str()
        .unwrap()
        .to_owned();

    // Bob publishes keys: Alice, who shares the room, is told; a retry of the
    // same keys is not news.
    post_json(
        format!("{url}/_matrix/client/v3/keys/upload"),
        Some(&bob),
        json!({ "device_keys": device_keys("@bob:localhost", &bob_device, "c1") }),
    )
    .await;
    let sync = sync_raw(&url, &alice, &start, 0).await;
    assert_eq!(users_in(&sync["device_lists"]["changed"]), ["@bob:localhost"]);
    let after_bob = sync["next_batch"].as_str().unwrap().to_owned();
    let changes = get_json(format!("{url}/_matrix/client/v3/keys/changes?from={start}&to={after_bob}"), &alice).await;
    assert_eq!(users_in(&changes["changed"]), ["@bob:localhost"]);
    let query = post_json(
        format!("{url}/_matrix/client/v3/keys/query"),
        Some(&alice),
        json!({ "device_keys": { "@bob:localhost": [] } }),
    )
    .await;
    let published = &query["device_keys"]["@bob:localhost"][bob_device.as_str()];
    assert_eq!(published["keys"][format!("curve25519:{bob_device}")], "c1");
    assert_eq!(
        published["unsigned"]["device_display_name"], "bob's laptop",
        "the device's display name is added in unsigned: {published}"
    );

    // Carol, not yet in the room, publishes keys: not Alice's business.
    post_json(
        format!("{url}/_matrix/client/v3/keys/upload"),
        Some(&carol),
        json!({ "device_keys": device_keys("@carol:localhost", &carol_device, "c1") }),
    )
    .await;
    let sync = sync_raw(&url, &alice, &after_bob, 0).await;
    assert!(!users_in(&sync["device_lists"]["changed"]).contains(&"@carol:localhost".to_owned()));
    let before_carol_joins = sync["next_batch"].as_str().unwrap().to_owned();

    // Carol joins the encrypted room: now Alice must fetch her devices.
    post_json(format!("{url}/_matrix/client/v3/join/{room}"), Some(&carol), json!({})).await;
    let sync = sync_raw(&url, &alice, &before_carol_joins, 0).await;
    assert_eq!(users_in(&sync["device_lists"]["changed"]), ["@carol:localhost"]);
    let after_join = sync["next_batch"].as_str().unwrap().to_owned();

    // A waiting sync is woken by a key change.
    let waiting = tokio::spawn({
        let (url, alice, since) = (url.clone(), alice.clone(), after_join.clone());
        async move {
            let started = std::time::Instant::now();
            let sync = sync_raw(&url, &alice, &since, 20_000).await;
            (sync, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    post_json(
        format!("{url}/_matrix/client/v3/keys/upload"),
        Some(&carol),
        json!({ "device_keys": device_keys("@carol:localhost", &carol_device, "c2") }),
    )
    .await;
    let (sync, waited) = waiting.await.unwrap();
    assert!(waited < Duration::from_secs(10), "the key change woke the sync ({waited:?})");
    assert_eq!(users_in(&sync["device_lists"]["changed"]), ["@carol:localhost"]);
    let before_leave = sync["next_batch"].as_str().unwrap().to_owned();

    // Bob leaves the only room he shared with Alice.
    post_json(format!("{url}/_matrix/client/v3/rooms/{room}/leave"), Some(&bob), json!({})).await;
    let sync = sync_raw(&url, &alice, &before_leave, 0).await;
    assert_eq!(users_in(&sync["device_lists"]["left"]), ["@bob:localhost"]);
    assert!(users_in(&sync["device_lists"]["changed"]).is_empty());

    // Removing a device that published keys is a change too.
    let deleted = http()
        .post(format!("{url}/_matrix/client/v3/logout"))
        .bearer_auth(&carol)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    let after_leave = sync["next_batch"].as_str().unwrap().to_owned();
    let sync = sync_raw(&url, &alice, &after_leave, 0).await;
    assert_eq!(users_in(&sync["device_lists"]["changed"]), ["@carol:localhost"]);
    let query = post_json(
        format!("{url}/_matrix/client/v3/keys/query"),
        Some(&alice),
        json!({ "device_keys": { "@carol:localhost": [] } }),
    )
    .await;
    assert_eq!(
        query["device_keys"]["@carol:localhost"],
        json!({}),
        "the logged-out device's keys are gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_cross_signing_keys_needs_the_password_and_signatures_are_checked() {
    let server = Server::start();
    let url = server.url.clone();
    registered(&url, "dana").await;
    let (dana, _) = login(&url, "dana").await;
    let master = |key: &str| json!({ "user_id": "@dana:localhost", "usage": ["master"], "keys": { format!("ed25519:{key}"): key } });
    let upload = |body: Value| {
        let (url, dana) = (url.clone(), dana.clone());
        async move {
            let r = http()
                .post(format!("{url}/_matrix/client/v3/keys/device_signing/upload"))
                .bearer_auth(&dana)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(
        upload(json!({ "master_key": master("MASTERONE") })).await.0,
        200,
        "the first keys need no password"
    );
    assert_eq!(
        upload(json!({ "master_key": master("MASTERONE") })).await.0,
        200,
        "nor does repeating them"
    );
    let (status, challenge) = upload(json!({ "master_key": master("MASTERTWO") })).await;
    assert_eq!(status, 401, "replacing them does: {challenge}");
    assert_eq!(challenge["flows"][0]["stages"][0], "m.login.password");
    let auth = |challenge: &Value| json!({ "type": "m.login.password", "identifier": { "type": "m.id.user", "user": "dana" }, "password": "dana-password", "session": challenge["session"] });
    assert_eq!(
        upload(json!({ "master_key": master("MASTERTWO"), "auth": auth(&challenge) }))
            .await
            .0,
        200
    );
    let query = post_json(
        format!("{url}/_matrix/client/v3/keys/query"),
        Some(&dana),
        json!({ "device_keys": { "@dana:localhost": [] } }),
    )
    .await;
    assert_eq!(query["master_keys"]["@dana:localhost"]["keys"]["ed25519:MASTERTWO"], "MASTERTWO");

    // A self-signing key the master key did not sign is refused.
    let unsigned = json!({ "user_id": "@dana:localhost", "usage": ["self_signing"], "keys": { "ed25519:SELF": "SELF" } });
    let (_, challenge) = upload(json!({ "self_signing_key": unsigned })).await;
    let (status, error) = upload(json!({ "self_signing_key": unsigned, "auth": auth(&challenge) })).await;
    assert_eq!((status, error["errcode"].as_str()), (400, Some("M_INVALID_PARAM")), "{error}");
    // So is a signature upload for a key that does not exist.
    let result = post_json(
        format!("{url}/_matrix/client/v3/keys/signatures/upload"),
        Some(&dana),
        json!({ "@dana:localhost": { "NOSUCHDEVICE": { "signatures": {} } } }),
    )
    .await;
    assert_eq!(result["failures"]["@dana:localhost"]["NOSUCHDEVICE"]["errcode"], "M_NOT_FOUND");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_backup_versions_keys_etags_and_counts() {
    let server = Server::start();
    let url = server.url.clone();
    registered(&url, "erin").await;
    let (erin, _) = login(&url, "erin").await;
    let base = format!("{url}/_matrix/client/v3/room_keys");
    let request = |method: reqwest::Method, path: String, body: Option<Value>| {
        let erin = erin.clone();
        async move {
            let mut r = http().request(method, path).bearer_auth(&erin);
            if let Some(b) = body {
                r = r.json(&b);
            }
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    use reqwest::Method;
    let (status, none) = request(Method::GET, format!("{base}/version"), None).await;
    assert_eq!((status, none["errcode"].as_str()), (404, Some("M_NOT_FOUND")));
    let algorithm = "m.megolm_backup.v1.curve25519-aes-sha2";
    let version_body = json!({ "algorithm": algorithm, "auth_data": { "public_key": "pk" } });
    let (_, created) = request(Method::POST, format!("{base}/version"), Some(version_body.clone())).await;
    let v1 = created["version"].as_str().unwrap().to_owned();
    let room = "!r:localhost";
    let key = |index: u64| json!({ "first_message_index": index, "forwarded_count": 0, "is_verified": false, "session_data": { "ciphertext": format!("c{index}") } });
    let (status, put) = request(Method::PUT, format!("{base}/keys/{room}/S1?version={v1}"), Some(key(5))).await;
    assert_eq!(status, 200, "{put}");
    assert_eq!(put["count"], 1);
    let etag = put["etag"].clone();
    let (_, worse) = request(Method::PUT, format!("{base}/keys/{room}/S1?version={v1}"), Some(key(9))).await;
    assert_eq!(worse["etag"], etag, "a worse copy changes nothing");
    let (_, better) = request(
        Method::PUT,
        format!("{base}/keys?version={v1}"),
        Some(json!({ "rooms": { room: { "sessions": { "S1": key(1), "S2": key(0) } } } })),
    )
    .await;
    assert_eq!(better["count"], 2);
    assert_ne!(better["etag"], etag);
    let (_, one) = request(Method::GET, format!("{base}/keys/{room}/S1?version={v1}"), None).await;
    assert_eq!(one["first_message_index"], 1);
    let (_, in_room) = request(Method::GET, format!("{base}/keys/{room}?version={v1}"), None).await;
    assert_eq!(in_room["sessions"].as_object().unwrap().len(), 2);
    let (status, _) = request(Method::GET, format!("{base}/keys/{room}/NOPE?version={v1}"), None).await;
    assert_eq!(status, 404);
    let (_, info) = request(Method::GET, format!("{base}/version/{v1}"), None).await;
    assert_eq!((info["count"].as_u64(), info["etag"].clone()), (Some(2), better["etag"].clone()));

    // A new version becomes current; writing to the old one is refused with the current one named.
    let (_, created) = request(Method::POST, format!("{base}/version"), Some(version_body)).await;
    let v2 = created["version"].as_str().unwrap().to_owned();
    let (status, wrong) = request(Method::PUT, format!("{base}/keys/{room}/S3?version={v1}"), Some(key(0))).await;
    assert_eq!(status, 403);
    assert_eq!(wrong["errcode"], "M_WRONG_ROOM_KEYS_VERSION");
    assert_eq!(wrong["current_version"].as_str(), Some(v2.as_str()));
    let (status, _) = request(
        Method::PUT,
        format!("{base}/version/{v2}"),
        Some(json!({ "algorithm": "other", "auth_data": {} })),
    )
    .await;
    assert_eq!(status, 400, "the algorithm cannot change");
    let (_, deleted) = request(Method::DELETE, format!("{base}/keys/{room}/S1?version={v1}"), None).await;
    assert_eq!(deleted["count"], 1);
    let (status, _) = request(Method::DELETE, format!("{base}/version/{v2}"), None).await;
    assert_eq!(status, 200);
    let (_, current) = request(Method::GET, format!("{base}/version"), None).await;
    assert_eq!(current["version"].as_str(), Some(v1.as_str()), "the older version is current again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_encryption_requests_get_matrix_errors_and_store_nothing() {
    let server = Server::start();
    let url = server.url.clone();
    registered(&url, "fred").await;
    let (fred, fred_device) = login(&url, "fred").await;
    let v3 = format!("{url}/_matrix/client/v3");
    use reqwest::Method as M;
    let wrong_user_keys = device_keys("@someone:localhost", &fred_device, "c");
    let other_master = json!({ "master_key": { "user_id": "@someone:localhost", "usage": ["master"], "keys": { "ed25519:K": "K" } } });
    let cases: Vec<(M, String, Option<String>, u16, &str)> = vec![
        (
            M::POST,
            format!("{v3}/keys/upload"),
            Some(json!({ "device_keys": wrong_user_keys }).to_string()),
            400,
            "M_INVALID_PARAM",
        ),
        (
            M::POST,
            format!("{v3}/keys/upload"),
            Some(r#"{"one_time_keys":{"nocolon":{}}}"#.into()),
            400,
            "M_INVALID_PARAM",
        ),
        (
            M::POST,
            format!("{v3}/keys/upload"),
            Some(r#"{"one_time_keys":{"signed_curve25519:A":5}}"#.into()),
            400,
            "M_BAD_JSON",
        ),
        (
            M::POST,
            format!("{v3}/keys/upload"),
            Some(r#"{"one_time_keys":[]}"#.into()),
            400,
            "M_BAD_JSON",
        ),
        (M::POST, format!("{v3}/keys/upload"), Some("{nope".into()), 400, "M_NOT_JSON"),
        (M::POST, format!("{v3}/keys/query"), Some("{}".into()), 400, "M_BAD_JSON"),
        (
            M::POST,
            format!("{v3}/keys/query"),
            Some(r#"{"device_keys":{"not-a-user":[]}}"#.into()),
            400,
            "M_BAD_JSON",
        ),
        (
            M::POST,
            format!("{v3}/keys/claim"),
            Some(r#"{"one_time_keys":{"@fred:localhost":{"D":5}}}"#.into()),
            400,
            "M_BAD_JSON",
        ),
        (M::GET, format!("{v3}/keys/changes?from=x&to=y"), None, 400, "M_INVALID_PARAM"),
        (M::GET, format!("{v3}/keys/changes"), None, 400, "M_INVALID_PARAM"),
        (
            M::POST,
            format!("{v3}/keys/device_signing/upload"),
            Some(other_master.to_string()),
            400,
            "M_INVALID_PARAM",
        ),
        (
            M::POST,
            format!("{v3}/keys/signatures/upload"),
            Some("[1]".into()),
            400,
            "M_NOT_JSON",
        ),
        (
            M::PUT,
            format!("{v3}/sendToDevice/m.x/t1"),
            Some(r#"{"messages":{"@fred:localhost":{"D":"text"}}}"#.into()),
            400,
            "M_BAD_JSON",
        ),
        (
            M::PUT,
            format!("{v3}/sendToDevice/m.x/t2"),
            Some(r#"{"messages":{"not-a-user":{}}}"#.into()),
            400,
            "M_INVALID_PARAM",
        ),
        (M::PUT, format!("{v3}/sendToDevice/m.x/t3"), Some("{}".into()), 400, "M_BAD_JSON"),
        (
            M::POST,
            format!("{v3}/room_keys/version"),
            Some(r#"{"algorithm":"a"}"#.into()),
            400,
            "M_BAD_JSON",
        ),
        (M::GET, format!("{v3}/room_keys/version/abc"), None, 404, "M_NOT_FOUND"),
        (M::GET, format!("{v3}/room_keys/keys?version=1"), None, 404, "M_NOT_FOUND"),
        (
            M::PUT,
            format!("{v3}/room_keys/keys?version=1"),
            Some(r#"{"rooms":{}}"#.into()),
            404,
            "M_NOT_FOUND",
        ),
        (
            M::PUT,
            format!("{v3}/room_keys/keys"),
            Some(r#"{"rooms":{}}"#.into()),
            400,
            "M_INVALID_PARAM",
        ),
        (
            M::PUT,
            format!("{v3}/room_keys/keys/not-a-room/S?version=1"),
            Some("{}".into()),
            400,
            "M_INVALID_PARAM",
        ),
    ];
    for (method, path, body, status, errcode) in cases {
        let mut r = http().request(method.clone(), &path).bearer_auth(&fred);
        if let Some(b) = body.clone() {
            r = r.header("content-type", "application/json").body(b);
        }
        let r = r.send().await.unwrap();
        let got = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!(
            (got, v["errcode"].as_str()),
            (status, Some(errcode)),
            "{method} {path} {body:?}: {v}"
        );
    }
    let (status, v) = {
        let r = http()
            .post(format!("{v3}/keys/query"))
            .json(&json!({ "device_keys": {} }))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!((status, v["errcode"].as_str()), (401, Some("M_MISSING_TOKEN")));

    // A backed-up key with a negative index is refused, and nothing of it stays.
    let version = post_json(
        format!("{v3}/room_keys/version"),
        Some(&fred),
        json!({ "algorithm": "m.megolm_backup.v1.curve25519-aes-sha2", "auth_data": {} }),
    )
    .await["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let bad_key = json!({ "first_message_index": -1, "forwarded_count": 0, "is_verified": false, "session_data": {} });
    let r = http()
        .put(format!("{v3}/room_keys/keys/!r:localhost/S?version={version}"))
        .bearer_auth(&fred)
        .json(&bad_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let info = get_json(format!("{v3}/room_keys/version/{version}"), &fred).await;
    assert_eq!(info["count"], 0);

    // The refusals stored nothing: no keys for fred, and the server still works.
    let counts = post_json(format!("{v3}/keys/upload"), Some(&fred), json!({})).await;
    assert_eq!(counts["one_time_key_counts"]["signed_curve25519"], 0);
    let query = post_json(
        format!("{v3}/keys/query"),
        Some(&fred),
        json!({ "device_keys": { "@fred:localhost": [] } }),
    )
    .await;
    assert_eq!(query["device_keys"]["@fred:localhost"], json!({}));
    assert_eq!(query["master_keys"], json!({}));
}
