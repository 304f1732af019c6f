//! The bus between Kabar nodes.
//!
//! The store is the only source of truth. A node that commits a batch of
//! the stream sends it on the bus, so that the other nodes apply it at once
//! without reading it back from the store; a batch too big to carry is
//! announced by its head only, and the others read it from the store. A
//! message lost on the bus (NATS restarted, a partition, a slow consumer)
//! delays a wake-up by at most one catch-up interval; it can never lose or
//! reorder an event, because a node applies a batch only when it continues
//! exactly what it has applied (by stream position), and reads any gap
//! from the store.
//!
//! Two engines: [`LocalBus`] for one node (nobody else to tell) and
//! [`nats::NatsBus`] for several nodes sharing a NATS server or cluster.

pub mod nats;
pub mod peers;
pub mod test_server;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::broadcast;

/// What one node tells the others.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BusMessage {
    /// The sending node committed stream positions up to `head`, and these
    /// `batches` of them (in commit order, possibly none: a batch too big
    /// to carry is left to the store). Whoever has applied less than `head`
    /// and cannot continue with the batches reads the store.
    Committed {
        head: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        batches: Vec<CarriedBatch>,
    },
    /// A user started or stopped typing in a room (typing lives in memory
    /// only: each node keeps what it hears).
    Typing {
        room_id: String,
        user_id: String,
        typing: bool,
        timeout_ms: u64,
    },
    /// A user's presence changed (in memory only, like typing).
    Presence {
        user_id: String,
        presence: String,
        status_msg: Option<String>,
    },
    /// The sending node is alive (see [`peers::Peers`]).
    Heartbeat(NodeStatus),
    /// Never sent between nodes: a bus tells its own node that it may have
    /// missed messages (it was disconnected), so whatever they said must be
    /// read from the store now.
    Missed,
}

impl BusMessage {
    /// A commit announcement that carries no batch.
    pub fn committed(head: u64) -> Self {
        BusMessage::Committed { head, batches: vec![] }
    }
}

/// A committed batch as its node encoded it: JSON the bus carries as it is
/// and does not read (the store's crate writes and reads it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CarriedBatch(Box<RawValue>);

impl CarriedBatch {
    /// `json`, if it is JSON.
    pub fn new(json: String) -> Option<Self> {
        RawValue::from_string(json).ok().map(Self)
    }

    /// JSON already checked (`serde_json::value::to_raw_value` wrote it).
    pub fn from_raw(json: Box<RawValue>) -> Self {
        Self(json)
    }

    pub fn json(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for CarriedBatch {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl Eq for CarriedBatch {}

/// What a node's heartbeat says of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub version: String,
    /// The stream position its applier has applied.
    pub applied: u64,
    /// Client requests it answered per second lately.
    pub requests_per_second: u64,
}

impl BusMessage {
    /// The last part of the message's subject.
    pub fn kind(&self) -> &'static str {
        match self {
            BusMessage::Committed { .. } => "committed",
            BusMessage::Typing { .. } => "typing",
            BusMessage::Presence { .. } => "presence",
            BusMessage::Heartbeat(_) => "heartbeat",
            BusMessage::Missed => "missed",
        }
    }
}

/// A message and the node that sent it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FromNode {
    pub node: String,
    #[serde(flatten)]
    pub message: BusMessage,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error("not a NATS URL: {0}")]
    BadUrl(String),
    #[error("NATS subscription failed: {0}")]
    Subscribe(String),
}

/// How a node talks to the others.
pub trait Bus: Send + Sync {
    /// This node's name on the bus.
    fn node(&self) -> &str;
    /// Tells every other node, best effort and without waiting: a message
    /// that cannot go now may be dropped (the store's catch-up covers it).
    /// Engines may merge several `Committed` messages into one (the newest
    /// head, the batches in order) and drop batches (never heads).
    fn publish(&self, message: BusMessage);
    /// Whether anyone else hears what this node publishes: a single node
    /// need not encode its commits for nobody.
    fn reaches_others(&self) -> bool;
    /// Other nodes' commit announcements (and [`BusMessage::Missed`]), for
    /// the applier. A receiver that falls behind loses the oldest ones
    /// (`RecvError::Lagged`).
    fn commits(&self) -> broadcast::Receiver<FromNode>;
    /// Everything else the other nodes say (typing, presence, heartbeats),
    /// never this node's own. Apart from commits so that the many commit
    /// announcements of a busy cluster wake only the applier.
    fn news(&self) -> broadcast::Receiver<FromNode>;
    /// Whether messages can reach the other nodes now.
    fn connected(&self) -> bool;
}

/// The bus of a single node: there is nobody to tell.
pub struct LocalBus {
    node: String,
    /// Never sent on; it only hands out receivers that wait forever.
    silent: broadcast::Sender<FromNode>,
}

impl LocalBus {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            silent: broadcast::channel(1).0,
        }
    }
}

impl Bus for LocalBus {
    fn node(&self) -> &str {
        &self.node
    }

    fn publish(&self, _message: BusMessage) {}

    fn reaches_others(&self) -> bool {
        false
    }

    fn commits(&self) -> broadcast::Receiver<FromNode> {
        self.silent.subscribe()
    }

    fn news(&self) -> broadcast::Receiver<FromNode> {
        self.silent.subscribe()
    }

    fn connected(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_travel_as_flat_json_with_their_node() {
        let m = FromNode {
            node: "a".into(),
            message: BusMessage::committed(42),
        };
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(json, r#"{"node":"a","kind":"committed","head":42}"#);
        assert_eq!(serde_json::from_str::<FromNode>(&json).unwrap(), m);
        assert!(CarriedBatch::new("not json".into()).is_none());
    }

    #[tokio::test]
    async fn a_single_node_hears_nothing_and_is_always_connected() {
        let bus = LocalBus::new("solo");
        let mut rx = bus.commits();
        bus.publish(BusMessage::committed(1));
        assert!(bus.connected());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), rx.recv()).await.is_err(),
            "its own message does not come back"
        );
    }
}
