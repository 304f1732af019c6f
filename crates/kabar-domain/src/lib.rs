//! Pure Matrix domain rules for Kabar.
//!
//! **Architecture invariant:** this crate does no I/O. It builds and signs events,
//! decides whether an event is authorized against a given room state, and encodes
//! the tokens clients hold. Everything here is plain synchronous code that unit
//! tests call without a server or a database.

pub mod auth;
pub mod channel;
pub mod client_event;
pub mod e2ee;
pub mod event;
pub mod membership;
pub mod names;
pub mod receipts;
pub mod tokens;

pub use auth::{AuthError, auth_event_keys, authorize};
pub use event::{BuildError, EventSigner, NewEvent, Pdu, StateKey};
pub use tokens::{PaginationToken, SyncToken, TokenError};
