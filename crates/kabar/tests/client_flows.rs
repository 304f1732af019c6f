//! Two real clients (matrix-sdk) against the real binary: the everyday chat flows.

mod common;

use std::time::Duration;

use common::{Server, registered};
use matrix_sdk::ruma::api::error::ErrorKind;
use matrix_sdk::{
    RoomState,
    config::SyncSettings,
    room::{MessagesOptions, RelationsOptions},
    ruma::{
        OwnedEventId, UInt,
        api::client::{receipt::create_receipt::v3::ReceiptType as CreateReceiptType, room::create_room},
        events::{
            AnySyncEphemeralRoomEvent, AnySyncTimelineEvent,
            reaction::ReactionEventContent,
            receipt::{ReceiptThread, ReceiptType},
            relation::{Annotation, RelationType},
            room::message::{ReplacementMetadata, RoomMessageEventContent},
        },
    },
};

fn settings() -> SyncSettings {
    SyncSettings::default().timeout(Duration::from_secs(5))
}

/// Syncs until `pred` holds on the raw timeline events of the room, or fails.
async fn sync_until(
    client: &matrix_sdk::Client,
    room_id: &matrix_sdk::ruma::RoomId,
    what: &str,
    pred: impl Fn(&[AnySyncTimelineEvent], &[AnySyncEphemeralRoomEvent]) -> bool,
) {
    for _ in 0..10 {
        let resp = client.sync_once(settings()).await.expect("sync");
        if let Some(room) = resp.rooms.joined.get(room_id) {
            let timeline: Vec<AnySyncTimelineEvent> = room.timeline.events.iter().filter_map(|e| e.raw().deserialize().ok()).collect();
            let ephemeral: Vec<AnySyncEphemeralRoomEvent> = room.ephemeral.iter().filter_map(|e| e.deserialize().ok()).collect();
            if pred(&timeline, &ephemeral) {
                return;
            }
        }
    }
    panic!("never saw: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_edit_react_redact() {
    let server = Server::start();
    let alice = registered(&server.url, "alice").await;
    let bob = registered(&server.url, "bob").await;
    let bob_id = bob.user_id().unwrap().to_owned();

    let mut req = create_room::v3::Request::new();
    req.name = Some("Tea".into());
    req.invite = vec![bob_id.clone()];
    let room = alice.create_room(req).await.expect("create room");
    let room_id = room.room_id().to_owned();

    // Bob sees the invite, joins, and both see each other as members.
    bob.sync_once(settings()).await.unwrap();
    assert_eq!(bob.get_room(&room_id).expect("invited room known").state(), RoomState::Invited);
    bob.join_room_by_id(&room_id).await.expect("join");
    alice.sync_once(settings()).await.unwrap();
    let members = room.members(matrix_sdk::RoomMemberships::JOIN).await.unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(room.name().as_deref(), Some("Tea"));

    // A message reaches Bob's sync.
    let hello = room
        .send(RoomMessageEventContent::text_plain("hello bob"))
        .await
        .unwrap()
        .response
        .event_id;
    let bob_room = bob.get_room(&room_id).unwrap();
    sync_until(&bob, &room_id, "alice's message", |t, _| t.iter().any(|e| e.event_id() == hello)).await;

    // Typing and a read receipt from Bob reach Alice.
    bob_room.typing_notice(true).await.unwrap();
    sync_until(&alice, &room_id, "bob typing", |_, eph| {
        eph.iter()
            .any(|e| matches!(e, AnySyncEphemeralRoomEvent::Typing(t) if t.content.user_ids.contains(&bob_id)))
    })
    .await;
    bob_room
        .send_single_receipt(CreateReceiptType::Read, ReceiptThread::Unthreaded, hello.clone())
        .await
        .unwrap();
    sync_until(&alice, &room_id, "bob's receipt", |_, eph| {
        eph.iter().any(|e| matches!(e, AnySyncEphemeralRoomEvent::Receipt(_)))
    })
    .await;
    let (receipt_event, _) = room
        .load_user_receipt(ReceiptType::Read, ReceiptThread::Unthreaded, &bob_id)
        .await
        .unwrap()
        .expect("receipt stored by sdk");
    assert_eq!(receipt_event, hello);

    // An edit and a reaction, both visible as relations of the original.
    let edit = RoomMessageEventContent::text_plain("hello bob!").make_replacement(ReplacementMetadata::new(hello.clone(), None));
    let edit_id = room.send(edit).await.unwrap().response.event_id;
    let reaction_id = bob_room
        .send(ReactionEventContent::new(Annotation::new(hello.clone(), "👍".into())))
        .await
        .unwrap()
        .response
        .event_id;
    sync_until(&alice, &room_id, "bob's reaction", |t, _| {
        t.iter().any(|e| e.event_id() == reaction_id)
    })
    .await;
    let rel = room
        .relations(
            hello.clone(),
            RelationsOptions {
                include_relations: matrix_sdk::room::IncludeRelations::AllRelations,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let rel_ids: Vec<OwnedEventId> = rel.chunk.iter().filter_map(|e| e.event_id()).collect();
    assert!(
        rel_ids.contains(&edit_id) && rel_ids.contains(&reaction_id),
        "relations: {rel_ids:?}"
    );
    let only_edits = room
        .relations(
            hello.clone(),
            RelationsOptions {
                include_relations: matrix_sdk::room::IncludeRelations::RelationsOfType(RelationType::Replacement),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(only_edits.chunk.len(), 1);

    // Bob (power 0) may not redact Alice's message; Alice may redact her own.
    let err = bob_room
        .redact(&hello, Some("no"), None)
        .await
        .expect_err("bob cannot redact alice's event");
    assert_eq!(err.client_api_error_kind(), Some(&ErrorKind::Forbidden));
    room.redact(&hello, Some("typo"), None).await.unwrap();
    let redacted = bob_room.event(&hello, None).await.unwrap();
    let json = redacted.raw().json().get().to_owned();
    assert!(!json.contains("hello bob"), "content is gone after redaction: {json}");
    assert!(json.contains("redacted_because"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paginate_two_hundred_messages_without_gaps_or_duplicates() {
    let server = Server::start();
    let alice = registered(&server.url, "alice").await;
    let bob = registered(&server.url, "bob").await;
    let mut req = create_room::v3::Request::new();
    req.invite = vec![bob.user_id().unwrap().to_owned()];
    let room = alice.create_room(req).await.unwrap();
    bob.join_room_by_id(room.room_id()).await.unwrap();
    let mut sent = Vec::new();
    for i in 0..200 {
        sent.push(
            room.send(RoomMessageEventContent::text_plain(format!("message {i}")))
                .await
                .unwrap()
                .response
                .event_id,
        );
    }
    let bob_room = bob.get_room(room.room_id()).unwrap();

    // Backwards from the live end, 30 at a time.
    let mut seen = Vec::new();
    let mut from = None;
    loop {
        let mut options = MessagesOptions::backward().from(from.as_deref());
        options.limit = UInt::from(30u32);
        let page = bob_room.messages(options).await.unwrap();
        seen.extend(page.chunk.iter().filter_map(|e| e.event_id()));
        match page.end {
            Some(end) => from = Some(end),
            None => break,
        }
    }
    seen.reverse();
    let messages: Vec<OwnedEventId> = seen.iter().filter(|id| sent.contains(id)).cloned().collect();
    assert_eq!(messages, sent, "every message once, in order");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no duplicates across pages");

    // Forwards from the start gives the same order.
    let mut forward = Vec::new();
    let mut from = None;
    loop {
        let mut options = MessagesOptions::forward().from(from.as_deref());
        options.limit = UInt::from(45u32);
        let page = bob_room.messages(options).await.unwrap();
        forward.extend(page.chunk.iter().filter_map(|e| e.event_id()));
        match page.end {
            Some(end) if !page.chunk.is_empty() => from = Some(end),
            _ => break,
        }
    }
    assert_eq!(forward, seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_upload_and_download() {
    let server = Server::start();
    let alice = registered(&server.url, "alice").await;
    let bob = registered(&server.url, "bob").await;
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let uploaded = alice
        .media()
        .upload(&mime::APPLICATION_OCTET_STREAM, data.clone(), None)
        .await
        .unwrap();
    let request = matrix_sdk::media::MediaRequestParameters {
        source: matrix_sdk::ruma::events::room::MediaSource::Plain(uploaded.content_uri.clone()),
        format: matrix_sdk::media::MediaFormat::File,
    };
    let downloaded = bob.media().get_media_content(&request, false).await.unwrap();
    assert_eq!(downloaded, data);
}
