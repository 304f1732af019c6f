#![recursion_limit = "256"]
//! Configuration safety and the operator's controls, on the real binary:
//! bad configurations refused by `check-config` and by live reload while
//! the server keeps serving, a good reload applied under a connected sync, a
//! reload that breaks the server rolled back by itself, and the admin socket
//! working while HTTP is saturated or bound to the wrong address.

mod common;

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Server, get_json, get_public_json, http, kabar, post_json, registered};
use matrix_sdk::{
    Client,
    config::SyncSettings,
    ruma::{
        OwnedRoomId,
        api::client::room::create_room,
        events::room::message::{OriginalSyncRoomMessageEvent, RoomMessageEventContent},
    },
};
use serde_json::{Value, json};

/// A bad configuration, what it must be refused for, and the line the
/// problem is on (in the file as written here).
struct Bad {
    what: &'static str,
    toml: String,
    key: &'static str,
    says: &'static str,
    line: Option<usize>,
}

fn bad(what: &'static str, toml: impl Into<String>, key: &'static str, says: &'static str, line: Option<usize>) -> Bad {
    Bad {
        what,
        toml: toml.into(),
        key,
        says,
        line,
    }
}

/// Twenty-odd ways to get a configuration wrong.
fn bad_configurations(scratch: &Path) -> Vec<Bad> {
    let a_file = scratch.join("not-a-directory");
    std::fs::write(&a_file, "").unwrap();
    vec![
        bad("not TOML", "server_name = \"chat.example.org", "", "not valid TOML", Some(1)),
        bad(
            "a key written twice",
            "log = \"info\"\nlog = \"debug\"",
            "",
            "duplicate key",
            Some(2),
        ),
        bad(
            "a mistyped key",
            "sever_name = \"chat.example.org\"",
            "sever_name",
            "did you mean `server_name`?",
            Some(1),
        ),
        bad(
            "a mistyped table",
            "[admision.register]\nper_address_burst = 3",
            "admision",
            "did you mean `admission`?",
            Some(1),
        ),
        bad(
            "a key in the wrong table",
            "log = \"info\"\nper_address_burst = 3",
            "per_address_burst",
            "did you mean `admission.register.per_address_burst`?",
            Some(2),
        ),
        bad(
            "a string for a number",
            "[password_hashing]\nqueue = \"many\"",
            "password_hashing.queue",
            "expected an integer, found a string",
            Some(2),
        ),
        bad(
            "a string for a boolean",
            "[registration]\nallow_open_on_public_address = \"yes\"",
            "registration.allow_open_on_public_address",
            "expected true or false",
            Some(2),
        ),
        bad(
            "a table where a value goes",
            "admission = 5",
            "admission",
            "is a table of settings",
            Some(1),
        ),
        bad(
            "weak password hashing",
            "[password_hashing]\nmemory_kib = 1024",
            "password_hashing.memory_kib",
            "out of range",
            Some(2),
        ),
        bad(
            "a negative size",
            "[work.join]\nslots = -1",
            "work.join.slots",
            "-1 is out of range",
            Some(2),
        ),
        bad(
            "an unknown registration mode",
            "[registration]\nmode = \"public\"",
            "registration.mode",
            "is not one of auto, open, token, closed",
            Some(2),
        ),
        bad(
            "an unknown log format",
            "log_format = \"xml\"",
            "log_format",
            "is not one of text, json",
            Some(1),
        ),
        bad(
            "a host name for an address",
            "metrics_listen = \"localhost:9100\"",
            "metrics_listen",
            "not an address of the form ip:port",
            Some(1),
        ),
        bad(
            "a URL without a scheme",
            "public_base_url = \"chat.example.org\"",
            "public_base_url",
            "is not a URL",
            Some(1),
        ),
        bad(
            "a URL that is not http",
            "public_base_url = \"ftp://chat.example.org\"",
            "public_base_url",
            "must be an http:// or https:// URL",
            Some(1),
        ),
        bad(
            "an invalid server name",
            "server_name = \"chat example\"",
            "server_name",
            "not a valid server name",
            Some(1),
        ),
        bad(
            "an invalid log filter",
            "log = \"kabar=loud\"",
            "log",
            "is not a log filter",
            Some(1),
        ),
        bad("no listener left", "listen = []", "listen", "no listener left", Some(1)),
        bad(
            "an address of another machine",
            "listen = \"192.0.2.1:8008\"",
            "listen",
            "is not an address of this machine",
            Some(1),
        ),
        bad(
            "metrics on the client port",
            "listen = \"127.0.0.1:18008\"\nmetrics_listen = \"127.0.0.1:18008\"",
            "metrics_listen",
            "cannot share a port",
            Some(2),
        ),
        bad(
            "open registration on a public address",
            "listen = \"0.0.0.0:18009\"\n[registration]\nmode = \"open\"",
            "registration.mode",
            "registration is open to anyone",
            Some(3),
        ),
        bad(
            "uploads larger than any request",
            "[limits]\nmax_request_body_bytes = 1000000\nmax_upload_bytes = 2000000",
            "limits.max_upload_bytes",
            "larger than limits.max_request_body_bytes",
            Some(3),
        ),
        bad(
            "JSON bodies larger than any request",
            "[limits]\nmax_request_body_bytes = 100000\nmax_json_body_bytes = 200000",
            "limits.max_json_body_bytes",
            "larger than limits.max_request_body_bytes",
            Some(3),
        ),
        bad(
            "a limit nobody can pass",
            "[admission.login]\nper_address_per_minute = 5\nper_address_burst = 0",
            "admission.login.per_address_burst",
            "nobody could ever get in",
            Some(3),
        ),
        bad(
            "TURN servers without the secret to sign for them",
            "[voip]\nturn_uris = [\"turn:turn.example.org\"]",
            "voip.turn_shared_secret",
            "no shared secret",
            Some(2),
        ),
        bad(
            "a URI that is not TURN",
            "[voip]\nturn_uris = [\"https://turn.example.org\"]\nturn_shared_secret = \"s\"",
            "voip.turn_uris",
            "is not a turn: or turns: URI",
            Some(2),
        ),
        bad(
            "a reserved name no one could register anyway",
            "[registration]\nreserved_localparts = [\"Admin\"]",
            "registration.reserved_localparts",
            "is not a user name",
            Some(2),
        ),
        bad(
            "a proxy named by host name, not address",
            "[limits]\nunlimited_addresses = [\"proxy.internal\"]",
            "limits.unlimited_addresses",
            "is not an IP address",
            Some(2),
        ),
        bad(
            "a data directory that is a file",
            format!("data_dir = {:?}", a_file.display().to_string()),
            "data_dir",
            "is not a directory",
            Some(1),
        ),
        bad(
            "a data directory that cannot be created",
            format!("data_dir = {:?}", a_file.join("data").display().to_string()),
            "data_dir",
            "cannot be created",
            Some(1),
        ),
    ]
}

