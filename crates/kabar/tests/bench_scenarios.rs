//! Every benchmark scenario once, at a small size, against the real binary.
//! Correctness only (everything registered, joined, held and delivered exactly
//! once); speed is measured by bench/compare.sh, never asserted here.

mod common;

use std::time::Duration;

use common::Server;
use kabar_bench::{client::Target, scenarios};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_loses_nothing() {
    // Unoptimized argon2 takes seconds a hash while the surge test next door
    // floods the same cores: the hashing deadline is raised so these few
    // sign-ups wait instead of being shed (shedding is the surge test's and
    // admission.rs's subject, not this one's).
    let server = Server::start_with_config("[password_hashing]\nmax_queue_delay_ms = 60000\n");
    let target = Target::new(&server.url);

    let v = scenarios::versions::run(
        &target,
        scenarios::versions::Params {
            seconds: 0.3,
            concurrency: 4,
        },
    )
    .await;
    assert!(v.requests > 0 && v.errors == 0, "{v:?}");

    let r = scenarios::register::run(
        &target,
        scenarios::register::Params {
            accounts: 12,
            concurrency: 4,
        },
    )
    .await;
    assert_eq!((r.registered, r.errors.len()), (12, 0), "{r:?}");

    let m = scenarios::messages::run(
        &target,
        scenarios::messages::Params {
            users: 6,
            rooms: 2,
            seconds: 1.5,
            rate_per_sender: None,
            setup_concurrency: 4,
        },
    )
    .await
    .unwrap();
    assert!(m.sent > 0, "{m:?}");
    assert_eq!(
        m.deliveries.expected,
        m.sent * 3,
        "every message is expected by the 3 members of its room"
    );
    assert_eq!((m.deliveries.lost, m.deliveries.duplicated), (0, 0), "{m:?}");
    assert!(m.send_errors.is_empty() && m.sync_errors.is_empty(), "{m:?}");

    // A user in 30 rooms pages its room list with sliding sync.
    let list = scenarios::roomlist::run(
        &target,
        scenarios::roomlist::Params {
            rooms: 30,
            requests: 2,
            setup_concurrency: 4,
        },
    )
    .await
    .unwrap();
    assert_eq!((list.wrong_answers, list.errors, list.first_page.count), (0, 0, 2), "{list:?}");

    // The same, the members following with sliding sync.
    let mut sliding = target.clone();
    sliding.sliding = true;
    let m = scenarios::messages::run(
        &sliding,
        scenarios::messages::Params {
            users: 6,
            rooms: 2,
            seconds: 1.5,
            rate_per_sender: None,
            setup_concurrency: 4,
        },
    )
    .await
    .unwrap();
    assert!(m.sent > 0, "{m:?}");
    assert_eq!(m.deliveries.expected, m.sent * 3);
    assert_eq!((m.deliveries.lost, m.deliveries.duplicated), (0, 0), "sliding sync: {m:?}");
    assert!(m.send_errors.is_empty() && m.sync_errors.is_empty(), "{m:?}");

    let td = scenarios::todevice::run(
        &target,
        scenarios::todevice::Params {
            pairs: 3,
            seconds: 1.0,
            rate_per_sender: None,
            setup_concurrency: 4,
        },
    )
    .await
    .unwrap();
    assert!(td.sent > 0, "{td:?}");
    assert_eq!(td.deliveries.expected, td.sent, "each message has one receiving device");
    assert_eq!((td.deliveries.lost, td.deliveries.duplicated), (0, 0), "{td:?}");
    assert!(td.send_errors.is_empty() && td.sync_errors.is_empty(), "{td:?}");

    let paced = scenarios::messages::run(
        &target,
        scenarios::messages::Params {
            users: 4,
            rooms: 1,
            seconds: 1.0,
            rate_per_sender: Some(5.0),
            setup_concurrency: 4,
        },
    )
    .await
    .unwrap();
    assert!(paced.sent > 0 && paced.sent <= 4 * 6, "a fixed rate bounds the sends: {paced:?}");
    assert_eq!((paced.deliveries.lost, paced.deliveries.duplicated), (0, 0));

    let b = scenarios::bigroom::run(
        &target,
        scenarios::bigroom::Params {
            members: 25,
            messages: 3,
            interval: Duration::from_millis(50),
            concurrency: 8,
            channel: false,
            online: None,
            senders: 3,
            http2: false,
        },
    )
    .await
    .unwrap();
    assert_eq!(b.joined, 25, "{b:?}");
    assert_eq!(b.deliveries.expected, 75);
    assert_eq!(b.send_latency.count, 3, "three senders' messages: {b:?}");
    assert_eq!((b.deliveries.lost, b.deliveries.duplicated), (0, 0), "{b:?}");
    assert!(b.views.is_none());

    // The same as a broadcast channel: every subscriber gets every post,
    // and the last post's views count each subscriber once.
    let c = scenarios::bigroom::run(
        &target,
        scenarios::bigroom::Params {
            members: 25,
            messages: 3,
            interval: Duration::from_millis(50),
            concurrency: 8,
            channel: true,
            online: Some(20),
            senders: 1,
            http2: true,
        },
    )
    .await
    .unwrap();
    assert_eq!((c.joined, c.online, c.deliveries.expected), (25, 20, 60), "{c:?}");
    assert_eq!((c.deliveries.lost, c.deliveries.duplicated), (0, 0), "{c:?}");
    let views = c.views.as_ref().expect("a channel's views are checked");
    assert_eq!((views.counted, views.expected), (24, 24), "{c:?}");

    for http2 in [false, true] {
        let i = scenarios::idle::run(
            &target,
            scenarios::idle::Params {
                clients: 60,
                users: 6,
                sources: 2,
                http2,
                server_pid: None,
                concurrency: 8,
            },
        )
        .await
        .unwrap();
        assert_eq!(i.held, 60, "{i:?}");
        assert_eq!(
            (i.deliveries.expected, i.deliveries.lost, i.deliveries.duplicated),
            (60, 0, 0),
            "{i:?}"
        );
    }
}

