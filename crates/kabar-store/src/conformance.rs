//! The conformance suite every storage engine runs.
//!
//! An engine's tests call [`run_all`] with a fresh store; each check panics
//! with a message naming the broken rule.

use std::sync::Arc;

use kabar_domain::{EventSigner, NewEvent, Pdu};
use ruma::{
    MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomVersionId, owned_room_id, owned_server_name, owned_user_id,
    user_id,
};
use serde_json::json;

use crate::*;

/// Runs every check against `store`, which must be empty.
pub async fn run_all(store: Arc<dyn Store>) {
    let start = store.current_position();
    let feed = Arc::new(RecordingListener::default());
    store.set_commit_listener(feed.clone());
    accounts_and_tokens(&*store).await;
    events_positions_and_idempotency(&*store).await;
    state_membership_and_redaction(&*store).await;
    state_at_points_and_history(&*store).await;
    membership_history_forget_and_threads(&*store).await;
    deleting_every_device_but_one(&*store).await;
    user_directory_visibility(&*store).await;
    user_data(&*store).await;
    server_data(&*store).await;
    device_keys_and_claims(&*store).await;
    cross_signing_and_signatures(&*store).await;
    to_device_queue(&*store).await;
    key_backups(&*store).await;
    store.ping().await.expect("a healthy store answers a ping");
    uia_sessions(&*store).await;
    every_write_records_its_change(&*store).await;
    concurrent_appends_to_one_room(store.clone()).await;
    appends_submitted_together(store.clone()).await;
    queued_appends_build_on_each_other(&*store).await;
    queued_member_events_build_on_each_other(&*store).await;
    the_feed_and_the_replay_agree(&*store, &feed, start).await;
    room_list_entries(&*store).await;
}

/// For engines that several processes share (two handles on one database,
/// each with its own writer): positions of both interleave without gaps,
/// each handle replays what the other wrote, and appends to one room
/// through both stay one chain. `a` and `b` must be fresh handles on one
/// empty database.
pub async fn run_shared(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    let start = a.committed_position().await.unwrap();
    let user = owned_user_id!("@shared:localhost");
    let mut writes = vec![];
    for n in 0..20 {
        let (a, b, user) = (a.clone(), b.clone(), user.clone());
        writes.push(tokio::spawn(async move {
            let store = if n % 2 == 0 { a } else { b };
            store.put_account_data(&user, None, &format!("k{n}"), "{}").await.unwrap()
        }));
    }
    let mut positions = vec![];
    for w in writes {
        positions.push(w.await.unwrap());
    }
    positions.sort_unstable();
    positions.dedup();
    assert_eq!(positions.len(), 20, "both handles' writes got distinct positions");
    let head = b.committed_position().await.unwrap();
    assert!(
        head >= *positions.last().unwrap(),
        "each handle sees the other's commits in the head"
    );
    assert_eq!(a.committed_position().await.unwrap(), head);
    let from_a = replay(&*a, start, 7).await;
    let from_b = replay(&*b, start, 1000).await;
    assert_eq!(from_a, from_b, "both handles replay the same stream");
    let replayed: Vec<StreamPos> = from_a.iter().map(|(p, _)| *p).collect();
    assert_eq!(replayed, positions, "every write is replayed, in position order, by either handle");

    // Appends to one room through both handles, each writer building on the
    // head it read: one chain.
    let (room, signer) = test_room("!shared:localhost");
    let create = create_event(&room, &signer);
    a.create_room(room.clone(), vec![write(create)]).await.unwrap();
    append_from_writers(vec![a, b], room, Arc::new(signer), 4, 10).await;
}

/// Checks a media content engine: bytes come back as stored, storing the
/// same content twice is harmless, unknown content is `None`.
pub async fn media_content(content: &dyn MediaContent) {
    use tokio::io::AsyncReadExt;
    let sha = "ab".repeat(32);
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    content.put_content(&sha, bytes.clone()).await.unwrap();
    content
        .put_content(&sha, bytes.clone())
        .await
        .expect("storing the same content again");
    let mut back = vec![];
    content
        .content(&sha)
        .await
        .unwrap()
        .expect("stored content is found")
        .read_to_end(&mut back)
        .await
        .unwrap();
    assert_eq!(back, bytes, "the bytes come back as stored");
    assert!(
        content.content(&"cd".repeat(32)).await.unwrap().is_none(),
        "unknown content is none"
    );
}

/// Keeps every batch it is told of.
#[derive(Default)]
struct RecordingListener {
    batches: std::sync::Mutex<Vec<CommittedBatch>>,
}

impl CommitListener for RecordingListener {
    fn committed(&self, batch: &CommittedBatch) {
        self.batches.lock().unwrap().push(batch.clone());
    }
}

async fn uia_sessions(store: &dyn Store) {
    store.create_uia_session("s1", "register @a:localhost", 1_000).await.unwrap();
    store.create_uia_session("s2", "delete devices", 5_000).await.unwrap();
    assert!(
        matches!(store.create_uia_session("s1", "other", 1).await, Err(StoreError::Conflict(_))),
        "a session id is unique"
    );
    let s1 = store.uia_session("s1").await.unwrap().unwrap();
    assert_eq!((s1.request.as_str(), s1.created_ms), ("register @a:localhost", 1_000));
    assert!(s1.completed.is_empty());
    assert_eq!(
        store.complete_uia_stage("s1", "m.login.registration_token").await.unwrap(),
        Some(vec!["m.login.registration_token".to_owned()])
    );
    assert_eq!(
        store.complete_uia_stage("s1", "m.login.dummy").await.unwrap(),
        Some(vec!["m.login.registration_token".to_owned(), "m.login.dummy".to_owned()])
    );
    assert_eq!(
        store.complete_uia_stage("s1", "m.login.dummy").await.unwrap().unwrap().len(),
        2,
        "a stage completes once"
    );
    assert_eq!(store.complete_uia_stage("nope", "m.login.dummy").await.unwrap(), None);
    assert!(store.delete_uia_session("s1").await.unwrap(), "the first to end a session ends it");
    assert!(!store.delete_uia_session("s1").await.unwrap(), "and nobody after");
    assert!(store.uia_session("s1").await.unwrap().is_none());
    assert_eq!(store.expire_uia_sessions(5_000).await.unwrap(), 0, "started at 5000: not before it");
    assert_eq!(store.expire_uia_sessions(5_001).await.unwrap(), 1);
    assert!(store.uia_session("s2").await.unwrap().is_none());
}

/// A change as the tests compare it: its kind and what it names.
fn describe(u: &StreamUpdate) -> (StreamPos, String) {
    let what = match &u.change {
        Change::Event(e) => format!("event {}", e.pdu.event_id),
        Change::AccountData { user_id } => format!("account_data {user_id}"),
        Change::Receipt { room_id, user_id } => format!("receipt {room_id} by {}", user_id.as_ref().map_or("someone", |u| u.as_str())),
        Change::DeviceList { user_id } => format!("device_list {user_id}"),
        Change::OneTimeKeys { user_id, device_id } => format!("one_time_keys {user_id} {device_id}"),
        Change::ToDevice { user_id, device_id } => format!("to_device {user_id} {device_id}"),
        Change::Memberships { user_id } => format!("memberships {user_id}"),
        Change::Sessions { user_id } => format!("sessions {user_id}"),
    };
    (u.pos, what)
}

/// Every update after `after`, replayed in pages of `page` positions.
async fn replay(store: &dyn Store, after: StreamPos, page: usize) -> Vec<(StreamPos, String)> {
    let head = store.current_position();
    let mut at = after;
    let mut out = vec![];
    while at < head {
        let batch = store.updates_after(at, page).await.unwrap();
        assert_eq!(batch.after, at);
        assert!(batch.head > at, "a replay makes progress");
        assert!(
            batch.updates.iter().all(|u| u.pos > at && u.pos <= batch.head),
            "a replay stays in its range"
        );
        assert!(batch.updates.windows(2).all(|w| w[0].pos <= w[1].pos), "in position order");
        out.extend(batch.updates.iter().map(describe));
        at = batch.head;
    }
    out
}

async fn every_write_records_its_change(store: &dyn Store) {
    let user = owned_user_id!("@stream:localhost");
    let other = owned_user_id!("@stream_other:localhost");
    store
        .create_user(NewUser {
            user_id: user.clone(),
            password_hash: None,
            created_ms: 1,
        })
        .await
        .unwrap();
    let has = async |after: StreamPos, pos: StreamPos, what: String| {
        let updates = replay(store, after, 1000).await;
        assert!(
            updates.contains(&(pos, what.clone())),
            "{what} at {pos} is in the stream: {updates:?}"
        );
    };
    let before = store.current_position();
    let pos = device(store, &user, "S1").await;
    has(before, pos, format!("sessions {user}")).await;
    has(before, pos, format!("device_list {user}")).await;
    device(store, &other, "O1").await;

    let before = store.current_position();
    let pos = store.put_account_data(&user, None, "m.test", "{}").await.unwrap();
    has(before, pos, format!("account_data {user}")).await;

    let (room, signer) = test_room("!stream:localhost");
    let create = create_event(&room, &signer);
    let create_id = create.event_id.clone();
    let before = store.current_position();
    let created = store.create_room(room.clone(), vec![write(create)]).await.unwrap();
    has(before, created[0], format!("event {create_id}")).await;
    let message = pdu(&room, &signer, 2, NewEvent::message("m.room.message", json!({"body": "hi"})));
    let message_id = message.event_id.clone();
    let before = store.current_position();
    let pos = appended(store.append_event(write(message)).await.unwrap());
    has(before, pos, format!("event {message_id}")).await;

    let before = store.current_position();
    let pos = store
        .put_receipt(ReceiptRecord {
            room_id: room.room_id.clone(),
            user_id: user.clone(),
            receipt_type: "m.read".into(),
            event_id: message_id.clone(),
            thread_id: None,
            ts_ms: 1,
            pos: 0,
        })
        .await
        .unwrap();
    has(before, pos, format!("receipt {} by {user}", room.room_id)).await;

    let key = |id: &str| OneTimeKey {
        algorithm: "signed_curve25519".into(),
        key_id: format!("signed_curve25519:{id}"),
        json: "{}".into(),
    };
    let before = store.current_position();
    let pos = store.add_one_time_keys(&user, "S1", vec![key("a")]).await.unwrap();
    has(before, pos, format!("one_time_keys {user} S1")).await;
    let before = store.current_position();
    let pos = store.put_fallback_keys(&user, "S1", vec![key("f")]).await.unwrap();
    has(before, pos, format!("one_time_keys {user} S1")).await;
    let before = store.current_position();
    let claimed = store
        .claim_keys(vec![KeyClaim {
            user_id: user.clone(),
            device_id: "S1".into(),
            algorithm: "signed_curve25519".into(),
        }])
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    has(before, store.current_position(), format!("one_time_keys {user} S1")).await;

    let before = store.current_position();
    let sender = Session {
        user_id: other.clone(),
        device_id: "O1".into(),
    };
    let message = ToDeviceMessage {
        recipient: user.clone(),
        device_id: "S1".into(),
        kind: "m.test".into(),
        content: "{}".into(),
    };
    let pos = store
        .queue_to_device(&sender, "m.test", "stream1", vec![message])
        .await
        .unwrap()
        .unwrap();
    has(before, pos, format!("to_device {user} S1")).await;

    let before = store.current_position();
    let pos = store.forget_room(&user, &room.room_id).await.unwrap();
    has(before, pos, format!("memberships {user}")).await;

    let before = store.current_position();
    let pos = store.rename_device(&user, "S1", Some("renamed")).await.unwrap().unwrap();
    has(before, pos, format!("device_list {user}")).await;

    let before = store.current_position();
    let removed = store.delete_devices(&user, &["S1".into()]).await.unwrap();
    let pos = removed.list_changed_at.expect("a removed device is a change");
    has(before, pos, format!("sessions {user}")).await;
    has(before, pos, format!("device_list {user}")).await;
}

