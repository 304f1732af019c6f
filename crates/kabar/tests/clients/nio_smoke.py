"""A smoke test with matrix-nio, which checks every response against its own
JSON schemas (that strictness is what found nulls where strings belong).

Run by crates/kabar/tests/python_clients.rs against a real server:
    python nio_smoke.py http://127.0.0.1:PORT
Exits non-zero, naming the call, on the first answer nio refuses.
"""

import asyncio
import sys

import nio


def check(what, response, expected):
    if not isinstance(response, expected):
        raise SystemExit(f"{what}: expected {expected.__name__}, got {type(response).__name__}: {response}")
    print(f"ok {what}")
    return response


async def main(url):
    alice = nio.AsyncClient(url, "nioalice")
    bob = nio.AsyncClient(url, "niobob")
    try:
        check("register alice", await alice.register("nioalice", "pw", device_name="nio alice"), nio.RegisterResponse)
        check("register bob", await bob.register("niobob", "pw"), nio.RegisterResponse)
        check("whoami", await alice.whoami(), nio.WhoamiResponse)
        check("set display name", await alice.set_displayname("Alice N"), nio.ProfileSetDisplayNameResponse)
        check("profile", await alice.get_profile(), nio.ProfileGetResponse)

        room = check(
            "create room",
            await alice.room_create(invite=[bob.user_id], is_direct=True),
            nio.RoomCreateResponse,
        ).room_id
        first = check("bob's first sync", await bob.sync(timeout=0, full_state=True), nio.SyncResponse)
        if room not in first.rooms.invite:
            raise SystemExit(f"bob was not shown the invite: {first.rooms.invite}")
        check("join", await bob.join(room), nio.JoinResponse)
        check("alice's sync", await alice.sync(timeout=0), nio.SyncResponse)
        sent = check(
            "send",
            await alice.room_send(room, "m.room.message", {"msgtype": "m.text", "body": "hello from nio"}),
            nio.RoomSendResponse,
        )
        later = check("bob's next sync", await bob.sync(timeout=3000, since=first.next_batch), nio.SyncResponse)
        bodies = [getattr(e, "body", None) for e in later.rooms.join[room].timeline.events]
        if "hello from nio" not in bodies:
            raise SystemExit(f"bob did not get the message: {bodies}")
        check("typing", await alice.room_typing(room, True, 5000), nio.RoomTypingResponse)
        check("read marker", await bob.room_read_markers(room, sent.event_id, sent.event_id), nio.RoomReadMarkersResponse)
        check("messages", await bob.room_messages(room, start=later.next_batch, limit=20), nio.RoomMessagesResponse)
        check("context", await bob.room_context(room, sent.event_id), nio.RoomContextResponse)
        check("joined members", await alice.joined_members(room), nio.JoinedMembersResponse)
        check("state", await alice.room_get_state(room), nio.RoomGetStateResponse)
        check("devices", await alice.devices(), nio.DevicesResponse)
        check("rename device", await alice.update_device(alice.device_id, {"display_name": "renamed"}), nio.UpdateDeviceResponse)
        check("presence", await alice.get_presence(bob.user_id), nio.PresenceGetResponse)
        uploaded, _ = await alice.upload(lambda *_: b"nio bytes", content_type="text/plain", filename="a.txt", filesize=9)
        check("upload", uploaded, nio.UploadResponse)
        got = check("download", await alice.download(mxc=uploaded.content_uri), nio.DownloadResponse)
        if got.body != b"nio bytes":
            raise SystemExit(f"download gave {got.body!r}")
        check("redact", await alice.room_redact(room, sent.event_id, reason="test"), nio.RoomRedactResponse)
        check("leave", await bob.room_leave(room), nio.RoomLeaveResponse)
        check("bob's sync after leaving", await bob.sync(timeout=0, since=later.next_batch), nio.SyncResponse)
        check("logout", await bob.logout(), nio.LogoutResponse)
    finally:
        await alice.close()
        await bob.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
