//! The bus over NATS (core NATS, no JetStream: nothing on the bus needs to
//! be durable, the store is).
//!
//! Every node publishes on `{prefix}.{kind}` and subscribes to `{prefix}.>`,
//! dropping its own messages. Commits are coalesced: the publishing task
//! sends only the newest head each time it runs, so a node committing a
//! thousand batches a second sends at most as many messages as NATS takes,
//! never a backlog. The client reconnects by itself; while it is away,
//! [`Bus::connected`] is false and the store's catch-up keeps every node
//! correct, only slower.

use std::time::Duration;

use async_nats::{ConnectOptions, ServerAddr, connection::State};
use futures::StreamExt;
use tokio::sync::{broadcast, mpsc, watch};

use crate::{Bus, BusError, BusMessage, FromNode};

/// How many messages from other nodes wait for a slow receiver before the
/// oldest are dropped (a receiver that lagged catches up from the store).
const RECEIVE_BUFFER: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The least time between two commit announcements of one node: a busy
/// node commits thousands of small batches a second, and one announcement
/// of the newest head covers all of them (the others read the store once).
const PUBLISH_GAP: Duration = Duration::from_millis(2);
/// Messages other than commits waiting to be published; more are dropped
/// (they are best effort, and a backlog would only deliver stale news).
const OUTBOX: usize = 4096;

pub struct NatsBus {
    node: String,
    client: async_nats::Client,
    /// The newest head this node committed, for the publishing task.
    committed: watch::Sender<u64>,
    /// Every other message, for the publishing task.
    outbox: mpsc::Sender<BusMessage>,
    /// What other nodes announce: commits, and the rest.
    commits: broadcast::Sender<FromNode>,
    news: broadcast::Sender<FromNode>,
}

impl NatsBus {
    /// Connects to the first NATS server of `urls` that answers and starts
    /// publishing and receiving under `prefix`. Fails if none answers now;
    /// later outages are ridden out by reconnecting.
    pub async fn connect(urls: &[String], prefix: &str, node: &str) -> Result<Self, BusError> {
        let addrs = urls
            .iter()
            .map(|u| u.parse::<ServerAddr>().map_err(|e| BusError::BadUrl(format!("{u}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let connect_error = |reason: String| BusError::Connect {
            urls: urls.join(", "),
            reason,
        };
        let (committed, mut newest) = watch::channel(0);
        let (commits, _) = broadcast::channel(RECEIVE_BUFFER);
        let (news, _) = broadcast::channel(RECEIVE_BUFFER);
        let (announce_again, tell_own_node, me) = (committed.clone(), commits.clone(), node.to_owned());
        let client = ConnectOptions::new()
            .name(format!("kabar {node}"))
            .connection_timeout(CONNECT_TIMEOUT)
            .max_reconnects(None)
            .event_callback(move |event| {
                let (announce_again, tell_own_node, me) = (announce_again.clone(), tell_own_node.clone(), me.clone());
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("the bus (NATS) is connected");
                            // Announcements made while NATS was away were
                            // lost: announce the newest head again, so that
                            // every node (each does the same) reads at once
                            // what the others committed meanwhile.
                            announce_again.send_modify(|_| {});
                            // And this node may have missed theirs.
                            let _ = tell_own_node.send(FromNode {
                                node: me,
                                message: BusMessage::Missed,
                            });
                        }
                        async_nats::Event::Disconnected => tracing::warn!("the bus (NATS) is disconnected; reconnecting"),
                        other => tracing::debug!(event = %other, "bus event"),
                    }
                }
            })
            .connect(addrs)
            .await
            .map_err(|e| connect_error(e.to_string()))?;
        let mut subscription = client
            .subscribe(format!("{prefix}.>"))
            .await
            .map_err(|e| BusError::Subscribe(e.to_string()))?;
        let (to_applier, to_others) = (commits.clone(), news.clone());
        let me = node.to_owned();
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                match serde_json::from_slice::<FromNode>(&message.payload) {
                    Ok(m) if m.node == me => {}
                    // No receiver yet is fine: nobody is waiting.
                    Ok(
                        m @ FromNode {
                            message: BusMessage::Committed { .. },
                            ..
                        },
                    ) => drop(to_applier.send(m)),
                    Ok(m) => drop(to_others.send(m)),
                    Err(e) => tracing::warn!(subject = %message.subject, error = %e, "an unreadable bus message"),
                }
            }
        });
        let (outbox, mut queued) = mpsc::channel(OUTBOX);
        let (publisher, me, prefix) = (client.clone(), node.to_owned(), prefix.to_owned());
        tokio::spawn(async move {
            let mut next_announcement = tokio::time::Instant::now();
            loop {
                let message = tokio::select! {
                    changed = newest.changed() => match changed {
                        Ok(()) => {
                            // At most one announcement per PUBLISH_GAP: the
                            // newest head covers every commit before it.
                            tokio::time::sleep_until(next_announcement).await;
                            next_announcement = tokio::time::Instant::now() + PUBLISH_GAP;
                            BusMessage::Committed { head: *newest.borrow_and_update() }
                        }
                        Err(_) => break,
                    },
                    next = queued.recv() => match next {
                        Some(m) => m,
                        None => break,
                    },
                };
                let subject = format!("{prefix}.{}", message.kind());
                let message = FromNode { node: me.clone(), message };
                let Ok(payload) = serde_json::to_vec(&message) else { continue };
                if let Err(e) = publisher.publish(subject, payload.into()).await {
                    tracing::debug!(error = %e, "a message was not published on the bus");
                }
            }
        });
        Ok(Self {
            node: node.to_owned(),
            client,
            committed,
            outbox,
            commits,
            news,
        })
    }
}

