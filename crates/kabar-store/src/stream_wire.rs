//! A committed batch as bytes, for the bus between nodes: the node that
//! committed a batch sends it whole, so that the other nodes apply it
//! without reading it back from the database.
//!
//! The form is JSON (one object per batch, events with their stored PDU
//! text), read back into exactly the [`CommittedBatch`] a replay from the
//! store would give. A node never trusts it beyond that: what it applies
//! must still continue its applied position (see the applier), and anything
//! it cannot read it reads from the store instead.

use std::{borrow::Cow, sync::Arc};

use kabar_domain::Pdu;
use ruma::{OwnedEventId, OwnedRoomId};
use serde::{Deserialize, Serialize};

use crate::{Change, CommittedBatch, PrevState, StoredEvent, StreamUpdate, TxnRef};

#[derive(Serialize, Deserialize)]
struct WireBatch<'a> {
    after: u64,
    head: u64,
    #[serde(borrow)]
    updates: Vec<WireUpdate<'a>>,
}

/// One update: an event (`event` set) or another change (`kind` and its
/// record's user, room and device).
#[derive(Serialize, Deserialize)]
struct WireUpdate<'a> {
    pos: u64,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    event: Option<WireEvent<'a>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    user: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    room: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    device: Option<Cow<'a, str>>,
}

#[derive(Serialize, Deserialize)]
struct WireEvent<'a> {
    #[serde(borrow)]
    event_id: Cow<'a, str>,
    #[serde(borrow)]
    room_id: Cow<'a, str>,
    /// The signed PDU as stored.
    #[serde(borrow)]
    pdu: Cow<'a, str>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    txn: Option<[Cow<'a, str>; 3]>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    redacted_by: Option<Cow<'a, str>>,
    /// Replaced state: event id, sender, content.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    prev: Option<[Cow<'a, str>; 3]>,
}

impl CommittedBatch {
    /// The batch as JSON, for [`from_wire`](Self::from_wire) on another node.
    pub fn to_wire(&self) -> Box<serde_json::value::RawValue> {
        let updates = self
            .updates
            .iter()
            .map(|u| match &u.change {
                Change::Event(e) => WireUpdate {
                    pos: u.pos,
                    event: Some(WireEvent {
                        event_id: Cow::Borrowed(e.pdu.event_id.as_str()),
                        room_id: Cow::Borrowed(e.pdu.room_id.as_str()),
                        pdu: Cow::Borrowed(&e.pdu.json),
                        txn: e.txn.as_ref().map(|t| {
                            [
                                Cow::Borrowed(t.device_id.as_str()),
                                Cow::Borrowed(t.txn_id.as_str()),
                                Cow::Borrowed(t.scope.as_str()),
                            ]
                        }),
                        redacted_by: e.redacted_by.as_ref().map(|r| Cow::Borrowed(r.as_str())),
                        prev: e.prev.as_ref().map(|p| {
                            [
                                Cow::Borrowed(p.event_id.as_str()),
                                Cow::Borrowed(p.sender.as_str()),
                                Cow::Borrowed(p.content.as_str()),
                            ]
                        }),
                    }),
                    kind: None,
                    user: None,
                    room: None,
                    device: None,
                },
                other => {
                    let (user, room, device) = other.record().unwrap_or_default();
                    WireUpdate {
                        pos: u.pos,
                        event: None,
                        kind: Some(Cow::Borrowed(other.kind())),
                        user: user.map(Cow::Borrowed),
                        room: room.map(Cow::Borrowed),
                        device: device.map(Cow::Borrowed),
                    }
                }
            })
            .collect();
        let wire = WireBatch {
            after: self.after,
            head: self.head,
            updates,
        };
        serde_json::value::to_raw_value(&wire).expect("a batch of strings and integers serializes")
    }

    /// A batch [`to_wire`](Self::to_wire) wrote, or why it cannot be read.
    pub fn from_wire(text: &str) -> Result<CommittedBatch, String> {
        let wire: WireBatch = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if wire.head < wire.after {
            return Err(format!("a batch ending at {} before it starts at {}", wire.head, wire.after));
        }
        let mut updates = Vec::with_capacity(wire.updates.len());
        let mut last = wire.after;
        for u in wire.updates {
            if u.pos <= wire.after || u.pos > wire.head || u.pos < last {
                return Err(format!("update at {} out of order in ({}, {}]", u.pos, wire.after, wire.head));
            }
            last = u.pos;
            let change = match u.event {
                Some(e) => Change::Event(Arc::new(event_from_wire(u.pos, e)?)),
                None => Change::from_record(
                    u.kind.as_deref().unwrap_or_default(),
                    u.user.map(Cow::into_owned),
                    u.room.map(Cow::into_owned),
                    u.device.map(Cow::into_owned),
                )?,
            };
            updates.push(StreamUpdate { pos: u.pos, change });
        }
        Ok(CommittedBatch {
            after: wire.after,
            head: wire.head,
            updates,
        })
    }
}

