//! Send-to-device messaging: messages queued per device, delivered by its
//! syncs in stream order, deleted once the device has synced past them.
//!
//! **Invariant:** a message is deleted only after its device sent a sync
//! token at or past the message's position (the device acknowledged the
//! response that carried it). Until then every sync from an older token
//! delivers it again: at least once, in order, never after acknowledgment.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
};

use kabar_store::{QueuedToDevice, Session, Store, StreamPos, ToDeviceMessage};
use ruma::OwnedUserId;
use serde::Serialize;
use serde_json::{Map, Value, value::RawValue};

use crate::{
    applier::Applied,
    changes::{Changes, DeviceKey},
    error::{Error, Result},
};

/// Messages one sync response carries at most; the rest come with the next.
pub const MAX_PER_SYNC: usize = 100;
/// Content bytes one sync response carries at most (at least one message,
/// whatever its size): a response stays small enough for a phone.
pub const MAX_BYTES_PER_SYNC: usize = 512 * 1024;
/// Messages one send may queue (after `*` is expanded to devices).
const MAX_PER_SEND: usize = 10_000;
/// Largest content of one message. An Olm-encrypted room key is a few KiB.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Content bytes one send may queue (after `*` is expanded to devices).
const MAX_BYTES_PER_SEND: usize = 8 * 1024 * 1024;
/// Bound on remembered acknowledgment states; past it they are rebuilt.
const MAX_ACK_STATES: usize = 1_000_000;

/// What one device has been handed and what of it is deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct AckState {
    /// The highest position a sync response carried to the device.
    delivered_upto: StreamPos,
    /// Everything at or before this is deleted.
    deleted_upto: StreamPos,
}

impl AckState {
    /// Whether a sync from token `since` acknowledges messages not yet deleted.
    fn acknowledges_more(&self, since: StreamPos) -> bool {
        since > self.deleted_upto && self.delivered_upto > self.deleted_upto
    }
}

/// A to-device event as a client receives it.
#[derive(Debug, Serialize)]
pub struct ToDeviceEvent {
    sender: OwnedUserId,
    #[serde(rename = "type")]
    kind: String,
    content: Box<RawValue>,
}

/// What a sync gets: the events, and where the response must stop if
/// more messages are queued than one response carries.
#[derive(Debug, Default)]
pub struct ToDeviceBatch {
    pub events: Vec<ToDeviceEvent>,
    pub stop_at: Option<StreamPos>,
}

/// How many messages one user may queue: a sustained rate and a burst
/// (sharing a room key with every device of a big encrypted room at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SenderLimits {
    pub per_second: u32,
    pub burst: u32,
}

type SenderLimiter =
    governor::RateLimiter<OwnedUserId, governor::state::keyed::DefaultKeyedStateStore<OwnedUserId>, governor::clock::DefaultClock>;

pub struct ToDevice {
    store: Arc<dyn Store>,
    /// Read by syncs: a device whose queue did not change is not read.
    changes: Arc<Changes>,
    applied: Applied,
    acks: Mutex<HashMap<DeviceKey, AckState>>,
    /// Messages per sending user, so one account cannot fill every queue.
    senders: RwLock<SenderAllowance>,
}

/// The limiter for the configured [`SenderLimits`] and one share of them.
struct SenderAllowance {
    limits: SenderLimits,
    /// How many nodes share the sustained rate (see [`ToDevice::set_share`]).
    share: u32,
    limiter: SenderLimiter,
}

impl SenderAllowance {
    fn new(limits: SenderLimits, share: u32) -> Self {
        let nonzero = |n: u32| std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
        let per_second = limits.per_second.div_ceil(share.max(1));
        let quota = governor::Quota::per_second(nonzero(per_second)).allow_burst(nonzero(limits.burst));
        Self {
            limits,
            share,
            limiter: governor::RateLimiter::keyed(quota),
        }
    }
}

impl ToDevice {
    pub fn new(store: Arc<dyn Store>, changes: Arc<Changes>, applied: Applied, limits: SenderLimits) -> Self {
        Self {
            store,
            changes,
            applied,
            acks: Mutex::new(HashMap::new()),
            senders: RwLock::new(SenderAllowance::new(limits, 1)),
        }
    }

    /// Makes this node enforce its part of the sustained rate when `nodes`
    /// nodes share it (each serves about as many of a user's requests). The
    /// burst stays whole on every node: one request may carry a whole burst
    /// (a room key for every device of a big room), and must not become too
    /// large to send because the cluster grew.
    pub fn set_share(&self, nodes: u32) {
        let nodes = nodes.max(1);
        let mut senders = self.senders.write().unwrap_or_else(|p| p.into_inner());
        if senders.share != nodes {
            *senders = SenderAllowance::new(senders.limits, nodes);
        }
    }