/// A server run from a file that decides everything (no command-line overrides).
struct FileServer {
    server: Server,
    config: PathBuf,
    base: String,
    _tmp: tempfile::TempDir,
}

impl FileServer {
    fn start(extra: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let base = format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nlog = \"warn\"\n",
            data.display().to_string()
        );
        let config = tmp.path().join("kabar.toml");
        std::fs::write(&config, format!("{base}{extra}")).unwrap();
        // Its log (refusals are logged as errors) stays in the directory.
        let server = Server::start_from_file(&config, &data, Some(&tmp.path().join("kabar.log")));
        Self {
            server,
            config,
            base,
            _tmp: tmp,
        }
    }

    /// Writes the file: the base lines the server started with, except those
    /// `toml` sets itself, then `toml`.
    fn write(&self, toml: &str) {
        let base: String = self
            .base
            .lines()
            .filter(|l| {
                let key = l.split('=').next().unwrap_or_default().trim();
                !toml.lines().any(|t| t.split('=').next().unwrap_or_default().trim() == key)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&self.config, format!("{base}{toml}")).unwrap();
    }

    /// `kabar admin reload`: the report and whether the command succeeded.
    fn reload(&self) -> (Value, bool) {
        let out = self.server.admin(&["reload"]);
        let report =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("reload report: {e}: {}", String::from_utf8_lossy(&out.stderr)));
        (report, out.status.success())
    }

    fn running_config(&self) -> String {
        let out = self.server.admin(&["config"]);
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    }
}

