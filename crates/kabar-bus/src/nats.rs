//! The bus over NATS (core NATS, no JetStream: nothing on the bus needs to
//! be durable, the store is).
//!
//! Every node publishes on `{prefix}.{kind}` and subscribes to `{prefix}.>`,
//! dropping its own messages. Commits are coalesced: the publishing task
//! sends at most one announcement per [`PUBLISH_GAP`], with the newest head
//! and every batch committed since the last one (up to
//! [`MAX_CARRIED_BYTES`]; past that, the head alone), so a node committing
//! a thousand batches a second sends a few hundred messages, never a
//! backlog. The client reconnects by itself; while it is away,
//! [`Bus::connected`] is false and the store's catch-up keeps every node
//! correct, only slower.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::{ConnectOptions, ServerAddr, connection::State};
use futures::StreamExt;
use tokio::sync::{Notify, broadcast, mpsc};

use crate::{Bus, BusError, BusMessage, CarriedBatch, FromNode};

/// How many messages from other nodes wait for a slow receiver before the
/// oldest are dropped (a receiver that lagged catches up from the store).
const RECEIVE_BUFFER: usize = 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The least time between two commit announcements of one node: a busy
/// node commits thousands of small batches a second, and one announcement
/// carries all of them (each is a wake-up on every other node).
pub const PUBLISH_GAP: Duration = Duration::from_millis(2);
/// The most batch bytes one announcement carries (NATS takes 1 MiB per
/// message by default); the others read what is left out from the store.
pub const MAX_CARRIED_BYTES: usize = 256 * 1024;
/// Messages other than commits waiting to be published; more are dropped
/// (they are best effort, and a backlog would only deliver stale news).
const OUTBOX: usize = 4096;