/// Writers appending to one room at once, each building on the head it read:
/// with `expected_head`, exactly one wins each head and the others rebuild, so
/// the room stays one chain.
async fn concurrent_appends_to_one_room(store: Arc<dyn Store>) {
    const WRITERS: usize = 4;
    const EACH: usize = 10;
    let (room, signer) = test_room("!race:localhost");
    let create = create_event(&room, &signer);
    let created = store.create_room(room.clone(), vec![write(create)]).await.unwrap();
    let never_appended = pdu(&room, &signer, 2, NewEvent::message("m.room.message", json!({"body": "never"})));
    let stale = pdu(&room, &signer, 3, NewEvent::message("m.room.message", json!({"body": "stale"})));
    let mut w = write(stale);
    w.expected_head = Some(never_appended.event_id);
    match store.append_event(w).await.unwrap() {
        AppendOutcome::HeadMoved { head } => assert_eq!(head, created[0], "told the room's head"),
        other => panic!("an append on a stale head must not land: {other:?}"),
    }
    append_from_writers(vec![store], room, Arc::new(signer), WRITERS, EACH).await;
}

/// Appends to several rooms submitted at once, so that an engine may
/// commit them together (the PostgreSQL engine sends such appends as one
/// statement): each gets its own outcome, the same as one at a time, and
/// two appends to one room see each other.
async fn appends_submitted_together(store: Arc<dyn Store>) {
    let mut rooms = vec![];
    for i in 0..5 {
        let (room, signer) = test_room(&format!("!together{i}:localhost"));
        let create = create_event(&room, &signer);
        let create_id = create.event_id.clone();
        let head = store.create_room(room.clone(), vec![write(create)]).await.unwrap()[0];
        rooms.push((room, signer, head, create_id));
    }
    let message = |i: usize, body: &str| {
        pdu(
            &rooms[i].0,
            &rooms[i].1,
            2,
            NewEvent::message("m.room.message", json!({"body": body})),
        )
    };
    // Room 4 already holds a message sent with transaction "t-old".
    let mut earlier = write(message(4, "earlier"));
    earlier.txn = Some(txn("D", "t-old"));
    let earlier_id = earlier.pdu.event_id.clone();
    appended(store.append_event(earlier).await.unwrap());

    let mut burst = vec![];
    // One fresh message per room 0..=3, each on the head it was built on.
    for (i, (_, _, _, head)) in rooms.iter().enumerate().take(4) {
        let mut w = write(message(i, "fresh"));
        w.expected_head = Some(head.clone());
        burst.push(w);
    }
    // A second message to room 0 built on the same head: one of the two lands.
    let mut rival = write(message(0, "rival"));
    rival.expected_head = Some(rooms[0].3.clone());
    burst.push(rival);
    // Two different events in room 1 with one transaction id: one lands.
    for body in ["txn first", "txn second"] {
        let mut w = write(message(1, body));
        w.txn = Some(txn("D", "t-1"));
        burst.push(w);
    }
    // A stale head in room 2 (built on an event it never held).
    let mut stale = write(message(2, "stale"));
    stale.expected_head = Some(message(2, "never appended").event_id);
    burst.push(stale);
    // A retry of room 4's earlier transaction.
    let mut retry = write(message(4, "retry"));
    retry.txn = Some(txn("D", "t-old"));
    burst.push(retry);

    let ids: Vec<OwnedEventId> = burst.iter().map(|w| w.pdu.event_id.clone()).collect();
    let tasks: Vec<_> = burst
        .into_iter()
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move { store.append_event(w).await.unwrap() })
        })
        .collect();
    let mut outcomes = vec![];
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let landed = |o: &AppendOutcome| matches!(o, AppendOutcome::Appended(_));
    assert!(outcomes[1..4].iter().all(landed), "fresh appends to rooms 1-3 land: {outcomes:?}");
    match (&outcomes[0], &outcomes[4]) {
        (AppendOutcome::Appended(p), AppendOutcome::HeadMoved { head })
        | (AppendOutcome::HeadMoved { head }, AppendOutcome::Appended(p)) => {
            assert_eq!(head, p, "the loser is told the winner's position")
        }
        other => panic!("exactly one of two appends on one head of room 0 lands: {other:?}"),
    }
    match (&outcomes[5], &outcomes[6]) {
        (AppendOutcome::Appended(_), AppendOutcome::Duplicate(id)) => assert_eq!(id, &ids[5]),
        (AppendOutcome::Duplicate(id), AppendOutcome::Appended(_)) => assert_eq!(id, &ids[6]),
        other => panic!("one transaction id, one event: {other:?}"),
    }
    match &outcomes[7] {
        AppendOutcome::HeadMoved { head } => assert!(*head >= rooms[2].2, "told room 2's head"),
        other => panic!("an append on a stale head must not land: {other:?}"),
    }
    match &outcomes[8] {
        AppendOutcome::Duplicate(id) => assert_eq!(id, &earlier_id, "the retry is answered with the first event"),
        other => panic!("a used transaction id must not append again: {other:?}"),
    }
    let mut positions: Vec<StreamPos> = outcomes
        .iter()
        .filter_map(|o| match o {
            AppendOutcome::Appended(p) => Some(*p),
            _ => None,
        })
        .collect();
    positions.sort_unstable();
    positions.dedup();
    assert_eq!(positions.len(), 5, "five appends landed, each at its own position");
    for (i, expected) in [2, 3, 2, 2, 2].into_iter().enumerate() {
        let events = all_events(&*store, &rooms[i].0.room_id).await;
        assert_eq!(events.len(), expected, "room {i} holds its create event and what landed");
        for e in &events[1..] {
            let stored = store
                .event(&e.pdu.event_id)
                .await
                .unwrap()
                .expect("a landed event is readable by id");
            assert_eq!(stored.pos, e.pos);
            assert!(positions.contains(&e.pos) || e.pdu.event_id == earlier_id);
        }
    }
}

/// An event built on one still being committed (queued just before it)
/// lands after it; one built on an append that does not land does not
/// land either.
async fn queued_appends_build_on_each_other(store: &dyn Store) {
    let (room, signer) = test_room("!pipeline:localhost");
    let create = create_event(&room, &signer);
    let create_id = create.event_id.clone();
    store.create_room(room.clone(), vec![write(create)]).await.unwrap();
    let on = |prev: &OwnedEventId, depth: u64, body: &str| {
        let pdu = Pdu::build(
            &signer,
            &room.version,
            Some(&room.room_id),
            &room.creator,
            NewEvent::message("m.room.message", json!({"body": body})),
            vec![prev.clone()],
            vec![],
            depth,
            MilliSecondsSinceUnixEpoch::now(),
        )
        .unwrap();
        let mut w = write(pdu);
        w.expected_head = Some(prev.clone());
        w
    };
    // A chain of three, each queued before the previous one committed.
    let first = on(&create_id, 2, "one");
    let second = on(&first.pdu.event_id, 3, "two");
    let third = on(&second.pdu.event_id, 4, "three");
    let chain_ids: Vec<OwnedEventId> = [&first, &second, &third].iter().map(|w| w.pdu.event_id.clone()).collect();
    let queued = [store.queue_append(first), store.queue_append(second), store.queue_append(third)];
    let mut positions = vec![];
    for q in queued {
        positions.push(appended(q.await.unwrap()));
    }
    assert!(
        positions.windows(2).all(|p| p[0] < p[1]),
        "a chain lands in the order it was queued"
    );

    // A chain whose first event is built on an event the room never held.
    let never = on(&chain_ids[2], 5, "never appended");
    let doomed = on(&never.pdu.event_id, 6, "doomed");
    let after_doomed = on(&doomed.pdu.event_id, 7, "after doomed");
    let queued = [store.queue_append(doomed), store.queue_append(after_doomed)];
    for q in queued {
        match q.await.unwrap() {
            AppendOutcome::HeadMoved { head } => assert_eq!(head, positions[2], "told the room's head"),
            other => panic!("an event built on one that did not land must not land: {other:?}"),
        }
    }
    // A repeated transaction is not appended, and neither is what was built on it.
    let mut original = on(&chain_ids[2], 5, "original");
    original.txn = Some(txn("P", "t-pipe"));
    let original_id = original.pdu.event_id.clone();
    appended(store.append_event(original).await.unwrap());
    let mut repeat = on(&original_id, 6, "repeat");
    repeat.txn = Some(txn("P", "t-pipe"));
    let on_repeat = on(&repeat.pdu.event_id, 7, "on the repeat");
    let queued = [store.queue_append(repeat), store.queue_append(on_repeat)];
    let [repeat, on_repeat] = queued;
    match repeat.await.unwrap() {
        AppendOutcome::Duplicate(id) => assert_eq!(id, original_id),
        other => panic!("a used transaction id must not append again: {other:?}"),
    }
    assert!(
        matches!(on_repeat.await.unwrap(), AppendOutcome::HeadMoved { .. }),
        "an event built on a repeat that was not appended does not land"
    );
    let events = all_events(store, &room.room_id).await;
    let ids: Vec<&OwnedEventId> = events.iter().map(|e| &e.pdu.event_id).collect();
    assert_eq!(
        ids,
        [&create_id, &chain_ids[0], &chain_ids[1], &chain_ids[2], &original_id],
        "the room is one chain"
    );
}