/// Alice and Bob in a room; Bob's client runs its sync loop the whole time
/// and records every message it receives.
struct Chat {
    alice: Client,
    room: OwnedRoomId,
    received: Arc<Mutex<Vec<String>>>,
    bob_sync: tokio::task::JoinHandle<matrix_sdk::Result<()>>,
}

impl Chat {
    async fn start(url: &str) -> Self {
        let alice = registered(url, "alice").await;
        let bob = registered(url, "bob").await;
        let mut req = create_room::v3::Request::new();
        req.invite = vec![bob.user_id().unwrap().to_owned()];
        // Public, so a third client can join by id.
        req.preset = Some(create_room::v3::RoomPreset::PublicChat);
        let room = alice.create_room(req).await.unwrap().room_id().to_owned();
        bob.sync_once(SyncSettings::default()).await.unwrap();
        bob.join_room_by_id(&room).await.unwrap();
        let received = Arc::new(Mutex::new(vec![]));
        let sink = received.clone();
        bob.add_event_handler(move |ev: OriginalSyncRoomMessageEvent| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(ev.content.body().to_owned());
            }
        });
        // Long-polls of 30 s: a reload in the middle of one must not cut it.
        let bob_sync = tokio::spawn(async move { bob.sync(SyncSettings::default().timeout(Duration::from_secs(30))).await });
        Self {
            alice,
            room,
            received,
            bob_sync,
        }
    }

    async fn say(&self, body: &str) {
        self.alice
            .get_room(&self.room)
            .unwrap()
            .send(RoomMessageEventContent::text_plain(body))
            .await
            .unwrap_or_else(|e| panic!("sending {body:?}: {e}"));
    }

    /// Waits until Bob's running sync has delivered `body`.
    async fn delivered(&self, body: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.received.lock().unwrap().iter().any(|b| b == body) {
            assert!(!self.bob_sync.is_finished(), "Bob's sync loop ended (a dropped connection?)");
            assert!(Instant::now() < deadline, "{body:?} never reached Bob's sync");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configurations_are_refused_by_check_config_and_by_reload_while_serving() {
    let scratch = tempfile::tempdir().unwrap();
    let table = bad_configurations(scratch.path());
    assert!(table.len() >= 20);

    // check-config: every one refused, with the file, line, key and reason.
    for case in &table {
        let file = scratch.path().join("bad.toml");
        std::fs::write(&file, &case.toml).unwrap();
        let out = kabar(&["check-config", "--config", file.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{}: check-config must fail:\n{text}", case.what);
        let prefix = match case.line {
            Some(line) => format!("{}:{line}: error: ", file.display()),
            None => format!("{}: error: ", file.display()),
        };
        let expected = if case.key.is_empty() {
            prefix
        } else {
            format!("{prefix}{}: ", case.key)
        };
        assert!(
            text.lines().any(|l| l.starts_with(&expected) && l.contains(case.says)),
            "{}: expected a line starting {expected:?} saying {:?}, got:\n{text}",
            case.what,
            case.says
        );
        // And `serve` refuses to start on it.
        let out = kabar(&["serve", "--config", file.to_str().unwrap()]);
        assert!(!out.status.success(), "{}: serve must refuse", case.what);
        assert!(String::from_utf8_lossy(&out.stderr).contains(case.says), "{}", case.what);
    }
    // One file with several problems lists them all.
    let file = scratch.path().join("several.toml");
    std::fs::write(
        &file,
        "sever_name = \"x.org\"\n[password_hashing]\nqueue = -5\npriority = \"urgent\"\n",
    )
    .unwrap();
    let out = kabar(&["check-config", "--config", file.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().filter(|l| l.contains(": error: ")).count(), 3, "{text}");
    assert!(text.contains("configuration is invalid: 3 error(s)"), "{text}");

    // Live reload: the same files refused one after another while a chat
    // goes on; the running configuration never changes.
    let fs = FileServer::start("");
    let chat = Chat::start(&fs.server.url).await;
    let before = fs.running_config();
    for (i, case) in table.iter().enumerate() {
        fs.write(&case.toml);
        let (report, ok) = fs.reload();
        assert!(!ok, "{}: reload must fail", case.what);
        assert_eq!(report["outcome"], "refused", "{}: {report}", case.what);
        let problems = report["problems"]["items"].as_array().unwrap();
        assert!(
            problems.iter().any(|p| p["severity"] == "error"
                && p["key"] == case.key
                && (p["message"].as_str().unwrap_or_default().contains(case.says)
                    || p["hint"].as_str().unwrap_or_default().contains(case.says))),
            "{}: {report}",
            case.what
        );
        let body = format!("still chatting after bad config {i}");
        chat.say(&body).await;
        chat.delivered(&body).await;
    }
    assert_eq!(fs.running_config(), before, "a refused reload changes nothing");
    let status = fs.server.admin_json(&["status"]);
    assert_eq!(status["configuration"]["last_reload"]["outcome"], "refused");
    assert_eq!(status["ready"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_reload_applies_without_dropping_a_connected_sync() {
    let fs = FileServer::start("[registration]\nmode = \"open\"\n");
    let chat = Chat::start(&fs.server.url).await;
    chat.say("before").await;
    chat.delivered("before").await;

    // A raw long-poll held open across the reload.
    let (token, since) = {
        let url = &fs.server.url;
        let r = post_json(
            format!("{url}/_matrix/client/v3/register"),
            None,
            json!({"username": "carol", "password": "pw-carol", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
        let token = r["access_token"].as_str().unwrap().to_owned();
        let room = common::enc(chat.room.as_str());
        let joined = post_json(format!("{url}/_matrix/client/v3/join/{room}"), Some(&token), json!({})).await;
        assert_eq!(joined["room_id"], chat.room.as_str());
        let s = get_json(format!("{url}/_matrix/client/v3/sync?timeout=0"), &token).await;
        (token, s["next_batch"].as_str().unwrap().to_owned())
    };
    let url = fs.server.url.clone();
    let long_poll = tokio::spawn(async move {
        http()
            .get(format!("{url}/_matrix/client/v3/sync?timeout=25000&since={since}"))
            .bearer_auth(&token)
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Close registration and change a restart-only setting, by SIGHUP.
    fs.write("[registration]\nmode = \"closed\"\n[rooms]\ndefault_version = \"11\"\n");
    fs.server.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fs.server.admin_json(&["status"])["configuration"]["last_reload"].is_null() {
        assert!(Instant::now() < deadline, "SIGHUP never reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = fs.server.admin_json(&["status"]);
    let report = &status["configuration"]["last_reload"];
    assert_eq!(report["outcome"], "applied", "{report}");
    assert_eq!(report["changed"], json!(["registration.mode"]));
    assert_eq!(report["needs_restart"][0]["key"], "rooms.default_version", "{report}");
    assert_eq!(status["configuration"]["pending_restart"][0]["key"], "rooms.default_version");
    assert_eq!(status["registration"], "Closed");

    // The change is in effect: sign-ups are refused.
    let refused = http()
        .post(format!("{}/_matrix/client/v3/register", fs.server.url))
        .json(&json!({"username": "dave", "password": "pw", "auth": {"type": "m.login.dummy"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["errcode"], "M_FORBIDDEN");
    // The restart-only setting is not half-applied: new rooms keep version 12.
    let caps = get_json(
        format!("{}/_matrix/client/v3/capabilities", fs.server.url),
        &chat.alice.access_token().unwrap(),
    )
    .await;
    assert_eq!(caps["capabilities"]["m.room_versions"]["default"], "12");

    // The long-poll held across the reload is answered with the next message,
    // and the SDK's sync loop keeps delivering.
    chat.say("after").await;
    let answered = long_poll.await.unwrap().expect("the held sync was not dropped");
    assert_eq!(answered.status(), 200);
    let body: Value = answered.json().await.unwrap();
    assert!(body.to_string().contains("after"), "{body}");
    chat.delivered("after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_fails_its_health_check_rolls_back_by_itself() {
    let fs = FileServer::start("");
    let chat = Chat::start(&fs.server.url).await;
    let well_known = || async {
        let v = get_public_json(format!("{}/.well-known/matrix/client", fs.server.url)).await;
        v["m.homeserver"]["base_url"].as_str().unwrap().to_owned()
    };
    let good_url = well_known().await;
    assert_eq!(good_url, fs.server.url);

    // Valid by itself, but it points every client at a port where nothing
    // listens (the outage a route withdrawal causes). Together with a
    // harmless change that must be undone too.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    fs.write(&format!(
        "public_base_url = \"http://{dead}\"\n[admission.login]\nper_address_per_minute = 7\n"
    ));
    let (report, ok) = fs.reload();
    assert!(!ok, "a rolled-back reload fails the command");
    assert_eq!(report["outcome"], "rolled_back", "{report}");
    let why = report["health_failure"].as_str().unwrap();
    assert!(why.contains("public_base_url") && why.contains(&dead.to_string()), "{why}");
    assert_eq!(well_known().await, good_url, "clients are still told the working URL");
    let running = fs.running_config();
    assert!(
        !running.contains(&dead.to_string()) && !running.contains("per_address_per_minute = 7"),
        "{running}"
    );

    // A good reload, then the operator rolls it back by hand.
    fs.write("[admission.login]\nper_address_per_minute = 7\n");
    let (report, ok) = fs.reload();
    assert!(ok, "{report}");
    assert_eq!(report["outcome"], "applied");
    assert!(fs.running_config().contains("per_address_per_minute = 7"));
    let back = fs.server.admin_json(&["rollback"]);
    assert_eq!(back["outcome"], "rolled_back_by_operator");
    assert_eq!(back["changed"], json!(["admission.login.per_address_per_minute"]));
    assert!(!fs.running_config().contains("per_address_per_minute = 7"));
    let out = fs.server.admin(&["rollback"]);
    assert!(!out.status.success(), "nothing older to go back to");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no earlier known-good configuration"));

    chat.say("through it all").await;
    chat.delivered("through it all").await;
}

/// Admin commands that must work whatever HTTP is doing, run as an
/// operator's shell would against the server's data directory; returns how
/// long each took and a registration token. The account and token are
/// proven over HTTP afterwards.
fn break_glass(data_dir: &Path, name: &str) -> (Vec<Duration>, String) {
    let mut took = vec![];
    let mut timed = |args: &[&str]| {
        let started = Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kabar"))
            .arg("admin")
            .arg("--data-dir")
            .arg(data_dir)
            .args(args)
            .output()
            .unwrap();
        took.push(started.elapsed());
        assert!(
            out.status.success(),
            "kabar admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let status: Value = serde_json::from_str(&timed(&["status"])).unwrap();
    assert_eq!(status["ready"], true);
    assert!(timed(&["config"]).contains("listen"));
    let created = timed(&["create-user", name, "--password", "break-glass-pw"]);
    assert_eq!(created.trim(), format!("@{name}:localhost"));
    let token = timed(&["create-registration-token", "--uses", "1"]).trim().to_owned();
    assert_eq!(token.len(), 24);
    let reload: Value = serde_json::from_str(&timed(&["reload"])).unwrap();
    assert_eq!(reload["outcome"], "unchanged");
    (took, token)
}

/// Signs up `newcomer` with a registration token.
async fn sign_up_with_token(url: &str, token: &str) -> reqwest::StatusCode {
    http()
        .post(format!("{url}/_matrix/client/v3/register"))
        .json(&json!({"username": "newcomer", "password": "pw", "auth": {"type": "m.login.registration_token", "token": token}}))
        .send()
        .await
        .unwrap()
        .status()
}

async fn login(url: &str, name: &str, password: &str) -> reqwest::StatusCode {
    http()
        .post(format!("{url}/_matrix/client/v3/login"))
        .json(&json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": name}, "password": password}))
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_works_while_http_is_saturated() {
    // Registration needs a token here, so the admin's token is what lets a newcomer in.
    let server = Server::start_with_config("[registration]\nmode = \"token\"\n");
    let url = server.url.clone();
    // Saturate the listener: 256 clients in closed loops of sign-up
    // challenges and wrong-password logins, on the same two cores.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut flood = vec![];
    for i in 0..256 {
        let (url, stop, answered) = (url.clone(), stop.clone(), answered.clone());
        flood.push(tokio::spawn(async move {
            let client = http();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = if i % 2 == 0 {
                    client
                        .post(format!("{url}/_matrix/client/v3/register"))
                        .json(&json!({"username": format!("flood{i}"), "password": "pw"}))
                        .send()
                        .await
                } else {
                    client
                        .post(format!("{url}/_matrix/client/v3/login"))
                        .json(&json!({"type": "m.login.password", "user": "nobody", "password": "wrong"}))
                        .send()
                        .await
                };
                if r.is_ok() {
                    answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let during_start = answered.load(std::sync::atomic::Ordering::Relaxed);
    let health_started = Instant::now();
    let health = http().get(format!("{url}/health")).send().await.map(|r| r.status());
    let health_took = health_started.elapsed();
    let data_dir = server.data_dir().to_owned();
    let (took, token) = tokio::task::spawn_blocking(move || break_glass(&data_dir, "operator"))
        .await
        .unwrap();
    let during = answered.load(std::sync::atomic::Ordering::Relaxed) - during_start;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    eprintln!(
        "flood: {during} requests answered during the admin calls; /health took {health_took:?} ({health:?}); admin calls took {took:?}"
    );
    assert!(during > 0, "the flood was running during the admin calls");
    for t in &took {
        assert!(*t < Duration::from_secs(15), "an admin call took {t:?}");
    }
    // What the admin channel did is real: the account logs in, the token signs up.
    assert_eq!(login(&url, "operator", "break-glass-pw").await, 200);
    assert_eq!(sign_up_with_token(&url, &token).await, 200, "the admin's token works");
    // Deactivation through the admin channel ends the account's logins.
    let out = server.admin(&["deactivate-user", "@operator:localhost"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(login(&url, "operator", "break-glass-pw").await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_socket_works_when_http_is_bound_to_the_wrong_address_and_fixes_it_live() {
    // The operator meant port `intended`; the file says another (a typo).
    let intended = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    // Registration needs a token here, so the admin's token is what lets a newcomer in.
    const TOKEN_MODE: &str = "registration.mode = \"token\"\n";
    let fs = FileServer::start(TOKEN_MODE);
    let refused = http().get(format!("http://{intended}/_matrix/client/versions")).send().await;
    assert!(refused.is_err(), "nothing answers where clients are sent");
    let (_, token) = break_glass(fs.server.data_dir(), "operator");
    let status = fs.server.admin_json(&["status"]);
    let wrong = status["listening"][0].as_str().unwrap().to_owned();
    assert_ne!(wrong, intended.to_string());
    // The status shows where it really listens; the account and token made
    // through the admin channel work there.
    let wrong_url = format!("http://{wrong}");
    assert_eq!(login(&wrong_url, "operator", "break-glass-pw").await, 200);

    // A fix that cannot work (the port is taken) is rolled back: the old
    // listener keeps serving.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    fs.write(&format!("{TOKEN_MODE}listen = \"{}\"\n", taken.local_addr().unwrap()));
    let (report, ok) = fs.reload();
    assert!(!ok);
    assert_eq!(report["outcome"], "rolled_back", "{report}");
    assert!(
        report["health_failure"].as_str().unwrap().contains("binding listen address"),
        "{report}"
    );
    assert_eq!(
        login(&wrong_url, "operator", "break-glass-pw").await,
        200,
        "still serving where it was"
    );
    drop(taken);

    // The real fix, live: the intended address starts answering, the wrong
    // one stops, no restart.
    fs.write(&format!("{TOKEN_MODE}listen = \"{intended}\"\n"));
    let (report, ok) = fs.reload();
    assert!(ok, "{report}");
    assert_eq!(report["changed"], json!(["listen"]));
    let url = format!("http://{intended}");
    assert_eq!(
        sign_up_with_token(&url, &token).await,
        200,
        "the admin's token works at the fixed address"
    );
    let well_known = get_public_json(format!("{url}/.well-known/matrix/client")).await;
    assert_eq!(well_known["m.homeserver"]["base_url"], url, "clients are told the new address");
    let deadline = Instant::now() + Duration::from_secs(10);
    while http().get(format!("{wrong_url}/health")).send().await.is_ok() {
        assert!(Instant::now() < deadline, "the wrong address still answers");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fs.server.admin_json(&["status"])["listening"], json!([intended.to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_metrics_and_request_ids() {
    let server = Server::start_with_config("metrics_listen = \"127.0.0.1:0\"");
    let health = http().get(format!("{}/health", server.url)).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let request_id = health
        .headers()
        .get("x-request-id")
        .expect("a request id")
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = health.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    let instance = body["instance"].as_str().unwrap();
    assert!(request_id.starts_with(&format!("{instance}-")), "{request_id}");
    let again = http().get(format!("{}/health", server.url)).send().await.unwrap();
    assert_ne!(
        again.headers()["x-request-id"].to_str().unwrap(),
        request_id,
        "each request has its own id"
    );
    let ready = http().get(format!("{}/ready", server.url)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    // A client's own id is kept.
    let mine = http()
        .get(format!("{}/_matrix/client/versions", server.url))
        .header("x-request-id", "client-chosen-1")
        .send()
        .await
        .unwrap();
    assert_eq!(mine.headers()["x-request-id"], "client-chosen-1");
    // A declared body over the request limit is refused before it is read.
    // Only the head is sent: the answer must come without the body.
    let answer = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = server.url.trim_start_matches("http://");
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /_matrix/client/v3/login HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            65 * 1024 * 1024
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut answer))
            .await
            .expect("answered without waiting for the body")
            .unwrap();
        answer
    };
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"errcode\":\"M_TOO_LARGE\""), "{answer}");

    let alice = registered(&server.url, "alice").await;
    let sync_url = format!("{}/_matrix/client/v3/sync?timeout=3000", server.url);
    let token = alice.access_token().unwrap();
    let first = get_json(sync_url.clone(), &token).await;
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let held = tokio::spawn({
        let token = token.clone();
        let url = format!("{sync_url}&since={since}");
        async move { http().get(url).bearer_auth(token).send().await.unwrap().status() }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(common::metric(&server, "kabar_syncs_open").await, 1.0, "the held sync is counted");
    assert_eq!(held.await.unwrap(), 200);
    assert_eq!(common::metric(&server, "kabar_syncs_open").await, 0.0);
    let versions = common::metric(
        &server,
        "kabar_http_requests_total{endpoint=\"/_matrix/client/versions\",method=\"GET\",status=\"200\"}",
    )
    .await;
    assert!(versions >= 1.0);
    assert!(
        common::metric(
            &server,
            "kabar_http_request_duration_seconds_count{endpoint=\"/_matrix/client/v3/sync\",method=\"GET\"}"
        )
        .await
            >= 2.0
    );
    assert!(common::metric(&server, "kabar_storage_duration_seconds_count{op=\"write\"}").await >= 1.0);
    assert!(common::metric(&server, "kabar_storage_duration_seconds_count{op=\"read\"}").await >= 1.0);
    assert_eq!(common::metric(&server, "kabar_load_queued{class=\"initial_sync\"}").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_request_id() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let config = tmp.path().join("kabar.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nlog = \"info\"\nlog_format = \"json\"\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    let logs = tmp.path().join("kabar.log");
    let server = Server::start_from_file(&config, &data, Some(&logs));
    let r = http()
        .post(format!("{}/_matrix/client/v3/register", server.url))
        .header("x-request-id", "sign-up-42")
        .json(&json!({"username": "alice", "password": "pw", "auth": {"type": "m.login.dummy"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&logs).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
            .collect();
        if let Some(line) = lines.iter().find(|l| l["fields"]["message"] == "registered") {
            assert_eq!(line["span"]["request_id"], "sign-up-42", "{line}");
            assert_eq!(line["level"], "INFO");
            break;
        }
        assert!(Instant::now() < deadline, "no `registered` line in:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_server_on_the_same_data_directory_refuses_to_start() {
    let fs = FileServer::start("");
    let second = kabar(&["serve", "--config", fs.config.to_str().unwrap()]);
    assert!(!second.status.success());
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(said.contains("another kabar is running"), "{said}");
    // The first is untouched, its admin channel included.
    assert_eq!(fs.server.admin_json(&["status"])["ready"], true);
    assert_eq!(http().get(format!("{}/health", fs.server.url)).send().await.unwrap().status(), 200);
}
