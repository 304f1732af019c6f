//! Rules for user names chosen at registration.

/// Whether `localpart` may be registered: the characters the spec allows for
/// new user ids (`a-z`, `0-9`, `.`, `_`, `=`, `-`, `/`, `+`), not empty, and a
/// full user id on `server_name` no longer than 255 bytes.
pub fn is_valid_new_localpart(localpart: &str, server_name: &str) -> bool {
    !localpart.is_empty()
        && localpart.len() + server_name.len() + 2 <= 255
        && localpart
            .bytes()
            .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_spec_characters_and_refuses_others() {
        assert!(is_valid_new_localpart("alice.b_c=d-e/f+g9", "localhost"));
        assert!(!is_valid_new_localpart("", "localhost"));
        assert!(!is_valid_new_localpart("Alice", "localhost"));
        assert!(!is_valid_new_localpart("al ice", "localhost"));
        assert!(!is_valid_new_localpart("al:ice", "localhost"));
        assert!(!is_valid_new_localpart(&"a".repeat(250), "localhost"));
    }
}