fn event_from_wire(pos: u64, e: WireEvent) -> Result<StoredEvent, String> {
    fn parse<T: TryFrom<String>>(what: &str, s: Cow<str>) -> Result<T, String> {
        T::try_from(s.into_owned()).map_err(|_| format!("not a valid {what}"))
    }
    let event_id: OwnedEventId = parse("event id", e.event_id)?;
    let room_id: OwnedRoomId = parse("room id", e.room_id)?;
    let pdu = Pdu::from_stored(event_id, room_id, &e.pdu).map_err(|e| e.to_string())?;
    let txn = e.txn.map(|[device_id, txn_id, scope]| TxnRef {
        device_id: device_id.into_owned(),
        txn_id: txn_id.into_owned(),
        scope: scope.into_owned(),
    });
    let prev = match e.prev {
        Some([event_id, sender, content]) => Some(PrevState {
            event_id: parse("event id", event_id)?,
            sender: parse("user id", sender)?,
            content: content.into_owned(),
        }),
        None => None,
    };
    Ok(StoredEvent {
        pos,
        pdu,
        txn,
        redacted_by: e.redacted_by.map(|r| parse("event id", r)).transpose()?,
        prev,
    })
}

#[cfg(test)]
mod tests {
    use kabar_domain::{EventSigner, NewEvent};
    use ruma::{RoomVersionId, owned_room_id, owned_user_id};
    use serde_json::json;

    use super::*;

    fn event(pos: u64, body: &str, with_txn: bool) -> StoredEvent {
        let signer = EventSigner::new(ruma::owned_server_name!("example.org"), &EventSigner::generate_key(), "k").unwrap();
        let pdu = Pdu::build(
            &signer,
            &RoomVersionId::V11,
            Some(&owned_room_id!("!room:example.org")),
            &owned_user_id!("@alice:example.org"),
            NewEvent::message("m.room.message", json!({"msgtype": "m.text", "body": body})),
            vec![],
            vec![],
            pos,
            ruma::MilliSecondsSinceUnixEpoch::now(),
        )
        .unwrap();
        StoredEvent {
            pos,
            pdu,
            txn: with_txn.then(|| TxnRef {
                device_id: "DEV".into(),
                txn_id: "t\"1".into(),
                scope: "send".into(),
            }),
            redacted_by: None,
            prev: Some(PrevState {
                event_id: "$old".try_into().unwrap(),
                sender: owned_user_id!("@bob:example.org"),
                content: "{\"name\":\"x\"}".into(),
            }),
        }
    }

    #[test]
    fn a_batch_reads_back_as_it_was_committed() {
        let batch = CommittedBatch {
            after: 10,
            head: 14,
            updates: vec![
                StreamUpdate {
                    pos: 11,
                    change: Change::Event(Arc::new(event(11, "héllo \"quoted\"", true))),
                },
                StreamUpdate {
                    pos: 12,
                    change: Change::Receipt {
                        room_id: owned_room_id!("!room:example.org"),
                        user_id: Some(owned_user_id!("@carol:example.org")),
                    },
                },
                StreamUpdate {
                    pos: 12,
                    change: Change::Receipt {
                        room_id: owned_room_id!("!old:example.org"),
                        user_id: None,
                    },
                },
                StreamUpdate {
                    pos: 12,
                    change: Change::ToDevice {
                        user_id: owned_user_id!("@bob:example.org"),
                        device_id: "B".into(),
                    },
                },
                StreamUpdate {
                    pos: 14,
                    change: Change::Event(Arc::new(event(14, "second", false))),
                },
            ],
        };
        let back = CommittedBatch::from_wire(batch.to_wire().get()).unwrap();
        assert_eq!((back.after, back.head, back.updates.len()), (10, 14, 5));
        for (a, b) in batch.updates.iter().zip(&back.updates) {
            assert_eq!(
                (a.pos, a.change.kind(), a.change.record()),
                (b.pos, b.change.kind(), b.change.record())
            );
            if let (Change::Event(a), Change::Event(b)) = (&a.change, &b.change) {
                assert_eq!(a.pdu.json, b.pdu.json);
                assert_eq!(a.pdu.event_id, b.pdu.event_id);
                assert_eq!(a.pdu.content.get(), b.pdu.content.get());
                assert_eq!(a.txn, b.txn);
                assert_eq!(a.prev, b.prev);
                assert_eq!(a.pos, b.pos);
            }
        }
    }

    #[test]
    fn a_batch_that_does_not_hold_together_is_refused() {
        for bad in [
            "not json",
            r#"{"after":5,"head":4,"updates":[]}"#,
            r#"{"after":5,"head":9,"updates":[{"pos":5,"kind":"receipt","room":"!r:x"}]}"#,
            r#"{"after":5,"head":9,"updates":[{"pos":10,"kind":"receipt","room":"!r:x"}]}"#,
            r#"{"after":5,"head":9,"updates":[{"pos":8,"kind":"receipt","room":"!r:x"},{"pos":7,"kind":"receipt","room":"!r:x"}]}"#,
            r#"{"after":5,"head":9,"updates":[{"pos":7,"kind":"nonsense"}]}"#,
            r#"{"after":5,"head":9,"updates":[{"pos":7,"event":{"event_id":"$e","room_id":"!r:x","pdu":"{}"}}]}"#,
        ] {
            assert!(CommittedBatch::from_wire(bad).is_err(), "{bad}");
        }
        let empty = CommittedBatch::from_wire(r#"{"after":5,"head":9,"updates":[]}"#).unwrap();
        assert_eq!((empty.after, empty.head, empty.updates.len()), (5, 9, 0));
    }
}
