//! Every benchmark scenario once, at a small size, against the real binary.
//! Correctness only (everything registered, joined, held and delivered exactly
//! once); speed is measured by bench/compare.sh, never asserted here.

mod common;

use std::time::Duration;

use common::Server;
use kabar_bench::{client::Target, scenarios};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_loses_nothing() {
    let server = Server::start();
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
        },
    )
    .await
    .unwrap();
    assert_eq!(b.joined, 25, "{b:?}");
    assert_eq!(b.deliveries.expected, 75);
    assert_eq!((b.deliveries.lost, b.deliveries.duplicated), (0, 0), "{b:?}");

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