pub struct NatsBus {
    node: String,
    client: async_nats::Client,
    /// This node's commits not announced yet, for the publishing task.
    announcements: Arc<Announcements>,
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
        let announcements = Arc::new(Announcements::default());
        let (commits, _) = broadcast::channel(RECEIVE_BUFFER);
        let (news, _) = broadcast::channel(RECEIVE_BUFFER);
        let (announce_again, tell_own_node, me) = (announcements.clone(), commits.clone(), node.to_owned());
        let client = ConnectOptions::new()
            .name(format!("kabar {node}"))
            .connection_timeout(CONNECT_TIMEOUT)
            .max_reconnects(None)
            // The server does not send a node its own messages back: each
            // would cost a read and a parse only to be dropped.
            .no_echo()
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
                            announce_again.head_again();
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
        let committed_subject = format!("{prefix}.{}", BusMessage::committed(0).kind());
        tokio::spawn(async move {
            while let Some(message) = subscription.next().await {
                let read = if message.subject.as_str() == committed_subject {
                    serde_json::from_slice::<CommittedWire>(&message.payload).map(CommittedWire::into_message)
                } else {
                    serde_json::from_slice::<FromNode>(&message.payload)
                };
                match read {
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
        let (publisher, me, prefix, pending) = (client.clone(), node.to_owned(), prefix.to_owned(), announcements.clone());
        tokio::spawn(async move {
            let mut next_announcement = tokio::time::Instant::now();
            loop {
                let due = pending.due();
                let message = tokio::select! {
                    _ = pending.ready.notified(), if !due => continue,
                    // At most one announcement per PUBLISH_GAP, carrying
                    // every commit since the last one.
                    _ = tokio::time::sleep_until(next_announcement), if due => {
                        next_announcement = tokio::time::Instant::now() + PUBLISH_GAP;
                        match pending.take() {
                            Some(message) => message,
                            None => continue,
                        }
                    }
                    next = queued.recv() => match next {
                        Some(m) => m,
                        None => break,
                    },
                };
                let subject = format!("{prefix}.{}", message.kind());
                let payload = match message {
                    BusMessage::Committed { head, batches } => serde_json::to_vec(&CommittedWire {
                        node: me.clone(),
                        head,
                        batches,
                    }),
                    message => serde_json::to_vec(&FromNode { node: me.clone(), message }),
                };
                let Ok(payload) = payload else { continue };
                if let Err(e) = publisher.publish(subject, payload.into()).await {
                    tracing::debug!(error = %e, "a message was not published on the bus");
                }
            }
        });
        Ok(Self {
            node: node.to_owned(),
            client,
            announcements,
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
            BusMessage::Committed { head, batches } => self.announcements.add(head, batches),
            BusMessage::Missed => {}
            other => {
                if self.outbox.try_send(other).is_err() {
                    tracing::debug!("the bus outbox is full; a message was dropped");
                }
            }
        }
    }

    fn reaches_others(&self) -> bool {
        true
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

/// A commit announcement as NATS carries it: its own plain object, since
/// the carried batches are raw JSON, which serde cannot read back through
/// the tagged, flattened form of the other messages.
#[derive(serde::Serialize, serde::Deserialize)]
struct CommittedWire {
    node: String,
    head: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    batches: Vec<CarriedBatch>,
}

impl CommittedWire {
    fn into_message(self) -> FromNode {
        FromNode {
            node: self.node,
            message: BusMessage::Committed {
                head: self.head,
                batches: self.batches,
            },
        }
    }
}

/// A node's commits waiting for the publishing task.
#[derive(Default)]
struct Announcements {
    waiting: Mutex<Waiting>,
    ready: Notify,
}

#[derive(Default)]
struct Waiting {
    head: u64,
    batches: Vec<CarriedBatch>,
    bytes: usize,
    /// A batch since the last announcement was left out (too big): the
    /// ones after it are too, since no node could apply them before reading
    /// the one left out from the store (which covers them as well).
    left_out: bool,
    due: bool,
}

impl Announcements {
    fn add(&self, head: u64, batches: Vec<CarriedBatch>) {
        {
            let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            if head <= w.head && batches.is_empty() {
                return;
            }
            w.head = w.head.max(head);
            for batch in batches {
                w.bytes += batch.json().len();
                w.left_out |= w.bytes > MAX_CARRIED_BYTES;
                if !w.left_out {
                    w.batches.push(batch);
                }
            }
            w.due = true;
        }
        self.ready.notify_one();
    }

    /// Announce the newest head again (after a reconnection).
    fn head_again(&self) {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).due = true;
        self.ready.notify_one();
    }

    fn due(&self) -> bool {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner()).due
    }

    /// The announcement to send now, if one is due.
    fn take(&self) -> Option<BusMessage> {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if !w.due {
            return None;
        }
        w.due = false;
        w.bytes = 0;
        w.left_out = false;
        Some(BusMessage::Committed {
            head: w.head,
            batches: std::mem::take(&mut w.batches),
        })
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
                if let BusMessage::Committed { head, .. } = m.message
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

        a.publish(BusMessage::committed(5));
        let m = next_committed(&mut b_hears, 5).await;
        assert_eq!(m.node, "a");
        b.publish(BusMessage::committed(7));
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
                a.publish(BusMessage::committed(head));
                head += 1;
                if let Ok(Ok(m)) = tokio::time::timeout(Duration::from_millis(100), b_hears.recv()).await
                    && matches!(m.message, BusMessage::Committed { head, .. } if head >= 100)
                {
                    return m;
                }
            }
        })
        .await
        .expect("commits are heard again after NATS returns");
        assert_eq!(heard.node, "a");
    }

    fn batch(after: u64, head: u64, padding: usize) -> CarriedBatch {
        CarriedBatch::new(format!(r#"{{"after":{after},"head":{head},"pad":"{}"}}"#, "x".repeat(padding))).unwrap()
    }

    #[test]
    fn one_announcement_carries_the_batches_since_the_last_until_they_are_too_big() {
        let a = Announcements::default();
        assert!(a.take().is_none(), "nothing committed, nothing due");
        a.add(2, vec![batch(0, 2, 0)]);
        a.add(3, vec![batch(2, 3, 0)]);
        assert_eq!(
            a.take(),
            Some(BusMessage::Committed {
                head: 3,
                batches: vec![batch(0, 2, 0), batch(2, 3, 0)]
            })
        );
        assert!(a.take().is_none());
        a.add(4, vec![batch(3, 4, 10)]);
        a.add(5, vec![batch(4, 5, MAX_CARRIED_BYTES)]);
        a.add(6, vec![batch(5, 6, 10)]);
        assert_eq!(
            a.take(),
            Some(BusMessage::Committed {
                head: 6,
                batches: vec![batch(3, 4, 10)]
            }),
            "past the size limit the head alone is announced"
        );
        a.add(7, vec![batch(6, 7, 10)]);
        assert_eq!(
            a.take()
                .map(|m| matches!(m, BusMessage::Committed { head: 7, batches } if batches.len() == 1)),
            Some(true)
        );
        a.head_again();
        assert_eq!(a.take(), Some(BusMessage::committed(7)), "after a reconnection, the head again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_committed_batch_travels_whole_to_the_other_nodes() {
        let server = NatsServer::start();
        let urls = vec![server.url()];
        let a = NatsBus::connect(&urls, "kabar-test", "a").await.unwrap();
        let b = NatsBus::connect(&urls, "kabar-test", "b").await.unwrap();
        let mut b_hears = b.commits();
        a.client.flush().await.unwrap();
        b.client.flush().await.unwrap();
        a.publish(BusMessage::Committed {
            head: 9,
            batches: vec![batch(8, 9, 100)],
        });
        let m = next_committed(&mut b_hears, 9).await;
        assert_eq!(
            m.message,
            BusMessage::Committed {
                head: 9,
                batches: vec![batch(8, 9, 100)]
            }
        );
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