/// Member events queued each on the one before (joins arriving together)
/// land in order, each replacing the state it names. When one in the middle
/// fails in the engine, none built on it lands, and the room's state,
/// memberships and state at every position hold exactly what landed.
async fn queued_member_events_build_on_each_other(store: &dyn Store) {
    let (room, signer) = test_room("!pipeline-members:localhost");
    let (_, creator_join) = create_joined_room(store, &room, &signer).await;
    let member = |on: &OwnedEventId, depth: u64, user: &str, membership: &str, replaces: Option<&Pdu>| {
        let pdu = Pdu::build(
            &signer,
            &room.version,
            Some(&room.room_id),
            &room.creator,
            NewEvent::state("m.room.member", user, json!({"membership": membership})),
            vec![on.clone()],
            vec![],
            depth,
            MilliSecondsSinceUnixEpoch::now(),
        )
        .unwrap();
        let mut w = write(pdu);
        w.expected_head = Some(on.clone());
        w.prev = replaces.map(PrevState::of);
        w
    };
    let (bob, carl, dave, erin) = ("@bob:localhost", "@carl:localhost", "@dave:localhost", "@erin:localhost");
    let bob_invite = member(&creator_join.event_id, 3, bob, "invite", None);
    let bob_join = member(&bob_invite.pdu.event_id, 4, bob, "join", Some(&bob_invite.pdu));
    let carl_invite = member(&bob_join.pdu.event_id, 5, carl, "invite", None);
    let chain = [bob_invite.pdu.clone(), bob_join.pdu.clone(), carl_invite.pdu.clone()];
    let queued = [
        store.queue_append(bob_invite),
        store.queue_append(bob_join),
        store.queue_append(carl_invite),
    ];
    let mut positions = vec![];
    for q in queued {
        positions.push(appended(q.await.unwrap()));
    }
    assert!(
        positions.windows(2).all(|p| p[0] < p[1]),
        "a chain lands in the order it was queued"
    );
    let joined = store.event(&chain[1].event_id).await.unwrap().unwrap();
    assert_eq!(
        joined.prev.map(|p| p.event_id),
        Some(chain[0].event_id.clone()),
        "the join replaced the invite queued before it"
    );

    // dave's invite lands; the next write fails in the engine (its event
    // id is taken: bob's join again, on the right head); what was built
    // on it does not land.
    let dave_invite = member(&chain[2].event_id, 6, dave, "invite", None);
    let dave_invite_id = dave_invite.pdu.event_id.clone();
    let mut failing = write(chain[1].clone());
    failing.expected_head = Some(dave_invite_id.clone());
    let dave_join = member(&chain[1].event_id, 7, dave, "join", Some(&dave_invite.pdu));
    let erin_invite = member(&dave_join.pdu.event_id, 8, erin, "invite", None);
    let queued = [
        store.queue_append(dave_invite),
        store.queue_append(failing),
        store.queue_append(dave_join),
        store.queue_append(erin_invite),
    ];
    let [dave_invite, failing, dave_join, erin_invite] = queued;
    let head = appended(dave_invite.await.unwrap());
    assert!(failing.await.is_err(), "an event whose id is taken fails in the engine");
    for q in [dave_join, erin_invite] {
        match q.await.unwrap() {
            AppendOutcome::HeadMoved { head: told } => assert_eq!(told, head, "told the room's head"),
            other => panic!("an event built on one that failed must not land: {other:?}"),
        }
    }

    let events = all_events(store, &room.room_id).await;
    let ids: Vec<&OwnedEventId> = events.iter().skip(2).map(|e| &e.pdu.event_id).collect();
    assert_eq!(
        ids,
        [&chain[0].event_id, &chain[1].event_id, &chain[2].event_id, &dave_invite_id],
        "the room is one chain of what landed"
    );
    let membership_of = |state: &[StoredEvent], user: &str| {
        state
            .iter()
            .find(|e| e.pdu.state_key.as_deref() == Some(user))
            .and_then(|e| Membership::from_content(e.pdu.content.get()))
    };
    let current = store.current_state(&room.room_id).await.unwrap();
    let at_head = store.state_at(&room.room_id, head).await.unwrap();
    for state in [&current, &at_head] {
        assert_eq!(membership_of(state, bob), Some(Membership::Join));
        assert_eq!(membership_of(state, carl), Some(Membership::Invite));
        assert_eq!(membership_of(state, dave), Some(Membership::Invite), "dave's join did not land");
        assert_eq!(membership_of(state, erin), None, "nothing built on the failure landed");
    }
    // Counting back from the newest event, or from a position; and forward
    // from before the first, or from a position.
    let newest_first: Vec<StreamPos> = events.iter().rev().map(|e| e.pos).collect();
    let oldest_first: Vec<StreamPos> = events.iter().map(|e| e.pos).collect();
    for count in 1..=newest_first.len() {
        assert_eq!(
            store
                .room_position(&room.room_id, StreamPos::MAX, Direction::Backward, count)
                .await
                .unwrap(),
            Some(newest_first[count - 1])
        );
        assert_eq!(
            store.room_position(&room.room_id, 0, Direction::Forward, count).await.unwrap(),
            Some(oldest_first[count - 1])
        );
    }
    for direction in [Direction::Backward, Direction::Forward] {
        let from = if direction == Direction::Backward { StreamPos::MAX } else { 0 };
        assert_eq!(
            store
                .room_position(&room.room_id, from, direction, newest_first.len() + 1)
                .await
                .unwrap(),
            None
        );
        assert_eq!(store.room_position(&room.room_id, head, direction, 0).await.unwrap(), None);
    }
    assert_eq!(
        store
            .room_position(&room.room_id, positions[1], Direction::Backward, 2)
            .await
            .unwrap(),
        Some(positions[0])
    );
    assert_eq!(
        store
            .room_position(&room.room_id, positions[0], Direction::Forward, 1)
            .await
            .unwrap(),
        Some(positions[1]),
        "forwards counts from after the position"
    );
    assert_eq!(store.room_position(&room.room_id, head, Direction::Forward, 1).await.unwrap(), None);
    for (user, expected) in [(dave, Some(Membership::Invite)), (erin, None)] {
        let records = store.memberships(&OwnedUserId::try_from(user).unwrap()).await.unwrap();
        let here = records.iter().find(|m| m.room_id == room.room_id).map(|m| m.membership);
        assert_eq!(here, expected, "{user}'s membership record holds only what landed");
    }
}

