//! Which nodes are alive: every node sends a heartbeat on the bus every
//! [`HEARTBEAT`] and keeps the last heartbeat it heard from each other node.
//! A node not heard from for [`LIVE_WITHIN`] is taken for gone.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::broadcast;

use crate::{Bus, BusMessage, FromNode, NodeStatus};

pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// Three missed heartbeats.
pub const LIVE_WITHIN: Duration = Duration::from_secs(3);

/// A node and what its latest heartbeat said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node: String,
    /// This node itself.
    pub this_node: bool,
    pub status: NodeStatus,
    /// How long ago the heartbeat was heard (0 for this node).
    pub heard_ago: Duration,
}

pub struct Peers {
    bus: Arc<dyn Bus>,
    heard: Mutex<HashMap<String, (Instant, NodeStatus)>>,
    /// What this node says of itself, asked at each heartbeat.
    own: Box<dyn Fn() -> NodeStatus + Send + Sync>,
}

impl Peers {
    /// Starts sending this node's heartbeat (`own()`) and keeping the
    /// others', on the current tokio runtime.
    pub fn spawn(bus: Arc<dyn Bus>, own: impl Fn() -> NodeStatus + Send + Sync + 'static) -> Arc<Self> {
        let peers = Arc::new(Self {
            bus,
            heard: Mutex::new(HashMap::new()),
            own: Box::new(own),
        });
        let beating = peers.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEARTBEAT);
            loop {
                tick.tick().await;
                beating.bus.publish(BusMessage::Heartbeat((beating.own)()));
            }
        });
        let listening = peers.clone();
        let mut rx = peers.bus.news();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(FromNode {
                        node,
                        message: BusMessage::Heartbeat(status),
                    }) => listening.heard(node, status),
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        peers
    }

    fn heard(&self, node: String, status: NodeStatus) {
        let mut heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        heard.insert(node, (Instant::now(), status));
        // Forget nodes gone for long, so the map stays as small as the cluster.
        heard.retain(|_, (at, _)| at.elapsed() < LIVE_WITHIN * 100);
    }

    /// How many nodes are live: this one and every other heard from within
    /// [`LIVE_WITHIN`] (without asking this node's status).
    pub fn live_count(&self) -> usize {
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        1 + heard
            .iter()
            .filter(|(node, (at, _))| at.elapsed() < LIVE_WITHIN && node.as_str() != self.bus.node())
            .count()
    }

    /// This node and every node heard from within [`LIVE_WITHIN`], by name.
    pub fn live(&self) -> Vec<Peer> {
        let mut out = vec![Peer {
            node: self.bus.node().to_owned(),
            this_node: true,
            status: (self.own)(),
            heard_ago: Duration::ZERO,
        }];
        let heard = self.heard.lock().unwrap_or_else(|p| p.into_inner());
        out.extend(
            heard
                .iter()
                .filter(|(node, (at, _))| at.elapsed() < LIVE_WITHIN && node.as_str() != self.bus.node())
                .map(|(node, (at, status))| Peer {
                    node: node.clone(),
                    this_node: false,
                    status: status.clone(),
                    heard_ago: at.elapsed(),
                }),
        );
        out.sort_by(|a, b| a.node.cmp(&b.node));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{nats::NatsBus, test_server::NatsServer};

    fn status(applied: u64) -> impl Fn() -> NodeStatus + Send + Sync + 'static {
        move || NodeStatus {
            version: "1".into(),
            applied,
            requests_per_second: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_node_lists_every_live_node() {
        let nats = NatsServer::start();
        let urls = vec![nats.url()];
        let a: Arc<dyn Bus> = Arc::new(NatsBus::connect(&urls, "peers", "a").await.unwrap());
        let b: Arc<dyn Bus> = Arc::new(NatsBus::connect(&urls, "peers", "b").await.unwrap());
        let on_a = Peers::spawn(a, status(10));
        let on_b = Peers::spawn(b, status(20));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let names: Vec<String> = on_a.live().into_iter().map(|p| p.node).collect();
            if names == ["a", "b"] {
                break;
            }
            assert!(Instant::now() < deadline, "a lists both nodes: {names:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let b_seen = on_a.live().into_iter().find(|p| p.node == "b").unwrap();
        assert_eq!((b_seen.this_node, b_seen.status.applied), (false, 20));
        assert!(on_b.live().iter().any(|p| p.node == "b" && p.this_node));
    }

    #[tokio::test]
    async fn a_node_not_heard_from_lately_is_not_listed() {
        let peers = Peers::spawn(Arc::new(crate::LocalBus::new("a")), status(1));
        peers.heard("b".into(), status(2)());
        assert_eq!((peers.live().len(), peers.live_count()), (2, 2));
        peers.heard.lock().unwrap().get_mut("b").unwrap().0 -= LIVE_WITHIN;
        let names: Vec<String> = peers.live().into_iter().map(|p| p.node).collect();
        assert_eq!(names, ["a"], "a node not heard from within {LIVE_WITHIN:?} is not listed");
        assert_eq!(peers.live_count(), 1);
    }
}