    /// Takes `n` messages from the sender's allowance, or says when to retry.
    fn admit_sender(&self, sender: &OwnedUserId, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let senders = self.senders.read().unwrap_or_else(|p| p.into_inner());
        if senders.limiter.len() > 100_000 {
            senders.limiter.retain_recent();
        }
        let cells = std::num::NonZeroU32::new(n.min(u32::MAX as usize) as u32).expect("n > 0");
        match senders.limiter.check_key_n(sender, cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                use governor::clock::Clock;
                let wait = not_until.wait_time_from(governor::clock::DefaultClock::default().now());
                Err(Error::LimitExceeded {
                    retry_after_ms: wait.as_millis() as u64 + 1,
                })
            }
            // More than a whole burst can never pass: say so rather than "retry".
            Err(_) => Err(Error::TooLarge(format!(
                "one request may send at most {} messages",
                senders.limits.burst.max(1)
            ))),
        }
    }

    /// PUT /sendToDevice/{type}/{txn}: `messages` maps users to devices (or
    /// `*`, every device of the user) to contents. Idempotent per sending
    /// device and transaction id. Users of other servers are not reachable
    /// (no federation); their messages are dropped.
    pub async fn send(&self, sender: &Session, kind: &str, txn_id: &str, messages: Map<String, Value>) -> Result<()> {
        if kind.is_empty() || kind.len() > 255 || kabar_domain::names::has_control_chars(kind) {
            return Err(Error::InvalidParam("invalid event type".into()));
        }
        let mut queue = vec![];
        let mut bytes = 0;
        for (user, devices) in messages {
            let recipient = OwnedUserId::try_from(user.as_str()).map_err(|_| Error::InvalidParam(format!("{user} is not a user id")))?;
            let devices = devices
                .as_object()
                .ok_or_else(|| Error::BadJson("messages must map users to objects of devices".into()))?;
            if recipient.server_name() != sender.user_id.server_name() {
                continue;
            }
            for (device, content) in devices {
                if !content.is_object() {
                    return Err(Error::BadJson("a message's content must be an object".into()));
                }
                let content = content.to_string();
                if content.len() > MAX_MESSAGE_BYTES {
                    return Err(Error::TooLarge(format!(
                        "a message's content is limited to {MAX_MESSAGE_BYTES} bytes"
                    )));
                }
                let targets = if device == "*" {
                    self.store.devices(&recipient).await?.into_iter().map(|d| d.device_id).collect()
                } else {
                    vec![device.clone()]
                };
                // Checked before the copies are made, so a `*` to many
                // devices cannot make one request cost unbounded memory.
                bytes += content.len() * targets.len();
                if bytes > MAX_BYTES_PER_SEND || queue.len() + targets.len() > MAX_PER_SEND {
                    return Err(Error::TooLarge(format!(
                        "at most {MAX_PER_SEND} messages and {MAX_BYTES_PER_SEND} bytes per request"
                    )));
                }
                queue.extend(targets.into_iter().map(|device_id| ToDeviceMessage {
                    recipient: recipient.clone(),
                    device_id,
                    kind: kind.to_owned(),
                    content: content.clone(),
                }));
                if queue.len() > MAX_PER_SEND {
                    return Err(Error::TooLarge(format!("at most {MAX_PER_SEND} messages per request")));
                }
            }
        }
        self.admit_sender(&sender.user_id, queue.len())?;
        if let Some(pos) = self.store.queue_to_device(sender, kind, txn_id, queue).await? {
            self.applied.reached(pos).await;
        }
        Ok(())
    }

    /// For a device's sync from `since` (none: an initial sync) up to
    /// `until`: first deletes what the token acknowledges, then returns the
    /// messages queued after it, oldest first.
    pub async fn for_sync(&self, session: &Session, since: Option<StreamPos>, until: StreamPos) -> Result<ToDeviceBatch> {
        if let Some(since) = since {
            self.acknowledge(session, since).await?;
        }
        let after = since.unwrap_or(0);
        if since.is_some() && !self.changes.to_device.changed_since(session, after) {
            return Ok(ToDeviceBatch::default());
        }
        let mut queued = self
            .store
            .to_device(&session.user_id, &session.device_id, after, until, MAX_PER_SYNC)
            .await?;
        // At most MAX_PER_SYNC messages and MAX_BYTES_PER_SYNC bytes (but at
        // least one message); the rest come with the next sync.
        let mut bytes = 0;
        let fits = queued
            .iter()
            .take_while(|m| {
                bytes += m.content.len();
                bytes <= MAX_BYTES_PER_SYNC
            })
            .count()
            .max(1);
        let more = queued.len() == MAX_PER_SYNC || fits < queued.len();
        queued.truncate(fits);
        let Some(last) = queued.last().map(|m| m.pos) else {
            if since.is_none() {
                // Nothing is queued for the device up to `until`: its next
                // sync need not look for what an earlier run delivered (after
                // a restart, that look was one read per device on the first
                // message to a crowd).
                self.ack_state(session, until, |_| {});
            }
            return Ok(ToDeviceBatch::default());
        };
        self.ack_state(session, after, |state| state.delivered_upto = state.delivered_upto.max(last));
        let stop_at = more.then_some(last);
        let events = queued.into_iter().filter_map(to_event).collect();
        Ok(ToDeviceBatch { events, stop_at })
    }

    /// Updates what this process keeps of `device`, starting it (if it
    /// keeps nothing yet) as "nothing queued at or before `deleted_upto`".
    fn ack_state(&self, device: &DeviceKey, deleted_upto: StreamPos, update: impl FnOnce(&mut AckState)) {
        let mut acks = self.acks.lock().expect("to-device acks lock");
        if acks.len() >= MAX_ACK_STATES {
            acks.clear();
        }
        update(acks.entry(device.clone()).or_insert(AckState {
            delivered_upto: 0,
            deleted_upto,
        }));
    }

    /// The device synced from `since`: it has every message up to there.
    async fn acknowledge(&self, device: &DeviceKey, since: StreamPos) -> Result<()> {
        let known = self.acks.lock().expect("to-device acks lock").get(device).copied();
        let delete = match known {
            Some(state) => state.acknowledges_more(since),
            // Nothing handed out by this process: messages a previous run
            // delivered may still be queued. A read is cheaper than a write.
            None => !self
                .store
                .to_device(&device.user_id, &device.device_id, 0, since, 1)
                .await?
                .is_empty(),
        };
        if delete {
            self.store.delete_to_device(&device.user_id, &device.device_id, since).await?;
        }
        let mut acks = self.acks.lock().expect("to-device acks lock");
        match acks.get_mut(device) {
            Some(state) => state.deleted_upto = state.deleted_upto.max(since),
            None => {
                acks.insert(
                    device.clone(),
                    AckState {
                        delivered_upto: 0,
                        deleted_upto: since,
                    },
                );
            }
        }
        Ok(())
    }
}