impl Bus for NatsBus {
    fn node(&self) -> &str {
        &self.node
    }

    fn publish(&self, message: BusMessage) {
        match message {
            BusMessage::Committed { head } => {
                self.committed.send_if_modified(|newest| {
                    let newer = head > *newest;
                    if newer {
                        *newest = head;
                    }
                    newer
                });
            }
            BusMessage::Missed => {}
            other => {
                if self.outbox.try_send(other).is_err() {
                    tracing::debug!("the bus outbox is full; a message was dropped");
                }
            }
        }
    }

    fn commits(&self) -> broadcast::Receiver<FromNode> {
        self.commits.subscribe()
    }

    fn news(&self) -> broadcast::Receiver<FromNode> {
        self.news.subscribe()
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::test_server::NatsServer;

    async fn next_committed(rx: &mut broadcast::Receiver<FromNode>, at_least: u64) -> FromNode {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let m = rx.recv().await.expect("the bus is open");
                if let BusMessage::Committed { head } = m.message
                    && head >= at_least
                {
                    return m;
                }
            }
        })
        .await
        .expect("the commit arrives")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nodes_hear_each_others_commits_not_their_own_and_ride_out_a_restart_of_nats() {
        let mut server = NatsServer::start();
        let urls = vec![server.url()];
        let a = NatsBus::connect(&urls, "kabar-test", "a").await.unwrap();
        let b = NatsBus::connect(&urls, "kabar-test", "b").await.unwrap();
        assert!(a.connected() && b.connected());
        let (mut a_hears, mut b_hears) = (a.commits(), b.commits());
        let mut a_news = a.news();
        a.client.flush().await.unwrap();
        b.client.flush().await.unwrap();

        a.publish(BusMessage::Committed { head: 5 });
        let m = next_committed(&mut b_hears, 5).await;
        assert_eq!(m.node, "a");
        b.publish(BusMessage::Committed { head: 7 });
        assert_eq!(next_committed(&mut a_hears, 7).await.node, "b");
        let typing = BusMessage::Typing {
            room_id: "!r:x".into(),
            user_id: "@u:x".into(),
            typing: true,
            timeout_ms: 3000,
        };
        b.publish(typing.clone());
        let heard = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let m = a_news.recv().await.unwrap();
                if m.message.kind() == "typing" {
                    return m;
                }
            }
        })
        .await
        .expect("typing arrives");
        assert_eq!((heard.node.as_str(), heard.message), ("b", typing));
        assert!(
            tokio::time::timeout(Duration::from_millis(200), async {
                loop {
                    if a_hears.recv().await.unwrap().node == "a" {
                        return;
                    }
                }
            })
            .await
            .is_err(),
            "a never hears itself"
        );

        // NATS goes away and comes back on the same port: both reconnect
        // by themselves and commits flow again.
        server.stop();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!a.connected(), "a knows the bus is down");
        server.restart();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !(a.connected() && b.connected()) {
            assert!(tokio::time::Instant::now() < deadline, "both reconnect within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Each tells its own node that it may have missed messages.
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if a_hears.recv().await.unwrap().message == BusMessage::Missed {
                    return;
                }
            }
        })
        .await
        .expect("a is told it may have missed messages");
        // The subscription is renewed on reconnect; publish until heard.
        let mut head = 100;
        let heard = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                a.publish(BusMessage::Committed { head });
                head += 1;
                if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(100), b_hears.recv()).await
                    && matches!(m.message, BusMessage::Committed { head } if head >= 100)
                {
                    return m;
                }
            }
        })
        .await
        .expect("commits are heard again after NATS returns");
        assert_eq!(heard.node, "a");
    }

    #[tokio::test]
    async fn connecting_to_nothing_fails_with_the_urls_named() {
        let err = match NatsBus::connect(&["nats://127.0.0.1:1".into()], "kabar", "a").await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("nothing listens on port 1"),
        };
        assert!(err.contains("nats://127.0.0.1:1"), "{err}");
    }
}
