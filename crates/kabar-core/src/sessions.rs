//! The access-token cache: which session a token hash belongs to, so that
//! most requests authenticate without a store read.
//!
//! Entries are dropped only by the applier, when the stream says a user's
//! sessions changed (a device signed in again, was removed, or the user was
//! deactivated) — whichever process made the change.

use std::{collections::HashMap, sync::Mutex};

use kabar_store::Session;
use ruma::{OwnedUserId, UserId};

/// Past this many cached tokens the cache starts over.
const MAX_CACHED_TOKENS: usize = 200_000;

#[derive(Default)]
struct Inner {
    by_hash: HashMap<String, Session>,
    /// The cached token hashes of each user, to drop them together.
    by_user: HashMap<OwnedUserId, Vec<String>>,
    /// Moves on every forget: a store read that started before a forget may
    /// have seen the token before it was revoked, and must not be cached.
    epoch: u64,
}

#[derive(Default)]
pub struct SessionCache {
    inner: Mutex<Inner>,
}

impl SessionCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, token_hash: &str) -> Option<Session> {
        self.inner.lock().expect("session cache lock").by_hash.get(token_hash).cloned()
    }

    /// Where the cache stands; take it before reading a session from the store.
    pub fn epoch(&self) -> u64 {
        self.inner.lock().expect("session cache lock").epoch
    }

    /// Remembers a session read from the store, unless sessions were
    /// forgotten since `epoch` was taken (the read may be from before).
    pub fn insert(&self, epoch: u64, token_hash: String, session: Session) {
        let mut inner = self.inner.lock().expect("session cache lock");
        if inner.epoch != epoch {
            return;
        }
        if inner.by_hash.len() >= MAX_CACHED_TOKENS {
            inner.by_hash.clear();
            inner.by_user.clear();
        }
        inner.by_user.entry(session.user_id.clone()).or_default().push(token_hash.clone());
        inner.by_hash.insert(token_hash, session);
    }

    /// Forgets every cached token of the user (called by the applier).
    pub(crate) fn forget_user(&self, user: &UserId) {
        let mut inner = self.inner.lock().expect("session cache lock");
        inner.epoch += 1;
        if let Some(hashes) = inner.by_user.remove(user) {
            for h in hashes {
                inner.by_hash.remove(&h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgetting_a_user_drops_only_their_tokens() {
        let cache = SessionCache::new();
        let session = |u: &str| Session {
            user_id: OwnedUserId::try_from(u).unwrap(),
            device_id: "D".into(),
        };
        let epoch = cache.epoch();
        cache.insert(epoch, "a1".into(), session("@a:x"));
        cache.insert(epoch, "a2".into(), session("@a:x"));
        cache.insert(epoch, "b1".into(), session("@b:x"));
        cache.forget_user(ruma::user_id!("@a:x"));
        assert!(cache.get("a1").is_none() && cache.get("a2").is_none());
        assert_eq!(cache.get("b1"), Some(session("@b:x")));
    }

    #[test]
    fn a_read_from_before_a_forget_is_not_cached() {
        let cache = SessionCache::new();
        let before = cache.epoch();
        cache.forget_user(ruma::user_id!("@a:x"));
        let session = Session {
            user_id: ruma::owned_user_id!("@a:x"),
            device_id: "D".into(),
        };
        cache.insert(before, "a1".into(), session);
        assert!(cache.get("a1").is_none(), "the token may have been revoked after the read");
    }
}
