//! Tokens clients hold: sync positions and pagination positions.
//!
//! **Invariant:** every persisted event, receipt and account-data change gets
//! one position in a single stream, assigned once at commit and strictly
//! increasing. A sync token is a position in that stream (plus a counter of
//! in-memory ephemeral changes such as typing), so "what is new since X" is a
//! range scan, and a gap or duplicate would be visible as a position.

use std::fmt;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid token: {0}")]
pub struct TokenError(String);

/// Where a client's sync stands: `s{stream}_{ephemeral}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncToken {
    /// Last persisted stream position the client has seen.
    pub stream: u64,
    /// Last ephemeral (typing, presence) serial the client has seen. This counter
    /// lives in memory, so after a restart a token may be ahead of it.
    pub ephemeral: u64,
}

impl fmt::Display for SyncToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s{}_{}", self.stream, self.ephemeral)
    }
}

impl std::str::FromStr for SyncToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || TokenError(s.chars().take(64).collect());
        let rest = s.strip_prefix('s').ok_or_else(bad)?;
        let (stream, eph) = rest.split_once('_').ok_or_else(bad)?;
        Ok(Self {
            stream: stream.parse().map_err(|_| bad())?,
            ephemeral: eph.parse().map_err(|_| bad())?,
        })
    }
}

/// A point between two events of a room's timeline, for `/messages`.
///
/// `t{n}` sits just after the event at stream position `n`: paginating
/// backwards from it returns positions `<= n`, forwards returns positions `> n`.
/// A sync token is accepted too and means the same point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaginationToken(pub u64);

impl fmt::Display for PaginationToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

impl std::str::FromStr for PaginationToken {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix('t') {
            return rest.parse().map(Self).map_err(|_| TokenError(s.chars().take(64).collect()));
        }
        s.parse::<SyncToken>().map(|t| Self(t.stream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_token_round_trips() {
        let t = SyncToken { stream: 42, ephemeral: 7 };
        assert_eq!(t.to_string().parse::<SyncToken>().unwrap(), t);
    }

    #[test]
    fn malformed_tokens_are_errors() {
        for s in ["", "s", "s1", "x1_2", "s-1_2", "s1_", "s99999999999999999999999_1"] {
            assert!(s.parse::<SyncToken>().is_err(), "{s}");
        }
        assert!("t".parse::<PaginationToken>().is_err());
        assert!("tx".parse::<PaginationToken>().is_err());
    }

    #[test]
    fn pagination_accepts_sync_tokens() {
        assert_eq!("s5_9".parse::<PaginationToken>().unwrap(), PaginationToken(5));
        assert_eq!("t12".parse::<PaginationToken>().unwrap(), PaginationToken(12));
    }
}