/// `writers` tasks (one per store in `stores`, round the list) each append
/// `each` messages to the room, every one built on the head it read and
/// appended with `expected_head`, rebuilding when the head moved. Then
/// checks the room is one chain holding every event.
async fn append_from_writers(stores: Vec<Arc<dyn Store>>, room: RoomRecord, signer: Arc<EventSigner>, writers: usize, each: usize) {
    let before = all_events(&*stores[0], &room.room_id).await.len();
    let mut tasks = vec![];
    for writer in 0..writers {
        let store = stores[writer % stores.len()].clone();
        let (room, signer) = (room.clone(), signer.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..each {
                loop {
                    let newest = store
                        .room_events(EventRange {
                            room_id: &room.room_id,
                            after: 0,
                            until: u64::MAX,
                            direction: Direction::Backward,
                            limit: 1,
                            kinds: None,
                            not_kinds: &[],
                        })
                        .await
                        .unwrap()
                        .remove(0);
                    let event = Pdu::build(
                        &signer,
                        &room.version,
                        Some(&room.room_id),
                        &room.creator,
                        NewEvent::message("m.room.message", json!({"writer": writer, "n": n})),
                        vec![newest.pdu.event_id.clone()],
                        vec![],
                        newest.pdu.depth + 1,
                        MilliSecondsSinceUnixEpoch::now(),
                    )
                    .unwrap();
                    let mut w = write(event);
                    w.expected_head = Some(newest.pdu.event_id.clone());
                    match store.append_event(w).await.unwrap() {
                        AppendOutcome::Appended(_) => break,
                        AppendOutcome::HeadMoved { head } => assert!(head > newest.pos, "the head only moves forward"),
                        AppendOutcome::Duplicate(_) => panic!("no transaction ids here"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    let events = all_events(&*stores[stores.len() - 1], &room.room_id).await;
    assert_eq!(events.len(), before + writers * each, "every writer's every event landed once");
    for pair in events.windows(2) {
        assert_eq!(
            pair[1].pdu.prev_events,
            vec![pair[0].pdu.event_id.clone()],
            "each event was built on the one before it: the room is one chain"
        );
    }
}

/// What the store handed its listener as it committed is exactly what it
/// replays from the database, in any page size.
async fn the_feed_and_the_replay_agree(store: &dyn Store, feed: &RecordingListener, start: StreamPos) {
    let mut fed = vec![];
    let mut at = start;
    for batch in feed.batches.lock().unwrap().iter() {
        assert_eq!(batch.after, at, "batches follow each other without a gap");
        assert!(batch.head > batch.after);
        fed.extend(batch.updates.iter().map(describe));
        at = batch.head;
    }
    assert_eq!(at, store.current_position(), "every commit was fed");
    let replayed = replay(store, start, 10_000).await;
    assert_eq!(fed.len(), replayed.len());
    assert_eq!(fed, replayed, "the feed and the replay agree");
    assert_eq!(replay(store, start, 7).await, replayed, "pages of any size cover the same updates");
    let empty = store.updates_after(store.current_position(), 10).await.unwrap();
    assert!(empty.updates.is_empty() && empty.head == store.current_position());
}

fn pdu(room: &RoomRecord, signer: &EventSigner, n: u64, event: NewEvent) -> Pdu {
    Pdu::build(
        signer,
        &room.version,
        Some(&room.room_id),
        &room.creator,
        event,
        vec![],
        vec![],
        n,
        MilliSecondsSinceUnixEpoch::now(),
    )
    .expect("build event")
}

/// Every event of the room, oldest first.
async fn all_events(store: &dyn Store, room_id: &ruma::RoomId) -> Vec<StoredEvent> {
    store
        .room_events(EventRange {
            room_id,
            after: 0,
            until: u64::MAX,
            direction: Direction::Forward,
            limit: 10_000,
            kinds: None,
            not_kinds: &[],
        })
        .await
        .unwrap()
}

/// The room's create event (room version 11).
fn create_event(room: &RoomRecord, signer: &EventSigner) -> Pdu {
    pdu(room, signer, 1, NewEvent::state("m.room.create", "", json!({"room_version": "11"})))
}

fn write(pdu: Pdu) -> EventWrite {
    EventWrite {
        pdu,
        txn: None,
        relation: None,
        redacted_target: None,
        prev: None,
        expected_head: None,
    }
}

/// The position of an append that must have been appended.
fn appended(outcome: AppendOutcome) -> StreamPos {
    match outcome {
        AppendOutcome::Appended(pos) => pos,
        other => panic!("expected an append, got {other:?}"),
    }
}

fn txn(device: &str, txn_id: &str) -> TxnRef {
    TxnRef {
        device_id: device.into(),
        txn_id: txn_id.into(),
        scope: "send/m.room.message".into(),
    }
}

/// Creates `room` with its create event and the creator's join; returns both.
async fn create_joined_room(store: &dyn Store, room: &RoomRecord, signer: &EventSigner) -> (Pdu, Pdu) {
    let create = create_event(room, signer);
    let join = pdu(
        room,
        signer,
        2,
        NewEvent::state("m.room.member", room.creator.as_str(), json!({"membership": "join"})),
    );
    store
        .create_room(room.clone(), vec![write(create.clone()), write(join.clone())])
        .await
        .unwrap();
    (create, join)
}

fn test_room(id: &str) -> (RoomRecord, EventSigner) {
    let signer = EventSigner::new(owned_server_name!("localhost"), &EventSigner::generate_key(), "t").unwrap();
    let room = RoomRecord {
        room_id: OwnedRoomId::try_from(id).unwrap(),
        version: RoomVersionId::V11,
        creator: owned_user_id!("@alice:localhost"),
        is_public: false,
    };
    (room, signer)
}

async fn room_list_entries(store: &dyn Store) {
    let (plain, signer) = test_room("!list-plain:localhost");
    create_joined_room(store, &plain, &signer).await;
    let message = pdu(&plain, &signer, 3, NewEvent::message("m.room.message", json!({"body": "hi"})));
    let message_pos = appended(store.append_event(write(message)).await.unwrap());
    let topic = pdu(&plain, &signer, 4, NewEvent::state("m.room.topic", "", json!({"topic": "t"})));
    appended(store.append_event(write(topic)).await.unwrap());

    let (space, signer) = test_room("!list-space:localhost");
    let create = pdu(
        &space,
        &signer,
        1,
        NewEvent::state("m.room.create", "", json!({"room_version": "11", "type": "m.space"})),
    );
    let join = pdu(
        &space,
        &signer,
        2,
        NewEvent::state("m.room.member", space.creator.as_str(), json!({"membership": "join"})),
    );
    let encryption = pdu(
        &space,
        &signer,
        3,
        NewEvent::state("m.room.encryption", "", json!({"algorithm": "m.megolm.v1.aes-sha2"})),
    );
    let positions = store
        .create_room(space.clone(), vec![write(create), write(join), write(encryption)])
        .await
        .unwrap();

    let rooms = [
        plain.room_id.clone(),
        space.room_id.clone(),
        OwnedRoomId::try_from("!unknown:localhost").unwrap(),
    ];
    let mut entries = store.room_list_entries(&rooms, &["m.room.create", "m.room.message"]).await.unwrap();
    entries.sort_by(|a, b| a.room_id.cmp(&b.room_id));
    assert_eq!(
        entries,
        [
            RoomListEntry {
                room_id: plain.room_id.clone(),
                bump: message_pos,
                encrypted: false,
                room_type: None,
            },
            RoomListEntry {
                room_id: space.room_id.clone(),
                bump: positions[0],
                encrypted: true,
                room_type: Some("m.space".into()),
            },
        ],
        "the newest bumping event (a later topic does not bump), encryption and type; unknown rooms left out"
    );
    let any = store.room_list_entries(&rooms[..1], &["m.sticker"]).await.unwrap();
    assert_eq!(any[0].bump, message_pos + 1, "without a bumping event, the newest event");
}

async fn accounts_and_tokens(store: &dyn Store) {
    let alice = owned_user_id!("@alice:localhost");
    store
        .create_user(NewUser {
            user_id: alice.clone(),
            password_hash: Some("h1".into()),
            created_ms: 1,
        })
        .await
        .unwrap();
    assert!(
        matches!(
            store
                .create_user(NewUser {
                    user_id: alice.clone(),
                    password_hash: None,
                    created_ms: 2
                })
                .await,
            Err(StoreError::Conflict(_))
        ),
        "a taken user id is a conflict"
    );
    let rec = store.user(&alice).await.unwrap().expect("user stored");
    assert_eq!(rec.password_hash.as_deref(), Some("h1"));
    store.set_password_hash(&alice, "h2").await.unwrap();
    store.set_profile(&alice, ProfileField::DisplayName, Some("Alice A")).await.unwrap();
    let rec = store.user(&alice).await.unwrap().unwrap();
    assert_eq!(
        (rec.password_hash.as_deref(), rec.displayname.as_deref()),
        (Some("h2"), Some("Alice A"))
    );
    assert_eq!(
        store.search_users("alice a", 10, None).await.unwrap().len(),
        1,
        "search by display name, any case"
    );
    assert!(store.user(user_id!("@nobody:localhost")).await.unwrap().is_none());

    let mut last_change = 0;
    for (dev, tok) in [("D1", "t1"), ("D2", "t2")] {
        let changed = store
            .upsert_device(NewDevice {
                user_id: alice.clone(),
                device_id: dev.into(),
                display_name: None,
                token_hash: tok.into(),
                now_ms: 5,
                ip: Some("192.0.2.1".into()),
            })
            .await
            .unwrap();
        assert!(changed > last_change);
        last_change = changed;
    }
    let changes = store.device_list_changes(0, store.current_position()).await.unwrap();
    assert_eq!(changes, vec![(alice.clone(), last_change)], "one entry per user, its latest change");
    assert_eq!(store.session_by_token_hash("t1").await.unwrap().unwrap().device_id, "D1");
    // Logging a device in again replaces its token.
    let relogin = store
        .upsert_device(NewDevice {
            user_id: alice.clone(),
            device_id: "D1".into(),
            display_name: Some("phone".into()),
            token_hash: "t1b".into(),
            now_ms: 6,
            ip: None,
        })
        .await
        .unwrap();
    let list_changes = store.device_list_changes(last_change, store.current_position()).await.unwrap();
    assert!(relogin > last_change, "a new token is a change of the user's sessions");
    assert!(list_changes.is_empty(), "a new token for a known device is no device-list change");
    assert!(store.session_by_token_hash("t1").await.unwrap().is_none(), "old token revoked");
    let devices = store.devices(&alice).await.unwrap();
    assert_eq!(devices.len(), 2);
    assert_eq!(
        (devices[0].last_seen_ms, devices[0].last_seen_ip.as_deref()),
        (Some(6), Some("192.0.2.1")),
        "an address stays known until another is seen"
    );
    store.touch_device(&alice, "D1", "198.51.100.7", 9).await.unwrap();
    let d1 = store.devices(&alice).await.unwrap().remove(0);
    assert_eq!((d1.last_seen_ms, d1.last_seen_ip.as_deref()), (Some(9), Some("198.51.100.7")));
    let renamed = store.rename_device(&alice, "D2", Some("laptop")).await.unwrap();
    assert!(renamed.is_some_and(|p| p > last_change), "a rename changes the device list");
    assert_eq!(store.rename_device(&alice, "NOPE", Some("x")).await.unwrap(), None);
    let removed = store.delete_devices(&alice, &["D2".into()]).await.unwrap();
    assert_eq!(removed.count, 1);
    assert!(removed.list_changed_at > renamed, "removing any device changes the list");
    assert!(
        store.session_by_token_hash("t2").await.unwrap().is_none(),
        "deleting a device revokes its token"
    );
    store.deactivate_user(&alice).await.unwrap();
    assert!(store.user(&alice).await.unwrap().unwrap().deactivated);
    assert!(
        store.session_by_token_hash("t1b").await.unwrap().is_none(),
        "deactivation revokes tokens"
    );
}

async fn events_positions_and_idempotency(store: &dyn Store) {
    let (room, signer) = test_room("!pos:localhost");
    let create = create_event(&room, &signer);
    let create_id = create.event_id.clone();
    let start = store.current_position();
    let positions = store.create_room(room.clone(), vec![write(create)]).await.unwrap();
    assert!(positions[0] > start, "positions increase");
    assert_eq!(store.room(&room.room_id).await.unwrap().unwrap(), room);

    let mut last = positions[0];
    let mut ids: Vec<OwnedEventId> = vec![];
    for n in 0..30u64 {
        let p = pdu(
            &room,
            &signer,
            n + 2,
            NewEvent::message("m.room.message", json!({"body": n.to_string()})),
        );
        let id = p.event_id.clone();
        let mut w = write(p);
        w.txn = Some(txn("D", &format!("txn{n}")));
        let pos = appended(store.append_event(w).await.unwrap());
        assert!(pos > last, "strictly increasing");
        last = pos;
        ids.push(id);
    }
    assert_eq!(store.current_position(), last, "current position is the last commit");

    // The same transaction id again maps to the first event and writes nothing.
    let again = pdu(&room, &signer, 99, NewEvent::message("m.room.message", json!({"body": "dup"})));
    let mut w = write(again);
    w.txn = Some(txn("D", "txn3"));
    match store.append_event(w).await.unwrap() {
        AppendOutcome::Duplicate(id) => assert_eq!(id, ids[3]),
        other => panic!("duplicate txn was appended: {other:?}"),
    }
    assert_eq!(
        store.event_by_txn(&room.room_id, &room.creator, &txn("D", "txn5")).await.unwrap(),
        Some(ids[5].clone())
    );
    assert_eq!(
        store
            .event_by_txn(&room.room_id, &room.creator, &txn("OTHER", "txn5"))
            .await
            .unwrap(),
        None,
        "txn ids are per device"
    );
    // Pagination in both directions covers every event once.
    let mut seen = vec![];
    let mut until = store.current_position();
    loop {
        let page = store
            .room_events(EventRange {
                room_id: &room.room_id,
                after: 0,
                until,
                direction: Direction::Backward,
                limit: 7,
                kinds: None,
                not_kinds: &[],
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        until = page.last().unwrap().pos - 1;
        seen.extend(page.into_iter().map(|e| e.pdu.event_id));
    }
    assert_eq!(seen.len(), 31, "30 messages and the create event");
    seen.reverse();
    assert_eq!(&seen[1..], &ids[..]);
    let fwd = store
        .room_events(EventRange {
            room_id: &room.room_id,
            after: positions[0],
            until: u64::MAX,
            direction: Direction::Forward,
            limit: 100,
            kinds: None,
            not_kinds: &[],
        })
        .await
        .unwrap();
    assert_eq!(fwd.iter().map(|e| e.pdu.event_id.clone()).collect::<Vec<_>>(), ids);
    // A type list passes over the other events: they do not count to the limit.
    let types = |kinds: Option<&[&str]>, not_kinds: &[&str], direction, limit| {
        let to_strings = |k: &[&str]| k.iter().map(|k| k.to_string()).collect::<Vec<String>>();
        let (kinds, not_kinds) = (kinds.map(to_strings), to_strings(not_kinds));
        let room_id = room.room_id.clone();
        async move {
            store
                .room_events(EventRange {
                    room_id: &room_id,
                    after: 0,
                    until: u64::MAX,
                    direction,
                    limit,
                    kinds: kinds.as_deref(),
                    not_kinds: &not_kinds,
                })
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.pdu.event_id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        types(Some(&["m.room.create"]), &[], Direction::Backward, 1).await,
        std::slice::from_ref(&create_id),
        "the create event, behind 30 messages"
    );
    assert_eq!(
        types(Some(&["m.room.create", "m.room.message"]), &[], Direction::Forward, 100)
            .await
            .len(),
        31
    );
    assert_eq!(
        types(Some(&["m.room.message"]), &[], Direction::Backward, 2).await,
        [ids[29].clone(), ids[28].clone()]
    );
    assert!(types(Some(&["m.reaction"]), &[], Direction::Forward, 100).await.is_empty());
    assert!(
        types(Some(&[]), &[], Direction::Forward, 100).await.is_empty(),
        "an empty list admits nothing"
    );
    // And a list of types to leave out passes over those.
    assert_eq!(
        types(None, &["m.room.message"], Direction::Backward, 1).await,
        std::slice::from_ref(&create_id),
        "the create event, the messages passed over"
    );
    assert_eq!(types(None, &["m.room.create", "m.reaction"], Direction::Forward, 100).await, ids);
    assert_eq!(
        types(None, &[], Direction::Forward, 100).await.len(),
        31,
        "an empty list leaves nothing out"
    );
    let got = store.event(&ids[0]).await.unwrap().expect("event by id");
    assert_eq!(got.txn, Some(txn("D", "txn0")));

    // The same id under another path (another endpoint or event type) is a new request.
    let other_scope = pdu(&room, &signer, 98, NewEvent::message("m.reaction", json!({})));
    let other_id = other_scope.event_id.clone();
    let mut w = write(other_scope);
    w.txn = Some(TxnRef {
        scope: "send/m.reaction".into(),
        ..txn("D", "txn3")
    });
    assert!(
        matches!(store.append_event(w).await.unwrap(), AppendOutcome::Appended(_)),
        "a transaction id is scoped to its request path"
    );
    assert_eq!(
        store
            .event_by_txn(
                &room.room_id,
                &room.creator,
                &TxnRef {
                    scope: "send/m.reaction".into(),
                    ..txn("D", "txn3")
                }
            )
            .await
            .unwrap(),
        Some(other_id.clone())
    );
    let (other_room, _) = test_room("!pos2:localhost");
    let elsewhere = Pdu::build(
        &signer,
        &other_room.version,
        Some(&other_room.room_id),
        &other_room.creator,
        NewEvent::message("m.room.message", json!({"body": "x"})),
        vec![],
        vec![],
        1,
        MilliSecondsSinceUnixEpoch::now(),
    )
    .unwrap();
    let mut w = write(elsewhere);
    w.txn = Some(txn("D", "txn3"));
    assert!(
        matches!(store.append_event(w).await.unwrap(), AppendOutcome::Appended(_)),
        "and to its room"
    );
}

async fn state_membership_and_redaction(store: &dyn Store) {
    let (room, signer) = test_room("!state:localhost");
    let alice = room.creator.clone();
    let bob = owned_user_id!("@bob:localhost");
    create_joined_room(store, &room, &signer).await;
    let invite = pdu(
        &room,
        &signer,
        3,
        NewEvent::state("m.room.member", bob.as_str(), json!({"membership": "invite"})),
    );
    let AppendOutcome::Appended(invite_pos) = store.append_event(write(invite)).await.unwrap() else {
        panic!()
    };
    let topic1 = pdu(&room, &signer, 4, NewEvent::state("m.room.topic", "", json!({"topic": "one"})));
    store.append_event(write(topic1)).await.unwrap();
    let topic2 = pdu(&room, &signer, 5, NewEvent::state("m.room.topic", "", json!({"topic": "two"})));
    store.append_event(write(topic2.clone())).await.unwrap();

    let state = store.current_state(&room.room_id).await.unwrap();
    assert_eq!(state.len(), 4, "create, two members, one topic");
    assert!(state.iter().any(|e| e.pdu.event_id == topic2.event_id), "latest state wins");

    let bobs = store.memberships(&bob).await.unwrap();
    assert_eq!(bobs.len(), 1);
    assert_eq!((bobs[0].membership, bobs[0].pos), (Membership::Invite, invite_pos));
    let alice_joined_at = store.memberships(&alice).await.unwrap()[0].pos;
    let renamed = pdu(
        &room,
        &signer,
        5,
        NewEvent::state("m.room.member", alice.as_str(), json!({"membership": "join", "displayname": "Al"})),
    );
    store.append_event(write(renamed.clone())).await.unwrap();
    let alices = store.memberships(&alice).await.unwrap();
    assert_eq!(
        (alices[0].pos, &alices[0].event_id),
        (alice_joined_at, &renamed.event_id),
        "a new member event with the same membership keeps where the membership began"
    );

    let msg = pdu(&room, &signer, 6, NewEvent::message("m.room.message", json!({"body": "oops"})));
    store.append_event(write(msg.clone())).await.unwrap();
    let reaction = pdu(
        &room,
        &signer,
        7,
        NewEvent::message(
            "m.reaction",
            json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": msg.event_id, "key": "+1"}}),
        ),
    );
    let mut w = write(reaction.clone());
    w.relation = Some((msg.event_id.clone(), "m.annotation".into()));
    store.append_event(w).await.unwrap();
    let rels = store
        .relations(&room.room_id, &msg.event_id, Some("m.annotation"), 10)
        .await
        .unwrap();
    assert_eq!(rels.len(), 1);
    assert!(
        store
            .relations(&room.room_id, &msg.event_id, Some("m.replace"), 10)
            .await
            .unwrap()
            .is_empty()
    );

    let mut redaction_event = NewEvent::message("m.room.redaction", json!({"redacts": msg.event_id}));
    redaction_event.redacts = Some(msg.event_id.clone());
    let redaction = pdu(&room, &signer, 8, redaction_event);
    let redacted = kabar_domain::client_event::redact_pdu(&msg, &room.version).unwrap();
    let mut w = write(redaction.clone());
    w.redacted_target = Some((msg.event_id.clone(), redacted));
    store.append_event(w).await.unwrap();
    let got = store.event(&msg.event_id).await.unwrap().unwrap();
    assert_eq!(got.pdu.content.get(), "{}", "redaction replaces stored content");
    assert_eq!(got.prev, None, "a message replaces no state");
    assert_eq!(got.redacted_by, Some(redaction.event_id.clone()));
    assert!(!got.pdu.json.contains("oops"));

    store.set_alias("#state:localhost", &room.room_id, &alice).await.unwrap();
    assert!(matches!(
        store.set_alias("#state:localhost", &room.room_id, &alice).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.alias("#state:localhost").await.unwrap().unwrap().0, room.room_id);
    assert_eq!(
        store.room_aliases(&room.room_id).await.unwrap(),
        vec!["#state:localhost".to_owned()]
    );
    assert!(store.delete_alias("#state:localhost").await.unwrap());
    assert!(store.alias("#state:localhost").await.unwrap().is_none());
    store.set_room_public(&room.room_id, true).await.unwrap();
    assert!(store.public_rooms().await.unwrap().contains(&room.room_id));
}

/// State at a point of the timeline, previous state of each state event,
/// and the history of one piece of state.
async fn state_at_points_and_history(store: &dyn Store) {
    let (room, signer) = test_room("!history:localhost");
    let alice = room.creator.clone();
    let bob = owned_user_id!("@bob_history:localhost");
    let (create, join) = create_joined_room(store, &room, &signer).await;
    let append = async |event: Pdu, prev: Option<&Pdu>| {
        let mut w = write(event);
        w.prev = prev.map(|p| PrevState {
            event_id: p.event_id.clone(),
            sender: p.sender.clone(),
            content: p.content.get().to_owned(),
        });
        appended(store.append_event(w).await.unwrap())
    };
    let bob_joins = pdu(
        &room,
        &signer,
        3,
        NewEvent::state("m.room.member", bob.as_str(), json!({"membership": "join"})),
    );
    let joined_at = append(bob_joins.clone(), None).await;
    let topic = pdu(&room, &signer, 4, NewEvent::state("m.room.topic", "", json!({"topic": "before"})));
    append(topic.clone(), None).await;
    let bob_leaves = pdu(
        &room,
        &signer,
        5,
        NewEvent::state("m.room.member", bob.as_str(), json!({"membership": "leave"})),
    );
    let left_at = append(bob_leaves.clone(), Some(&bob_joins)).await;
    let topic2 = pdu(&room, &signer, 6, NewEvent::state("m.room.topic", "", json!({"topic": "after"})));
    append(topic2.clone(), Some(&topic)).await;

    let at_leave: Vec<OwnedEventId> = store
        .state_at(&room.room_id, left_at)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.pdu.event_id)
        .collect();
    assert_eq!(
        at_leave,
        vec![
            create.event_id.clone(),
            join.event_id.clone(),
            topic.event_id.clone(),
            bob_leaves.event_id.clone()
        ],
        "the state right after the leave, in stream order"
    );
    // Who joined where, oldest first; a leave is not a join.
    let alice_joined_at = store.event(&join.event_id).await.unwrap().unwrap().pos;
    let everyone = store.member_joins(&room.room_id, 0, u64::MAX, 10).await.unwrap();
    assert_eq!(everyone, vec![(alice.clone(), alice_joined_at), (bob.clone(), joined_at)]);
    let first = store.member_joins(&room.room_id, 0, u64::MAX, 1).await.unwrap();
    assert_eq!(first, vec![(alice.clone(), alice_joined_at)], "at most the limit");
    let later = store.member_joins(&room.room_id, alice_joined_at, joined_at, 10).await.unwrap();
    assert_eq!(later, vec![(bob.clone(), joined_at)], "after the first, up to and with the second");
    let before_bob = store.member_joins(&room.room_id, 0, joined_at - 1, 10).await.unwrap();
    assert_eq!(before_bob.len(), 1, "up to a position");

    // Paged: the same entries as a whole.
    let mut paged = vec![];
    let mut after: Option<(String, String)> = None;
    loop {
        let page = store
            .state_at_page(&room.room_id, left_at, after.as_ref().map(|(k, s)| (k.as_str(), s.as_str())), 2)
            .await
            .unwrap();
        assert!(page.len() <= 2, "a page holds at most its limit");
        let Some(last) = page.last() else { break };
        after = Some((last.pdu.kind.to_string(), last.pdu.state_key.clone().unwrap()));
        paged.extend(
            page.into_iter()
                .map(|e| (e.pdu.kind.to_string(), e.pdu.state_key.unwrap(), e.pdu.event_id)),
        );
    }
    let mut whole: Vec<(String, String, OwnedEventId)> = store
        .state_at(&room.room_id, left_at)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.pdu.kind.to_string(), e.pdu.state_key.unwrap(), e.pdu.event_id))
        .collect();
    // Each engine orders keys by its own collation: compared as sets.
    let pages = paged.len();
    paged.sort();
    paged.dedup();
    assert_eq!(paged.len(), pages, "no entry on two pages");
    whole.sort();
    assert_eq!(paged, whole, "the pages hold the state after the leave");
    let before_join = store.state_at(&room.room_id, joined_at - 1).await.unwrap();
    assert_eq!(before_join.len(), 2, "create and alice's join");
    let now = store.state_at(&room.room_id, store.current_position()).await.unwrap();
    assert!(now.iter().any(|e| e.pdu.event_id == topic2.event_id));
    assert_eq!(
        now.len(),
        store.current_state(&room.room_id).await.unwrap().len(),
        "state at the newest position is the current state"
    );

    let leave = store.event(&bob_leaves.event_id).await.unwrap().unwrap();
    let prev = leave.prev.expect("the leave replaced the join");
    assert_eq!(
        (prev.event_id, prev.sender, prev.content.as_str()),
        (bob_joins.event_id.clone(), alice.clone(), r#"{"membership":"join"}"#)
    );
    let history: Vec<OwnedEventId> = store
        .state_history(&room.room_id, "m.room.member", bob.as_str())
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.pdu.event_id)
        .collect();
    assert_eq!(history, vec![bob_joins.event_id.clone(), bob_leaves.event_id.clone()]);

    // Redacting the replaced event redacts what its successor shows of it.
    let mut redaction_event = NewEvent::message("m.room.redaction", json!({"redacts": topic.event_id}));
    redaction_event.redacts = Some(topic.event_id.clone());
    let mut w = write(pdu(&room, &signer, 7, redaction_event));
    w.redacted_target = Some((
        topic.event_id.clone(),
        kabar_domain::client_event::redact_pdu(&topic, &room.version).unwrap(),
    ));
    store.append_event(w).await.unwrap();
    let after = store.event(&topic2.event_id).await.unwrap().unwrap();
    assert_eq!(after.prev.map(|p| p.content), Some("{}".to_owned()));
}

/// A user's membership events in a room in order, forgetting a room left
/// behind, and the thread list ordered by latest reply.
async fn membership_history_forget_and_threads(store: &dyn Store) {
    let (room, signer) = test_room("!threads:localhost");
    let carol = owned_user_id!("@carol:localhost");
    create_joined_room(store, &room, &signer).await;
    let mut carol_positions = vec![];
    for (n, membership) in [(3, "invite"), (4, "join"), (5, "leave")] {
        let e = pdu(
            &room,
            &signer,
            n,
            NewEvent::state("m.room.member", carol.as_str(), json!({ "membership": membership })),
        );
        let AppendOutcome::Appended(pos) = store.append_event(write(e)).await.unwrap() else {
            panic!("fresh member event")
        };
        carol_positions.push(pos);
    }
    let history = store.membership_history(&room.room_id, &carol).await.unwrap();
    assert_eq!(
        history.iter().map(|m| (m.membership, m.pos)).collect::<Vec<_>>(),
        vec![
            (Membership::Invite, carol_positions[0]),
            (Membership::Join, carol_positions[1]),
            (Membership::Leave, carol_positions[2]),
        ],
        "every membership event of the user, oldest first"
    );
    assert!(
        store
            .membership_history(&room.room_id, &owned_user_id!("@nobody:localhost"))
            .await
            .unwrap()
            .is_empty()
    );

    // Forgetting: only a room one has left, and only for oneself.
    store.forget_room(&room.creator, &room.room_id).await.unwrap();
    assert!(
        store
            .memberships(&room.creator)
            .await
            .unwrap()
            .iter()
            .any(|m| m.room_id == room.room_id),
        "a joined room cannot be forgotten"
    );
    store.forget_room(&carol, &room.room_id).await.unwrap();
    assert!(
        !store.memberships(&carol).await.unwrap().iter().any(|m| m.room_id == room.room_id),
        "a left room is forgotten"
    );
    assert_eq!(
        store.membership_history(&room.room_id, &carol).await.unwrap().len(),
        3,
        "history stays"
    );

    // Threads: most recently active first, each with its latest reply.
    let root = |n, body: &str| pdu(&room, &signer, n, NewEvent::message("m.room.message", json!({ "body": body })));
    let (first, second) = (root(10, "first root"), root(11, "second root"));
    for r in [&first, &second] {
        store.append_event(write(r.clone())).await.unwrap();
    }
    let reply = |n, to: &Pdu| {
        let e = pdu(
            &room,
            &signer,
            n,
            NewEvent::message(
                "m.room.message",
                json!({ "body": "reply", "m.relates_to": { "rel_type": "m.thread", "event_id": to.event_id } }),
            ),
        );
        let mut w = write(e);
        w.relation = Some((to.event_id.clone(), "m.thread".into()));
        w
    };
    let appended = |w: EventWrite| async move { appended(store.append_event(w).await.unwrap()) };
    let _ = appended(reply(12, &first)).await;
    let second_latest = appended(reply(13, &second)).await;
    let first_latest = appended(reply(14, &first)).await;
    assert_eq!(
        store.thread_roots(&room.room_id, 10).await.unwrap(),
        vec![(first.event_id.clone(), first_latest), (second.event_id.clone(), second_latest)]
    );
    assert_eq!(store.thread_roots(&room.room_id, 1).await.unwrap().len(), 1, "the limit holds");
}

/// "Log out everywhere else": every device but the one kept goes, with its
/// token, and the device list changes.
async fn deleting_every_device_but_one(store: &dyn Store) {
    let dave = owned_user_id!("@dave:localhost");
    store
        .create_user(NewUser {
            user_id: dave.clone(),
            password_hash: None,
            created_ms: 1,
        })
        .await
        .unwrap();
    for d in ["D1", "D2", "D3"] {
        device(store, &dave, d).await;
    }
    let before = store.current_position();
    let removed = store.delete_all_devices(&dave, Some("D2")).await.unwrap();
    assert_eq!(removed.count, 2);
    assert!(removed.list_changed_at.is_some_and(|p| p > before), "the device list changed");
    let left: Vec<String> = store.devices(&dave).await.unwrap().into_iter().map(|d| d.device_id).collect();
    assert_eq!(left, ["D2"]);
    assert!(store.session_by_token_hash(&format!("tok-{dave}-D1")).await.unwrap().is_none());
    assert!(
        store.session_by_token_hash(&format!("tok-{dave}-D2")).await.unwrap().is_some(),
        "the kept one stays signed in"
    );
    let removed = store.delete_all_devices(&dave, None).await.unwrap();
    assert_eq!(removed.count, 1);
    assert!(store.devices(&dave).await.unwrap().is_empty());
    assert_eq!(
        store.delete_all_devices(&dave, None).await.unwrap(),
        DevicesRemoved::default(),
        "nothing left: nothing changes"
    );
}

/// The user directory shows a searcher only the users they may know of.
async fn user_directory_visibility(store: &dyn Store) {
    let (room, signer) = test_room("!directory:localhost");
    let (searcher, shares, stranger, public) = (
        owned_user_id!("@dir_searcher:localhost"),
        owned_user_id!("@dir_shares:localhost"),
        owned_user_id!("@dir_stranger:localhost"),
        owned_user_id!("@dir_public:localhost"),
    );
    for u in [&searcher, &shares, &stranger, &public] {
        store
            .create_user(NewUser {
                user_id: u.clone(),
                password_hash: None,
                created_ms: 1,
            })
            .await
            .unwrap();
    }
    let room = RoomRecord {
        creator: searcher.clone(),
        ..room
    };
    let member = |u: &ruma::UserId, n: u64, room: &RoomRecord| {
        write(
            Pdu::build(
                &signer,
                &room.version,
                Some(&room.room_id),
                u,
                NewEvent::state("m.room.member", u.as_str(), json!({"membership": "join"})),
                vec![],
                vec![],
                n,
                MilliSecondsSinceUnixEpoch::now(),
            )
            .unwrap(),
        )
    };
    store
        .create_room(room.clone(), vec![member(&searcher, 1, &room), member(&shares, 2, &room)])
        .await
        .unwrap();
    let (open, _) = test_room("!directory_open:localhost");
    let open = RoomRecord {
        creator: public.clone(),
        ..open
    };
    let rule = write(pdu(
        &open,
        &signer,
        2,
        NewEvent::state("m.room.join_rules", "", json!({"join_rule": "public"})),
    ));
    store
        .create_room(open.clone(), vec![member(&public, 1, &open), rule])
        .await
        .unwrap();
    let found = |users: Vec<UserRecord>| users.into_iter().map(|u| u.user_id.to_string()).collect::<Vec<_>>();
    assert_eq!(
        found(store.search_users("dir_", 10, Some(&searcher)).await.unwrap()),
        ["@dir_public:localhost", "@dir_searcher:localhost", "@dir_shares:localhost"],
        "the searcher, who shares a room with them, and who is in a public room"
    );
    assert_eq!(
        store.search_users("dir_", 10, None).await.unwrap().len(),
        4,
        "without a searcher: everyone"
    );
}

async fn user_data(store: &dyn Store) {
    let u = owned_user_id!("@carol:localhost");
    let room = owned_room_id!("!ud:localhost");
    let p1 = store.put_account_data(&u, None, "m.direct", "{\"a\":1}").await.unwrap();
    let p2 = store.put_account_data(&u, Some(&room), "m.tag", "{\"tags\":{}}").await.unwrap();
    assert!(p2 > p1);
    store.put_account_data(&u, None, "m.direct", "{\"a\":2}").await.unwrap();
    assert_eq!(
        store.account_data(&u, None, "m.direct").await.unwrap().as_deref(),
        Some("{\"a\":2}")
    );
    let since = store.account_data_since(&u, p2).await.unwrap();
    assert_eq!(since.len(), 1, "only what changed after the position");
    assert_eq!(&*since[0].content, "{\"a\":2}");
    assert_eq!(
        store.account_data_since(&u, 0).await.unwrap().len(),
        2,
        "one row per key, latest value"
    );

    let r = |ev: &str| ReceiptRecord {
        room_id: room.clone(),
        user_id: u.clone(),
        receipt_type: "m.read".into(),
        event_id: OwnedEventId::try_from(ev).unwrap(),
        thread_id: None,
        ts_ms: 1,
        pos: 0,
    };
    let rp = store.put_receipt(r("$one")).await.unwrap();
    let other_reader = owned_user_id!("@reader:localhost");
    store
        .put_receipt(ReceiptRecord {
            user_id: other_reader.clone(),
            ..r("$one")
        })
        .await
        .unwrap();
    store.put_receipt(r("$two")).await.unwrap();
    let got = store.receipts_since(&room, 0, None).await.unwrap();
    assert_eq!(got.len(), 2, "a newer receipt replaces the older");
    assert_eq!((got[0].user_id.as_str(), got[0].event_id.as_str()), ("@reader:localhost", "$one"));
    assert_eq!(got[1].event_id.as_str(), "$two");
    assert!(got[1].pos > rp);
    let own = store.receipts_since(&room, 0, Some(&u)).await.unwrap();
    assert_eq!(own.len(), 1, "only the one reader's");
    assert_eq!((&own[0].user_id, own[0].event_id.as_str()), (&u, "$two"));
    assert!(store.receipts_since(&room, got[1].pos, Some(&u)).await.unwrap().is_empty());
    assert_eq!(store.receipt(&room, &u, "m.read").await.unwrap().unwrap().event_id.as_str(), "$two");
    assert!(store.receipt(&room, &u, "m.read.private").await.unwrap().is_none());

    let id = store.put_filter(&u, "{\"room\":{}}").await.unwrap();
    assert_eq!(store.filter(&u, &id).await.unwrap().as_deref(), Some("{\"room\":{}}"));
    assert_eq!(
        store.filter(user_id!("@other:localhost"), &id).await.unwrap(),
        None,
        "filters are per user"
    );

    let other = user_id!("@other:localhost");
    assert!(store.pushers(&u).await.unwrap().is_empty());
    store.set_pusher(&u, "org.app", "key1", "{\"n\":1}", false).await.unwrap();
    store.set_pusher(&u, "org.app", "key2", "{\"n\":2}", false).await.unwrap();
    store.set_pusher(&u, "org.app", "key1", "{\"n\":3}", false).await.unwrap();
    assert_eq!(
        store.pushers(&u).await.unwrap(),
        ["{\"n\":3}", "{\"n\":2}"],
        "one pusher per app id and push key, replaced in place"
    );
    store.set_pusher(other, "org.app", "key2", "{\"n\":4}", true).await.unwrap();
    assert_eq!(
        store.pushers(&u).await.unwrap(),
        ["{\"n\":3}"],
        "without append, the push key leaves every other user"
    );
    store.set_pusher(&u, "org.app", "key2", "{\"n\":5}", false).await.unwrap();
    assert_eq!(
        store.pushers(other).await.unwrap(),
        ["{\"n\":4}"],
        "with append, others keep theirs"
    );
    assert!(store.delete_pusher(&u, "org.app", "key1").await.unwrap());
    assert!(!store.delete_pusher(&u, "org.app", "key1").await.unwrap());
    assert_eq!(store.pushers(&u).await.unwrap(), ["{\"n\":5}"]);

    let m = MediaRecord {
        media_id: "abc".into(),
        content_type: Some("text/plain".into()),
        filename: None,
        sha256: "00".into(),
        size: 3,
        uploader: u.clone(),
        created_ms: 1,
    };
    store.put_media(m.clone()).await.unwrap();
    assert_eq!(store.media("abc").await.unwrap(), Some(m));
    let freeze = store.media_freeze_ms().await.unwrap();
    assert!(freeze > 0, "a store knows when unauthenticated media was frozen");
    assert_eq!(store.media_freeze_ms().await.unwrap(), freeze, "and it does not move");
}

async fn server_data(store: &dyn Store) {
    let k1 = store.signing_key(vec![1, 2, 3]).await.unwrap();
    let k2 = store.signing_key(vec![9]).await.unwrap();
    assert_eq!(k1, vec![1, 2, 3]);
    assert_eq!(k2, k1, "the first key is kept");
    store.create_registration_token("tok", Some(1), None).await.unwrap();
    assert!(store.registration_token_valid("tok", 0).await.unwrap());
    assert!(store.use_registration_token("tok", 0).await.unwrap());
    assert!(!store.use_registration_token("tok", 0).await.unwrap(), "uses are bounded");
    store.create_registration_token("old", None, Some(10)).await.unwrap();
    assert!(!store.use_registration_token("old", 11).await.unwrap(), "expired");
    assert!(!store.use_registration_token("missing", 0).await.unwrap());
}

async fn device(store: &dyn Store, user: &ruma::UserId, device_id: &str) -> StreamPos {
    store
        .upsert_device(NewDevice {
            user_id: user.to_owned(),
            device_id: device_id.into(),
            display_name: Some(format!("{device_id} name")),
            token_hash: format!("tok-{user}-{device_id}"),
            now_ms: 1,
            ip: None,
        })
        .await
        .unwrap()
}

fn otk(alg: &str, id: &str) -> OneTimeKey {
    OneTimeKey {
        algorithm: alg.into(),
        key_id: format!("{alg}:{id}"),
        json: format!("{{\"key\":\"{id}\"}}"),
    }
}

async fn device_keys_and_claims(store: &dyn Store) {
    let bob = owned_user_id!("@bob_keys:localhost");
    device(store, &bob, "B1").await;
    device(store, &bob, "B2").await;
    let before = store.current_position();
    let pos = store.put_device_keys(&bob, "B1", r#"{"k":1}"#).await.unwrap();
    assert!(
        pos.is_some_and(|p| p > before),
        "publishing keys is a device-list change at a new position"
    );
    assert_eq!(
        store.put_device_keys(&bob, "B1", r#"{"k":1}"#).await.unwrap(),
        None,
        "the same keys again change nothing"
    );
    let keys = store.device_keys(&bob).await.unwrap();
    assert_eq!(keys.len(), 1, "only devices that published keys are listed");
    assert_eq!(keys[0].display_name.as_deref(), Some("B1 name"));
    let changes = store.device_list_changes(before, store.current_position()).await.unwrap();
    assert_eq!(changes, vec![(bob.clone(), pos.unwrap())]);

    store
        .add_one_time_keys(&bob, "B1", vec![otk("signed_curve25519", "a"), otk("signed_curve25519", "b")])
        .await
        .unwrap();
    store
        .add_one_time_keys(&bob, "B1", vec![otk("signed_curve25519", "a")])
        .await
        .unwrap();
    let mut different = otk("signed_curve25519", "a");
    different.json = "{}".into();
    assert!(
        matches!(
            store.add_one_time_keys(&bob, "B1", vec![different]).await,
            Err(StoreError::Conflict(_))
        ),
        "a key id reused for another key is refused"
    );
    store
        .put_fallback_keys(&bob, "B1", vec![otk("signed_curve25519", "fb")])
        .await
        .unwrap();
    let counts = store.key_counts(&bob, "B1").await.unwrap();
    assert_eq!(counts.one_time.get("signed_curve25519"), Some(&2));
    assert_eq!(counts.unused_fallback, vec!["signed_curve25519".to_string()]);

    let claim = || KeyClaim {
        user_id: bob.clone(),
        device_id: "B1".into(),
        algorithm: "signed_curve25519".into(),
    };
    let mut handed_out = vec![];
    for _ in 0..2 {
        handed_out.push(store.claim_keys(vec![claim()]).await.unwrap().remove(0).key_id);
    }
    handed_out.sort();
    assert_eq!(handed_out, ["signed_curve25519:a", "signed_curve25519:b"], "each one-time key once");
    let fallback = store.claim_keys(vec![claim(), claim()]).await.unwrap();
    assert!(
        fallback.iter().all(|k| k.key_id == "signed_curve25519:fb") && fallback.len() == 2,
        "with none left, the fallback key is handed out (again)"
    );
    let counts = store.key_counts(&bob, "B1").await.unwrap();
    assert!(counts.one_time.is_empty() && counts.unused_fallback.is_empty(), "{counts:?}");
    store
        .put_fallback_keys(&bob, "B1", vec![otk("signed_curve25519", "fb")])
        .await
        .unwrap();
    assert!(
        store.key_counts(&bob, "B1").await.unwrap().unused_fallback.is_empty(),
        "re-uploading the used fallback key keeps it used"
    );
    store
        .put_fallback_keys(&bob, "B1", vec![otk("signed_curve25519", "fb2")])
        .await
        .unwrap();
    assert_eq!(store.key_counts(&bob, "B1").await.unwrap().unused_fallback.len(), 1);
    assert!(
        store
            .claim_keys(vec![KeyClaim {
                device_id: "B2".into(),
                ..claim()
            }])
            .await
            .unwrap()
            .is_empty(),
        "a device without keys yields nothing"
    );

    store
        .add_one_time_keys(&bob, "B1", vec![otk("signed_curve25519", "c")])
        .await
        .unwrap();
    let removed = store.delete_devices(&bob, &["B1".into()]).await.unwrap();
    assert_eq!(removed.count, 1);
    assert!(removed.list_changed_at.is_some(), "removing a device with keys changes the list");
    assert!(store.device_keys(&bob).await.unwrap().is_empty());
    assert!(
        store.key_counts(&bob, "B1").await.unwrap().one_time.is_empty(),
        "its one-time keys went too"
    );
    let removed = store.delete_devices(&bob, &["B2".into()]).await.unwrap();
    assert!(
        removed.list_changed_at.is_some(),
        "a device that published nothing is still gone from the list"
    );
    let removed = store.delete_devices(&bob, &["NEVER".into()]).await.unwrap();
    assert_eq!(removed, DevicesRemoved::default(), "deleting nothing changes nothing");
}

async fn cross_signing_and_signatures(store: &dyn Store) {
    let carol = owned_user_id!("@carol_keys:localhost");
    let key = |kind: CrossSigningKind, public: &str| CrossSigningKey {
        kind,
        public_key: public.into(),
        json: format!("{{\"pub\":\"{public}\"}}"),
    };
    let before = store.current_position();
    let pos = store
        .put_cross_signing_keys(
            &carol,
            vec![key(CrossSigningKind::Master, "M1"), key(CrossSigningKind::SelfSigning, "S1")],
        )
        .await
        .unwrap();
    assert!(pos > before);
    store
        .put_cross_signing_keys(&carol, vec![key(CrossSigningKind::Master, "M2")])
        .await
        .unwrap();
    let keys = store.cross_signing_keys(&carol).await.unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.contains(&key(CrossSigningKind::Master, "M2")), "a kind is replaced");
    assert!(keys.contains(&key(CrossSigningKind::SelfSigning, "S1")), "other kinds stay");

    let sig = |target: &str, signer_key: &str, value: &str| KeySignature {
        target_user: carol.clone(),
        target_key: target.into(),
        signer: carol.clone(),
        signer_key_id: signer_key.into(),
        signature: value.into(),
    };
    let at = store
        .put_signatures(vec![sig("DEV", "ed25519:S1", "x"), sig("M2", "ed25519:DEV", "y")])
        .await
        .unwrap();
    store.put_signatures(vec![sig("DEV", "ed25519:S1", "z")]).await.unwrap();
    let sigs = store.signatures(&carol).await.unwrap();
    assert_eq!(sigs, vec![sig("DEV", "ed25519:S1", "z"), sig("M2", "ed25519:DEV", "y")]);
    let changes = store.device_list_changes(pos, store.current_position()).await.unwrap();
    assert_eq!(changes.len(), 1, "one entry per user, at its latest change: {changes:?}");
    assert!(changes[0].1 > at);
}

async fn to_device_queue(store: &dyn Store) {
    let dan = owned_user_id!("@dan_td:localhost");
    let erin = owned_user_id!("@erin_td:localhost");
    device(store, &dan, "D").await;
    device(store, &erin, "E1").await;
    let sender = Session {
        user_id: dan.clone(),
        device_id: "D".into(),
    };
    let msg = |device: &str, n: u32| ToDeviceMessage {
        recipient: erin.clone(),
        device_id: device.into(),
        kind: "m.test".into(),
        content: format!("{{\"n\":{n}}}"),
    };
    let start = store.current_position();
    let first = store
        .queue_to_device(&sender, "m.test", "txn1", vec![msg("E1", 1), msg("GONE", 2), msg("E1", 3)])
        .await
        .unwrap();
    assert!(first.is_some());
    assert_eq!(
        store.queue_to_device(&sender, "m.test", "txn1", vec![msg("E1", 9)]).await.unwrap(),
        None,
        "a repeated transaction queues nothing"
    );
    let other_type = store.queue_to_device(&sender, "m.other", "txn1", vec![]).await.unwrap();
    assert!(other_type.is_some(), "the same id for another event type is another transaction");
    let queued = store.to_device(&erin, "E1", start, store.current_position(), 100).await.unwrap();
    let contents: Vec<&str> = queued.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, [r#"{"n":1}"#, r#"{"n":3}"#], "in order, only to devices that exist");
    assert!(queued[0].pos < queued[1].pos && queued[0].sender == dan);
    assert_eq!(
        store
            .to_device(&erin, "E1", start, store.current_position(), 1)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.delete_to_device(&erin, "E1", queued[0].pos).await.unwrap(), 1);
    let left = store.to_device(&erin, "E1", 0, store.current_position(), 100).await.unwrap();
    assert_eq!(left, queued[1..], "only acknowledged messages are deleted");
    store.delete_devices(&erin, &["E1".into()]).await.unwrap();
    assert!(
        store
            .to_device(&erin, "E1", 0, store.current_position(), 100)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn key_backups(store: &dyn Store) {
    let fay = owned_user_id!("@fay_backup:localhost");
    let room = owned_room_id!("!backup:localhost");
    assert_eq!(store.backup_version(&fay, None).await.unwrap(), None);
    let v1 = store
        .create_backup_version(&fay, "m.megolm_backup.v1.curve25519-aes-sha2", "{}")
        .await
        .unwrap();
    let v2 = store
        .create_backup_version(&fay, "m.megolm_backup.v1.curve25519-aes-sha2", r#"{"a":1}"#)
        .await
        .unwrap();
    assert!(v2 > v1);
    assert_eq!(
        store.backup_version(&fay, None).await.unwrap().unwrap().version,
        v2,
        "the newest is current"
    );
    let key = |session: &str, verified: bool, index: u64, json: &str| BackupKey {
        room_id: room.clone(),
        session_id: session.into(),
        rank: kabar_domain::e2ee::BackupKeyRank {
            is_verified: verified,
            first_message_index: index,
            forwarded_count: 0,
        },
        json: json.into(),
    };
    assert_eq!(
        store.put_backup_keys(&fay, v1, vec![key("s1", false, 0, "old")]).await.unwrap(),
        BackupWrite::WrongVersion { current: Some(v2) },
        "only the current version takes keys"
    );
    let BackupWrite::Done { etag, count } = store
        .put_backup_keys(&fay, v2, vec![key("s1", false, 5, "first"), key("s2", false, 0, "other")])
        .await
        .unwrap()
    else {
        panic!("current version refused keys");
    };
    assert_eq!(count, 2);
    let worse = store.put_backup_keys(&fay, v2, vec![key("s1", false, 9, "worse")]).await.unwrap();
    assert_eq!(
        worse,
        BackupWrite::Done { etag, count: 2 },
        "a worse key changes nothing, etag included"
    );
    let better = store.put_backup_keys(&fay, v2, vec![key("s1", true, 9, "better")]).await.unwrap();
    assert!(matches!(better, BackupWrite::Done { etag: e, count: 2 } if e != etag));
    let one = store
        .backup_keys(
            &fay,
            v2,
            BackupScope {
                room_id: Some(&room),
                session_id: Some("s1"),
            },
        )
        .await
        .unwrap();
    assert_eq!(one[0].json, "better");
    assert_eq!(
        store
            .backup_keys(
                &fay,
                v2,
                BackupScope {
                    room_id: None,
                    session_id: None
                }
            )
            .await
            .unwrap()
            .len(),
        2
    );
    assert!(store.update_backup_version(&fay, v2, r#"{"b":2}"#).await.unwrap());
    assert_eq!(store.backup_version(&fay, Some(v2)).await.unwrap().unwrap().auth_data, r#"{"b":2}"#);
    let after_delete = store
        .delete_backup_keys(
            &fay,
            v2,
            BackupScope {
                room_id: Some(&room),
                session_id: Some("s2"),
            },
        )
        .await
        .unwrap();
    assert!(matches!(after_delete, BackupWrite::Done { count: 1, .. }));
    assert!(store.delete_backup_version(&fay, v2).await.unwrap());
    assert!(!store.delete_backup_version(&fay, v2).await.unwrap());
    assert_eq!(
        store.backup_version(&fay, None).await.unwrap().unwrap().version,
        v1,
        "the previous version is current again"
    );
    let v3 = store.create_backup_version(&fay, "alg", "{}").await.unwrap();
    assert!(v3 > v2, "version numbers are never reused");
}
