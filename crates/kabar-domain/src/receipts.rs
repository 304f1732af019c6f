//! Who is told of a member's read receipt.
//!
//! In a room everyone is told of everyone's receipts, as Matrix clients
//! expect (read markers under messages). In a big room that makes reading
//! cost the square of its size: every member's receipt goes to every
//! member online, an initial sync carries one receipt per member who ever
//! read, and no client shows thousands of read markers under one message
//! anyway. So in a broadcast channel, and in any room with more joined
//! members than [`SHARED_RECEIPTS_ROOM_LIMIT`], a member's receipts are told
//! to that member only (their other devices still follow them, and unread
//! counts and a channel's view counts still use them). Telegram, for
//! comparison, shows who read a message only in groups of up to 100.

/// Joined members above which a room's receipts are each told to their
/// author only (the size past which syncs stop listing a room's members'
/// presence too).
pub const SHARED_RECEIPTS_ROOM_LIMIT: usize = 1_000;

/// Whether every member of a room is told of every member's receipts.
pub fn receipts_shared(is_channel: bool, joined_members: usize) -> bool {
    !is_channel && joined_members <= SHARED_RECEIPTS_ROOM_LIMIT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_are_shared_in_rooms_up_to_the_limit_and_never_in_a_channel() {
        assert!(receipts_shared(false, 2), "a chat of two");
        assert!(receipts_shared(false, SHARED_RECEIPTS_ROOM_LIMIT), "a group at the limit");
        assert!(!receipts_shared(false, SHARED_RECEIPTS_ROOM_LIMIT + 1), "a supergroup past it");
        assert!(!receipts_shared(true, 2), "a channel, however small");
    }
}
