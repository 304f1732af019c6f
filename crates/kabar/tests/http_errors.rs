//! What the server says to requests it must refuse: forbidden actions, bad
//! tokens, malformed and oversized input. Raw HTTP, since a good SDK never
//! sends these.

mod common;

use common::{Server, enc, http};
use serde_json::{Value, json};

struct User {
    token: String,
    user_id: String,
}

async fn register(server: &Server, name: &str) -> User {
    let r: Value = http()
        .post(format!("{}/_matrix/client/v3/register", server.url))
        .json(&json!({ "username": name, "password": "pw", "auth": { "type": "m.login.dummy" } }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    User {
        token: r["access_token"].as_str().expect("token").to_owned(),
        user_id: r["user_id"].as_str().unwrap().to_owned(),
    }
}

/// Sends a request and returns (status, body).
async fn call(method: reqwest::Method, url: String, token: Option<&str>, body: Option<Vec<u8>>) -> (u16, Value) {
    let mut req = http().request(method, url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("error body is not JSON: {text}")),
    )
}

fn errcode(v: &Value) -> &str {
    v["errcode"].as_str().unwrap_or("<none>")
}

async fn create_room(server: &Server, u: &User) -> String {
    let (s, v) = call(
        reqwest::Method::POST,
        format!("{}/_matrix/client/v3/createRoom", server.url),
        Some(&u.token),
        Some(b"{}".to_vec()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["room_id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_actions_change_nothing() {
    let server = Server::start();
    let alice = register(&server, "alice").await;
    let eve = register(&server, "eve").await;
    let room = create_room(&server, &alice).await;
    let base = format!("{}/_matrix/client/v3/rooms/{}", server.url, enc(&room));
    use reqwest::Method as M;

    // A non-member can neither read nor send.
    let (s, v) = call(M::GET, format!("{base}/messages?dir=b"), Some(&eve.token), None).await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"));
    let (s, v) = call(
        M::PUT,
        format!("{base}/send/m.room.message/t1"),
        Some(&eve.token),
        Some(br#"{"msgtype":"m.text","body":"x"}"#.to_vec()),
    )
    .await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"));
    let (s, v) = call(M::GET, format!("{base}/state"), Some(&eve.token), None).await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"));
    // An invite-only room refuses her join.
    let (s, v) = call(M::POST, format!("{base}/join"), Some(&eve.token), Some(b"{}".to_vec())).await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"));

    // Missing and unknown tokens.
    let (s, v) = call(M::GET, format!("{}/_matrix/client/v3/account/whoami", server.url), None, None).await;
    assert_eq!((s, errcode(&v)), (401, "M_MISSING_TOKEN"));
    let (s, v) = call(
        M::GET,
        format!("{}/_matrix/client/v3/account/whoami", server.url),
        Some("kbr_not_a_token"),
        None,
    )
    .await;
    assert_eq!((s, errcode(&v)), (401, "M_UNKNOWN_TOKEN"));

    // Once invited and joined, Eve still lacks the power to change power levels or kick.
    let (s, _) = call(
        M::POST,
        format!("{base}/invite"),
        Some(&alice.token),
        Some(json!({ "user_id": eve.user_id }).to_string().into_bytes()),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(M::POST, format!("{base}/join"), Some(&eve.token), Some(b"{}".to_vec())).await;
    assert_eq!(s, 200);
    let (_, before) = call(M::GET, format!("{base}/state/m.room.power_levels/"), Some(&eve.token), None).await;
    let mut raised = before.clone();
    raised["users"][&eve.user_id] = json!(100);
    let (s, v) = call(
        M::PUT,
        format!("{base}/state/m.room.power_levels/"),
        Some(&eve.token),
        Some(raised.to_string().into_bytes()),
    )
    .await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"));
    let (_, after) = call(M::GET, format!("{base}/state/m.room.power_levels/"), Some(&eve.token), None).await;
    assert_eq!(before, after, "a refused change leaves the state as it was");
    let (s, v) = call(
        M::POST,
        format!("{base}/kick"),
        Some(&eve.token),
        Some(json!({ "user_id": alice.user_id }).to_string().into_bytes()),
    )
    .await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"));
    let (s, v) = call(
        M::PUT,
        format!("{base}/state/m.room.name/"),
        Some(&eve.token),
        Some(br#"{"name":"mine"}"#.to_vec()),
    )
    .await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"));

    // Alice bans Eve; Eve can no longer send.
    let (s, _) = call(
        M::POST,
        format!("{base}/ban"),
        Some(&alice.token),
        Some(json!({ "user_id": eve.user_id }).to_string().into_bytes()),
    )
    .await;
    assert_eq!(s, 200);
    let (s, v) = call(
        M::PUT,
        format!("{base}/send/m.room.message/t2"),
        Some(&eve.token),
        Some(br#"{"msgtype":"m.text","body":"x"}"#.to_vec()),
    )
    .await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_gets_matrix_errors_and_breaks_nothing() {
    let server = Server::start();
    let alice = register(&server, "alice").await;
    let room = create_room(&server, &alice).await;
    let base = format!("{}/_matrix/client/v3/rooms/{}", server.url, enc(&room));
    use reqwest::Method as M;
    let t = Some(alice.token.as_str());

    let (s, v) = call(M::PUT, format!("{base}/send/m.room.message/a"), t, Some(b"{not json".to_vec())).await;
    assert_eq!((s, errcode(&v)), (400, "M_NOT_JSON"));
    let (s, v) = call(M::PUT, format!("{base}/send/m.room.message/b"), t, Some(b"[1,2]".to_vec())).await;
    assert_eq!((s, errcode(&v)), (400, "M_NOT_JSON"));
    let (s, v) = call(
        M::POST,
        format!("{}/_matrix/client/v3/createRoom", server.url),
        t,
        Some(br#"{"name": 5}"#.to_vec()),
    )
    .await;
    assert_eq!((s, errcode(&v)), (400, "M_BAD_JSON"));
    let (s, v) = call(
        M::POST,
        format!("{}/_matrix/client/v3/login", server.url),
        None,
        Some(br#"{"type":"m.login.password","identifier":{"type":"m.id.user","user":"alice"},"password":7}"#.to_vec()),
    )
    .await;
    assert_eq!((s, errcode(&v)), (400, "M_BAD_JSON"));

    // Larger than the request body limit.
    let huge = format!(r#"{{"body":"{}"}}"#, "x".repeat(2 * 1024 * 1024));
    let (s, v) = call(M::PUT, format!("{base}/send/m.room.message/c"), t, Some(huge.into_bytes())).await;
    assert_eq!((s, errcode(&v)), (413, "M_TOO_LARGE"));
    // Within the body limit but larger than an event may be.
    let big = format!(r#"{{"body":"{}"}}"#, "x".repeat(70_000));
    let (s, v) = call(M::PUT, format!("{base}/send/m.room.message/d"), t, Some(big.into_bytes())).await;
    assert_eq!((s, errcode(&v)), (413, "M_TOO_LARGE"));

    // Bad identifiers and tokens in paths and queries.
    let (s, v) = call(
        M::GET,
        format!("{}/_matrix/client/v3/rooms/not-a-room/messages?dir=b", server.url),
        t,
        None,
    )
    .await;
    assert_eq!((s, errcode(&v)), (400, "M_INVALID_PARAM"));
    let (s, v) = call(M::GET, format!("{base}/messages?dir=x"), t, None).await;
    assert_eq!((s, errcode(&v)), (400, "M_INVALID_PARAM"));
    let (s, v) = call(M::GET, format!("{base}/messages?dir=b&from=garbage"), t, None).await;
    assert_eq!((s, errcode(&v)), (400, "M_INVALID_PARAM"));
    let (s, v) = call(M::GET, format!("{}/_matrix/client/v3/sync?since=s99x", server.url), t, None).await;
    assert_eq!((s, errcode(&v)), (400, "M_INVALID_PARAM"));
    let (s, v) = call(M::GET, format!("{}/_matrix/client/v3/sync?filter=%7Bbad", server.url), t, None).await;
    assert_eq!((s, errcode(&v)), (400, "M_BAD_JSON"));
    let (s, v) = call(M::GET, format!("{}/_matrix/client/v3/no/such/endpoint", server.url), t, None).await;
    assert_eq!((s, errcode(&v)), (404, "M_UNRECOGNIZED"));
    let (s, v) = call(M::DELETE, format!("{}/_matrix/client/v3/createRoom", server.url), t, None).await;
    assert_eq!((s, errcode(&v)), (405, "M_UNRECOGNIZED"));
    let (s, v) = call(
        M::POST,
        format!("{}/_matrix/client/v3/createRoom", server.url),
        t,
        Some(br#"{"room_version":"1"}"#.to_vec()),
    )
    .await;
    assert_eq!((s, errcode(&v)), (400, "M_UNSUPPORTED_ROOM_VERSION"));

    // Registration input.
    let reg = |body: Value| {
        call(
            M::POST,
            format!("{}/_matrix/client/v3/register", server.url),
            None,
            Some(body.to_string().into_bytes()),
        )
    };
    let (s, v) = reg(json!({"username": "alice", "password": "x", "auth": {"type": "m.login.dummy"}})).await;
    assert_eq!((s, errcode(&v)), (400, "M_USER_IN_USE"));
    let (s, v) = reg(json!({"username": "bad name!", "password": "x", "auth": {"type": "m.login.dummy"}})).await;
    assert_eq!((s, errcode(&v)), (400, "M_INVALID_USERNAME"));

    // After all that, the room still works and holds only what was valid.
    let (s, _) = call(
        M::PUT,
        format!("{base}/send/m.room.message/ok"),
        t,
        Some(br#"{"msgtype":"m.text","body":"still here"}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 200);
    let (_, msgs) = call(M::GET, format!("{base}/messages?dir=b&limit=50"), t, None).await;
    let bodies: Vec<&str> = msgs["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, vec!["still here"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_sessions_and_profiles() {
    let server = Server::start();
    let alice = register(&server, "alice").await;
    use reqwest::Method as M;
    let u = |p: &str| format!("{}/_matrix/client/v3{p}", server.url);

    let (s, v) = call(M::GET, u("/register/available?username=alice"), None, None).await;
    assert_eq!((s, errcode(&v)), (400, "M_USER_IN_USE"));
    let (s, v) = call(M::GET, u("/register/available?username=nobody"), None, None).await;
    assert_eq!((s, v["available"].as_bool()), (200, Some(true)));

    // Profile changes reach member events in joined rooms.
    let room = create_room(&server, &alice).await;
    let (s, _) = call(
        M::PUT,
        u(&format!("/profile/{}/displayname", enc(&alice.user_id))),
        Some(&alice.token),
        Some(br#"{"displayname":"Alice A."}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 200);
    let (_, member) = call(
        M::GET,
        u(&format!("/rooms/{}/state/m.room.member/{}", enc(&room), enc(&alice.user_id))),
        Some(&alice.token),
        None,
    )
    .await;
    assert_eq!(member["displayname"], "Alice A.");
    let (_, found) = call(
        M::POST,
        u("/user_directory/search"),
        Some(&alice.token),
        Some(br#"{"search_term":"alice a"}"#.to_vec()),
    )
    .await;
    assert_eq!(found["results"][0]["user_id"], alice.user_id.as_str());

    // Password change needs the old password (UIA), then the old one stops working.
    let (s, v) = call(
        M::POST,
        u("/account/password"),
        Some(&alice.token),
        Some(br#"{"new_password":"pw2"}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 401);
    let session = v["session"].as_str().unwrap().to_owned();
    let body = json!({"new_password": "pw2", "auth": {"type": "m.login.password", "session": session, "identifier": {"type": "m.id.user", "user": "alice"}, "password": "pw"}});
    let (s, v) = call(
        M::POST,
        u("/account/password"),
        Some(&alice.token),
        Some(body.to_string().into_bytes()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let login = |pw: &str| {
        json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": pw})
            .to_string()
            .into_bytes()
    };
    let (s, v) = call(M::POST, u("/login"), None, Some(login("pw"))).await;
    assert_eq!((s, errcode(&v)), (403, "M_FORBIDDEN"));
    let (s, second) = call(M::POST, u("/login"), None, Some(login("pw2"))).await;
    assert_eq!(s, 200);
    let second_token = second["access_token"].as_str().unwrap().to_owned();

    // Devices: two exist; logging one out leaves the other.
    let (_, devices) = call(M::GET, u("/devices"), Some(&alice.token), None).await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 2);
    let (s, _) = call(M::POST, u("/logout"), Some(&second_token), Some(b"{}".to_vec())).await;
    assert_eq!(s, 200);
    let (s, v) = call(M::GET, u("/account/whoami"), Some(&second_token), None).await;
    assert_eq!((s, errcode(&v)), (401, "M_UNKNOWN_TOKEN"));
    let (s, who) = call(M::GET, u("/account/whoami"), Some(&alice.token), None).await;
    assert_eq!((s, who["user_id"].as_str()), (200, Some(alice.user_id.as_str())));

    // Deactivation needs the password, then the account is gone for good.
    let body = json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "pw2"}});
    let (s, _) = call(
        M::POST,
        u("/account/deactivate"),
        Some(&alice.token),
        Some(body.to_string().into_bytes()),
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = call(M::POST, u("/login"), None, Some(login("pw2"))).await;
    assert_eq!(s, 403);
    let (s, v) = call(
        M::POST,
        u("/register"),
        None,
        Some(br#"{"username":"alice","password":"x","auth":{"type":"m.login.dummy"}}"#.to_vec()),
    )
    .await;
    assert_eq!((s, errcode(&v)), (400, "M_USER_IN_USE"), "a deactivated id is never reused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_needs_a_token_off_loopback_or_when_configured() {
    let server = Server::start_with_config("[registration]\nmode = \"token\"\n");
    use reqwest::Method as M;
    let u = format!("{}/_matrix/client/v3/register", server.url);
    let (s, v) = call(M::POST, u.clone(), None, Some(br#"{"username":"carol","password":"x"}"#.to_vec())).await;
    assert_eq!(s, 401);
    assert_eq!(v["flows"], json!([{ "stages": ["m.login.registration_token"] }]));
    let (s, v) = call(
        M::POST,
        u.clone(),
        None,
        Some(br#"{"username":"carol","password":"x","auth":{"type":"m.login.dummy"}}"#.to_vec()),
    )
    .await;
    assert_eq!((s, errcode(&v)), (400, "M_BAD_JSON"), "the dummy stage is not offered");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kabar"))
        .args(["create-registration-token", "--uses", "1", "--data-dir"])
        .arg(server.data_dir())
        // The server's own configuration: it names the storage engine.
        .arg("--config")
        .arg(server.config_file())
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let body = json!({"username": "carol", "password": "x", "auth": {"type": "m.login.registration_token", "token": token}});
    let (s, v) = call(M::POST, u.clone(), None, Some(body.to_string().into_bytes())).await;
    assert_eq!(s, 200, "{v}");
    let body = json!({"username": "dave", "password": "x", "auth": {"type": "m.login.registration_token", "token": token}});
    let (s, v) = call(M::POST, u.clone(), None, Some(body.to_string().into_bytes())).await;
    assert_eq!((s, errcode(&v)), (401, "M_FORBIDDEN"), "a one-use token is spent");

    // Listening on all interfaces, the default policy asks for a token too.
    let tmp = tempfile::tempdir().unwrap();
    let public = Server::start_in(tmp.path(), &["--listen".into(), "0.0.0.0:0".into()]);
    let url = public.url.replace("0.0.0.0", "127.0.0.1");
    let (s, v) = call(
        M::POST,
        format!("{url}/_matrix/client/v3/register"),
        None,
        Some(br#"{"username":"erin","password":"x"}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 401);
    assert_eq!(v["flows"], json!([{ "stages": ["m.login.registration_token"] }]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_enforced_with_the_right_errors() {
    let server = Server::start_with_config("[limits]\nmax_upload_bytes = 1000\n\n[password_hashing]\nthreads = 1\nqueue = 1\n");
    use reqwest::Method as M;

    // Registrations beyond what the hashing pool can queue are told when to come back.
    let attempts: Vec<_> = (0..12)
        .map(|i| {
            let url = format!("{}/_matrix/client/v3/register", server.url);
            tokio::spawn(async move {
                let body = json!({"username": format!("flood{i}"), "password": "pw", "auth": {"type": "m.login.dummy"}});
                call(M::POST, url, None, Some(body.to_string().into_bytes())).await
            })
        })
        .collect();
    let mut ok = 0;
    let mut limited = 0;
    for a in attempts {
        let (s, v) = a.await.unwrap();
        match s {
            200 => ok += 1,
            429 => {
                assert_eq!(errcode(&v), "M_LIMIT_EXCEEDED");
                assert!(v["retry_after_ms"].as_u64().unwrap() > 0);
                limited += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(ok >= 1 && limited >= 1, "ok {ok}, limited {limited}");
    assert_eq!(ok + limited, 12);

    // Uploads over the configured limit are M_TOO_LARGE.
    let alice = register(&server, "alice").await;
    let resp = http()
        .post(format!("{}/_matrix/media/v3/upload", server.url))
        .bearer_auth(&alice.token)
        .header("content-type", "application/octet-stream")
        .body(vec![7u8; 2000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(errcode(&v), "M_TOO_LARGE");
    let config: Value = http()
        .get(format!("{}/_matrix/client/v1/media/config", server.url))
        .bearer_auth(&alice.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(config["m.upload.size"], 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_and_passwords_are_stored_only_as_hashes() {
    let server = Server::start();
    let alice = register(&server, "alice").await;
    let (s, _) = call(
        reqwest::Method::GET,
        format!("{}/_matrix/client/v3/account/whoami", server.url),
        Some(&alice.token),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let stored = common::stored_bytes(&server);
    assert!(!stored.is_empty());
    let contains = |needle: &[u8]| stored.windows(needle.len()).any(|w| w == needle);
    assert!(contains(b"@alice:localhost"), "the scan reads the database files");
    assert!(!contains(alice.token.as_bytes()), "the access token itself is never stored");
    assert!(contains(b"$argon2id$"), "the password is stored as an argon2id hash");
}
