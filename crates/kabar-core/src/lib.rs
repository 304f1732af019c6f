//! Kabar's services and its sync engine.
//!
//! Each service gets what it uses through its constructor (a store handle,
//! the notifier, another service) and nothing else; there is no global state.
//! The HTTP layer calls these; they call the storage interface and the pure
//! rules in `kabar-domain`.

pub mod accounts;
pub mod admission;
pub mod applier;
pub mod changes;
pub mod ephemeral;
pub mod error;
pub mod filter;
pub mod health;
pub mod key_backup;
pub mod keys;
pub mod load;
pub mod media;
pub mod notifier;
pub mod password;
pub mod push;
pub mod room_cache;
pub mod rooms;
pub mod sessions;
pub mod sync;
pub mod to_device;
pub mod uia;
pub mod user_data;
pub mod views;
pub mod voip;

pub use error::{Error, Result};

/// Milliseconds since the Unix epoch, as stored.
pub fn now_ms() -> u64 {
    ruma::MilliSecondsSinceUnixEpoch::now().get().into()
}
