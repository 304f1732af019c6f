//! Admission control against the real binary: per-address limits on sign-up
//! and login, refusals a Matrix SDK understands, and the metrics that count them.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use common::{Server, client, metric};
use matrix_sdk::ruma::api::{
    client::{account::register, uiaa},
    error::{ErrorKind, RetryAfter},
};
use serde_json::{Value, json};

const CONFIG: &str = "metrics_listen = \"127.0.0.1:0\"\n\n\
    [admission.register]\nper_address_per_minute = 6\nper_address_burst = 3\n\n\
    [admission.login]\nper_address_per_minute = 6\nper_address_burst = 2\n";

fn signup(name: &str) -> register::v3::Request {
    let mut req = register::v3::Request::new();
    req.username = Some(name.to_owned());
    req.password = Some(format!("{name}-password"));
    req.auth = Some(uiaa::AuthData::Dummy(uiaa::Dummy::new()));
    req
}

/// A raw request from a chosen source address on loopback.
async fn from(source: Ipv4Addr, url: String, body: Value) -> (u16, Option<String>, Value) {
    let http = reqwest::Client::builder()
        .local_address(IpAddr::V4(source))
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let resp = http.post(url).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").map(|h| h.to_str().unwrap().to_owned());
    (status, retry_after, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_is_held_to_its_allowance_and_told_when_to_return() {
    let server = Server::start_with_config(CONFIG);

    // The burst of three sign-ups from 127.0.0.1 is admitted, through the SDK.
    let burst_started = Instant::now();
    for i in 0..3 {
        client(&server.url)
            .await
            .matrix_auth()
            .register(signup(&format!("burst{i}")))
            .await
            .unwrap_or_else(|e| panic!("sign-up {i} of the burst: {e}"));
    }
    // The fourth is refused at once with an honest wait: 6 a minute is one
    // every 10 s, counted from the burst's first sign-up (which may have
    // taken seconds on a loaded machine).
    let started = Instant::now();
    let earliest = 10u64.saturating_sub(burst_started.elapsed().as_secs() + 1);
    let refused = client(&server.url)
        .await
        .matrix_auth()
        .register(signup("fourth"))
        .await
        .expect_err("over the allowance");
    assert!(started.elapsed() < Duration::from_secs(2), "refused without waiting");
    match refused.client_api_error_kind() {
        Some(ErrorKind::LimitExceeded(data)) => match data.retry_after {
            Some(RetryAfter::Delay(d)) => assert!((earliest..=11).contains(&d.as_secs()), "{d:?}, at least {earliest} s"),
            ref other => panic!("no usable retry time: {other:?}"),
        },
        other => panic!("expected M_LIMIT_EXCEEDED, got {other:?}"),
    }

    // The same, seen raw: retry_after_ms in the body and Retry-After in seconds.
    let url = format!("{}/_matrix/client/v3/register", server.url);
    let attempt = json!({"username": "raw", "password": "pw", "auth": {"type": "m.login.dummy"}});
    let (status, header, body) = from(Ipv4Addr::LOCALHOST, url.clone(), attempt.clone()).await;
    assert_eq!((status, body["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "{body}");
    let ms = body["retry_after_ms"].as_u64().unwrap();
    assert!((1..=10_001).contains(&ms), "{ms}");
    assert_eq!(header.as_deref(), Some(ms.div_ceil(1000).to_string().as_str()));

    // Another address is not held back by the first one's use; nothing the
    // refusals asked for was created.
    let (status, _, body) = from(Ipv4Addr::new(127, 0, 0, 2), url.clone(), attempt).await;
    assert_eq!(status, 200, "{body}");
    let available = common::get_public_json(format!("{}/_matrix/client/v3/register/available?username=fourth", server.url)).await;
    assert_eq!(available["available"], true, "the refused sign-up created nothing");

    // Logins have their own allowance: two attempts, then a refusal even with
    // the right password.
    let login_url = format!("{}/_matrix/client/v3/login", server.url);
    let login =
        |password: &str| json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "burst0"}, "password": password});
    let source = Ipv4Addr::new(127, 0, 0, 3);
    assert_eq!(from(source, login_url.clone(), login("wrong")).await.0, 403);
    assert_eq!(from(source, login_url.clone(), login("burst0-password")).await.0, 200);
    let (status, _, body) = from(source, login_url.clone(), login("burst0-password")).await;
    assert_eq!((status, body["errcode"].as_str()), (429, Some("M_LIMIT_EXCEEDED")), "{body}");

    assert_eq!(
        metric(&server, "kabar_load_shed_total{class=\"register\",reason=\"address_rate\"}").await,
        2.0
    );
    assert_eq!(
        metric(&server, "kabar_load_shed_total{class=\"login\",reason=\"address_rate\"}").await,
        1.0
    );
    assert_eq!(metric(&server, "kabar_load_admitted_total{class=\"password_hashing\"}").await, 6.0);
}

/// With the hashing pool saturated, a sign-up is refused at its first step
/// (before it starts the flow) and the refusal carries the queue's drain time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_hashing_pool_refuses_newcomers_at_once() {
    let server = Server::start_with_config(
        "metrics_listen = \"127.0.0.1:0\"\n\n[password_hashing]\nthreads = 1\nqueue = 1\nmax_queue_delay_ms = 1\n",
    );
    let url = format!("{}/_matrix/client/v3/register", server.url);
    let attempts: Vec<_> = (0..16)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(async move {
                let body = json!({"username": format!("crowd{i}"), "password": "pw", "auth": {"type": "m.login.dummy"}});
                let started = Instant::now();
                let (status, _, v) = from(Ipv4Addr::new(127, 0, 0, 10 + i as u8), url, body).await;
                (status, v, started.elapsed())
            })
        })
        .collect();
    let (mut admitted, mut refused) = (0, 0);
    for a in attempts {
        let (status, v, _took) = a.await.unwrap();
        match status {
            200 => admitted += 1,
            429 => {
                assert_eq!(v["errcode"], "M_LIMIT_EXCEEDED");
                assert!(v["retry_after_ms"].as_u64().unwrap() >= 1, "{v}");
                refused += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(admitted >= 1 && refused >= 1, "admitted {admitted}, refused {refused}");

    // While a hash runs, a first step (no auth yet) is told at once to come
    // back: it would not get a hashing thread within the deadline.
    let running = {
        let url = url.clone();
        tokio::spawn(async move {
            let body = json!({"username": "running", "password": "pw", "auth": {"type": "m.login.dummy"}});
            from(Ipv4Addr::new(127, 0, 0, 40), url, body).await
        })
    };
    let mut told_to_come_back = None;
    while !running.is_finished() && told_to_come_back.is_none() {
        let (status, _, v) = from(
            Ipv4Addr::new(127, 0, 0, 50),
            url.clone(),
            json!({"username": "first", "password": "pw"}),
        )
        .await;
        match status {
            401 => assert!(v["session"].is_string(), "a challenge: {v}"),
            429 => told_to_come_back = Some(v),
            other => panic!("unexpected {other}: {v}"),
        }
    }
    let v = told_to_come_back.expect("a first step while the only hashing thread was busy was refused");
    assert_eq!(v["errcode"], "M_LIMIT_EXCEEDED");
    assert!(v["retry_after_ms"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(running.await.unwrap().0, 200, "the sign-up holding the thread completes");
    let shed = metric(&server, "kabar_load_shed_total{class=\"password_hashing\",reason=\"queue\"}").await;
    assert!(shed >= refused as f64, "metrics count every refusal: {shed} < {refused}");
}
