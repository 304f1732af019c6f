//! The client-facing form of an event, and redaction.

use ruma::{CanonicalJsonObject, CanonicalJsonValue, RoomVersionId};
use serde_json::{Map, Value};

use crate::event::Pdu;

/// Fields of a PDU that clients never see.
#[cfg(test)]
const SERVER_ONLY_FIELDS: &[&str] = &["auth_events", "prev_events", "hashes", "signatures", "depth", "origin"];

/// The event as `/sync`, `/messages` and `/event` return it (the "client
/// event" format, with `room_id`), without `unsigned`: the parsed form of
/// [`client_event_prefix`], so the two cannot disagree on the fields.
pub fn to_client_event(pdu: &Pdu) -> Map<String, Value> {
    serde_json::from_str(&(client_event_prefix(pdu) + "}")).unwrap_or_default()
}

/// The client event serialized once, without its closing brace, so that each
/// viewer's `unsigned` object can be appended: `{"content":…,"type":"…"`.
/// The content is copied as stored (canonical JSON), not re-encoded.
pub fn client_event_prefix(pdu: &Pdu) -> String {
    let string = |s: &str| serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
    let mut out = String::with_capacity(pdu.content.get().len() + 256);
    out.push_str("{\"content\":");
    out.push_str(pdu.content.get());
    out.push_str(",\"event_id\":");
    out.push_str(&string(pdu.event_id.as_str()));
    out.push_str(",\"origin_server_ts\":");
    out.push_str(&u64::from(pdu.origin_server_ts.get()).to_string());
    if let Some(redacts) = &pdu.redacts {
        // Room versions 11 and later carry it in the content; clients written
        // for older versions look for it at the top level, so it is in both.
        out.push_str(",\"redacts\":");
        out.push_str(&string(redacts.as_str()));
    }
    out.push_str(",\"room_id\":");
    out.push_str(&string(pdu.room_id.as_str()));
    out.push_str(",\"sender\":");
    out.push_str(&string(pdu.sender.as_str()));
    if let Some(key) = &pdu.state_key {
        out.push_str(",\"state_key\":");
        out.push_str(&string(key));
    }
    out.push_str(",\"type\":");
    out.push_str(&string(&pdu.kind.to_string()));
    out
}

/// The PDU after redaction under the room version's rules, keeping the
/// signatures and hashes a redacted PDU still carries.
pub fn redact_pdu(pdu: &Pdu, version: &RoomVersionId) -> Option<String> {
    let rules = version.rules()?;
    let object: CanonicalJsonObject = serde_json::from_str(&pdu.json).ok()?;
    let redacted = ruma::canonical_json::redact(object, &rules.redaction, None).ok()?;
    serde_json::to_string(&CanonicalJsonValue::Object(redacted)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventSigner, NewEvent};
    use ruma::{MilliSecondsSinceUnixEpoch, owned_server_name, room_id, user_id};

    #[test]
    fn client_event_hides_server_fields_and_redaction_strips_content() {
        let signer = EventSigner::new(owned_server_name!("localhost"), &EventSigner::generate_key(), "a").unwrap();
        let pdu = Pdu::build(
            &signer,
            &RoomVersionId::V11,
            Some(room_id!("!r:localhost")),
            user_id!("@a:localhost"),
            NewEvent::message("m.room.message", serde_json::json!({"body": "secret", "msgtype": "m.text"})),
            vec![],
            vec![],
            3,
            MilliSecondsSinceUnixEpoch::now(),
        )
        .unwrap();
        let client = to_client_event(&pdu);
        for f in SERVER_ONLY_FIELDS {
            assert!(!client.contains_key(*f), "{f}");
        }
        assert_eq!(client["event_id"], pdu.event_id.as_str());
        assert_eq!(client["room_id"], "!r:localhost");
        assert_eq!(client["sender"], "@a:localhost");
        assert_eq!(client["type"], "m.room.message");
        assert_eq!(client["origin_server_ts"], u64::from(pdu.origin_server_ts.get()));
        assert!(!client.contains_key("state_key") && !client.contains_key("redacts"));
        assert_eq!(client["content"]["body"], "secret");
        let once: Value = serde_json::from_str(&(client_event_prefix(&pdu) + "}")).unwrap();
        assert_eq!(once, Value::Object(client.clone()), "both serializations agree");
        let redacted = redact_pdu(&pdu, &RoomVersionId::V11).unwrap();
        assert!(!redacted.contains("secret"));
        let redacted = Pdu::from_stored(pdu.event_id.clone(), pdu.room_id.clone(), &redacted).unwrap();
        assert_eq!(redacted.content.get(), "{}");
    }
}