fn to_event(m: QueuedToDevice) -> Option<ToDeviceEvent> {
    match RawValue::from_string(m.content) {
        Ok(content) => Some(ToDeviceEvent {
            sender: m.sender,
            kind: m.kind,
            content,
        }),
        Err(e) => {
            tracing::error!(error = %e, pos = m.pos, "stored to-device content is not JSON");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_acknowledges_only_what_was_delivered_and_not_yet_deleted() {
        let state = AckState {
            delivered_upto: 10,
            deleted_upto: 4,
        };
        assert!(state.acknowledges_more(5));
        assert!(state.acknowledges_more(12));
        assert!(!state.acknowledges_more(4), "the same token again deletes nothing more");
        assert!(!state.acknowledges_more(3), "an older token deletes nothing");
        let all_deleted = AckState {
            delivered_upto: 10,
            deleted_upto: 10,
        };
        assert!(!all_deleted.acknowledges_more(20), "nothing delivered since the last deletion");
    }

    #[test]
    fn a_shared_allowance_divides_the_rate_and_keeps_the_whole_burst() {
        use governor::clock::Clock;
        let limits = SenderLimits { per_second: 10, burst: 5 };
        let alice: OwnedUserId = "@alice:example.org".try_into().unwrap();
        let shared = SenderAllowance::new(limits, 2);
        let burst = std::num::NonZeroU32::new(5).unwrap();
        assert!(
            matches!(shared.limiter.check_key_n(&alice, burst), Ok(Ok(()))),
            "the whole burst at once"
        );
        let refused = shared.limiter.check_key(&alice).expect_err("over the burst");
        let wait = refused.wait_time_from(governor::clock::DefaultClock::default().now());
        // 10/s over two nodes is 5/s here: the next message in 200 ms, not 100 ms.
        assert!(wait > std::time::Duration::from_millis(150), "{wait:?}");
        assert_eq!(SenderAllowance::new(limits, 1).limits, limits);
    }
}
