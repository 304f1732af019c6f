//! Running on PostgreSQL: configuration checks, a database that is not
//! there at start, and one that goes away and comes back while serving.

mod common;

use std::time::{Duration, Instant};

use common::{Api, Server, kabar};
use kabar_store_postgres::test_cluster::TestCluster;

#[test]
fn check_config_reports_a_malformed_or_missing_database_url() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = common::config_in(
        tmp.path(),
        "[storage]\nengine = \"postgres\"\n\n[storage.postgres]\nurl = \"db.example.org:5432\"\n",
    );
    let out = kabar(&["check-config", "--config", bad.to_str().unwrap()]);
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("storage.postgres.url"), "{report}");

    let missing = common::config_in(tmp.path(), "[storage]\nengine = \"postgres\"\n");
    let out = kabar(&["check-config", "--config", missing.to_str().unwrap()]);
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("no database is named"), "{report}");

    // A password in the URL is never echoed.
    let secret = common::config_in(
        tmp.path(),
        "[storage]\nengine = \"postgres\"\n\n[storage.postgres]\nurl = \"mysql://kabar:hunter2@db/kabar\"\n",
    );
    let out = kabar(&["check-config", "--config", secret.to_str().unwrap()]);
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success());
    assert!(!report.contains("hunter2"), "{report}");
}

#[test]
fn serve_without_a_reachable_database_exits_with_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = common::config_in(
        tmp.path(),
        &format!("[storage]\nengine = \"postgres\"\n\n[storage.postgres]\nurl = \"postgres://kabar:hunter2@127.0.0.1:{port}/kabar\"\n"),
    );
    let started = Instant::now();
    // As an operator runs it: no backtraces asked for.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kabar"))
        .args(["serve", "--config", config.to_str().unwrap()])
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(started.elapsed() < Duration::from_secs(30), "it gives up instead of hanging");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("Error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("cannot use PostgreSQL at postgres://kabar:***@127.0.0.1"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "the password is not shown: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_database_is_down_requests_get_503_and_service_resumes_by_itself() {
    // A cluster of its own: this test stops it.
    let cluster = TestCluster::start().expect("start a PostgreSQL cluster");
    let url = cluster.create_database("outage").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let config = common::config_in(tmp.path(), &common::postgres_storage(&url));
    let server = Server::start_from_file(&config, &tmp.path().join("data"), None);
    let alice = Api::register(&server, "alice").await;
    let room = alice.create_room(serde_json::json!({})).await;
    let status = server.admin_json(&["status"]);
    assert_eq!(status["storage"]["engine"], "postgres");
    assert_eq!(status["storage"]["healthy"], true);

    cluster.stop().unwrap();
    // Readiness reuses its verdict for a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = common::http().get(format!("{}/ready", server.url)).send().await.unwrap();
        if ready.status().as_u16() == 503 {
            break;
        }
        assert!(Instant::now() < deadline, "still ready with the database down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let send = common::http()
        .put(format!("{}/_matrix/client/v3/rooms/{room}/send/m.room.message/t1", server.url))
        .bearer_auth(&alice.token)
        .json(&serde_json::json!({"msgtype": "m.text", "body": "while down"}))
        .send()
        .await
        .unwrap();
    assert_eq!(send.status().as_u16(), 503);
    assert!(send.headers().get("retry-after").is_some(), "told when to come back");
    let body: serde_json::Value = send.json().await.unwrap();
    assert_eq!(body["errcode"], "M_UNKNOWN", "{body}");
    let status = server.admin_json(&["status"]);
    assert_eq!(status["storage"]["healthy"], false, "{status}");

    cluster.restart().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = common::http().get(format!("{}/ready", server.url)).send().await.unwrap();
        if ready.status().as_u16() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the server never became ready again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The retried send lands once, and nothing of the failed one was kept.
    let sent = alice
        .ok(
            reqwest::Method::PUT,
            &format!("/rooms/{room}/send/m.room.message/t1"),
            Some(serde_json::json!({"msgtype": "m.text", "body": "while down"})),
        )
        .await;
    let history = alice
        .ok(reqwest::Method::GET, &format!("/rooms/{room}/messages?dir=b&limit=50"), None)
        .await;
    let copies: Vec<_> = history["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["content"]["body"] == "while down")
        .collect();
    assert_eq!(copies.len(), 1);
    assert_eq!(copies[0]["event_id"], sent["event_id"]);
    assert_eq!(server.admin_json(&["status"])["storage"]["healthy"], true);
}
