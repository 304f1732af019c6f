//! The scenarios. Each returns a report that is both printable and JSON.

pub mod bigroom;
pub mod idle;
pub mod messages;
pub mod register;
pub mod roomlist;
pub mod surge;
pub mod todevice;
pub mod versions;

/// What every scenario report offers.
pub trait Report: serde::Serialize {
    /// A few lines for a person.
    fn human(&self) -> String;
}
