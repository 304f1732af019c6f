//! Rules for the names and identifiers clients choose: user names at
//! registration, and the text allowed in ids, types and display names.

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

/// Whether `localpart` is kept from registration: one of the `reserved`
/// names (those people trust as a server's staff), or in the `_` namespace
/// that bridges (application services) use.
pub fn is_reserved(localpart: &str, reserved: &[String]) -> bool {
    localpart.starts_with('_') || reserved.iter().any(|r| r == localpart)
}

/// Whether `s` holds a control character (NUL, newline, escape, ...), which
/// has no place in identifiers and names shown to people.
pub fn has_control_chars(s: &str) -> bool {
    s.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_names_and_the_bridge_namespace_are_kept() {
        let reserved = vec!["admin".to_owned(), "root".to_owned()];
        assert!(is_reserved("admin", &reserved));
        assert!(is_reserved("_telegram_42", &reserved));
        assert!(!is_reserved("administrator2", &reserved));
        assert!(!is_reserved("admin", &[]));
        assert!(has_control_chars("a\0b") && has_control_chars("line\n") && !has_control_chars("Ålice ✓"));
    }

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