/// The surge scenario at a small size: people chatting lose and repeat
/// nothing and see no error while newcomers flood in at ten times capacity;
/// every newcomer is either admitted or refused with M_LIMIT_EXCEEDED and a
/// retry time, never left to time out; the server counts what it refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surge_keeps_chatters_whole_and_answers_every_newcomer() {
    let server = Server::start_with_config("metrics_listen = \"127.0.0.1:0\"\n");
    let target = Target::new(&server.url);
    let s = scenarios::surge::run(
        &target,
        scenarios::surge::Params {
            users: 6,
            rooms: 2,
            rate_per_sender: 4.0,
            capacity_seconds: 3.0,
            capacity: None,
            capacity_concurrency: 4,
            before_seconds: 1.5,
            flood_seconds: 3.0,
            after_seconds: 2.0,
            multiplier: 10.0,
            sources: 4,
            newcomer_timeout: Duration::from_secs(30),
            server_pid: None,
            setup_concurrency: 4,
        },
    )
    .await
    .unwrap();
    assert!(s.capacity_signups_per_sec > 0.0, "{s:?}");
    assert!(s.sent > 0, "{s:?}");
    assert_eq!((s.deliveries.lost, s.deliveries.duplicated), (0, 0), "{s:?}");
    assert_eq!(s.deliveries.expected, s.sent * 3, "each room has 3 members: {s:?}");
    assert!(s.send_errors.is_empty() && s.sync_errors.is_empty(), "{s:?}");
    let n = &s.newcomers;
    assert!(n.attempts > 0 && n.registered > 0 && n.refused > 0, "{n:?}");
    assert_eq!(n.registered + n.refused, n.attempts, "every newcomer got an answer: {n:?}");
    assert_eq!((n.timed_out, n.refused_without_retry_after, n.failed.len()), (0, 0, 0), "{n:?}");
    let shed = common::metric(&server, "kabar_load_shed_total{class=\"password_hashing\",reason=\"queue\"}").await;
    assert!(
        shed >= n.refused as f64,
        "the server counted {shed} refusals, the newcomers saw {}",
        n.refused
    );
}
