//! The errors services return, named by what a Matrix client is told.

use kabar_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("unknown or expired access token")]
    UnknownToken,
    #[error("missing access token")]
    MissingToken,
    #[error("{0}")]
    BadJson(String),
    #[error("{0}")]
    InvalidParam(String),
    #[error("too many requests")]
    LimitExceeded { retry_after_ms: u64 },
    #[error("user id already taken")]
    UserInUse,
    #[error("{0}")]
    InvalidUsername(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    RoomInUse(String),
    #[error("{0}")]
    UnsupportedRoomVersion(String),
    #[error("{0}")]
    BadState(String),
    #[error("the user is not allowed to register")]
    RegistrationDisabled,
    /// More user-interactive authentication stages are needed; the body is the
    /// UIA response (flows, session, completed, params).
    #[error("user-interactive authentication required")]
    UiaRequired(serde_json::Value),
    /// A key backup write named a version that is not the current one.
    #[error("the key backup version is not the current one")]
    WrongRoomKeysVersion { current: Option<String> },
    /// Storage (or another part the request needs) is down or behind for
    /// now; the client should retry after a moment.
    #[error("{0}")]
    Unavailable(String),
    /// A sliding-sync `pos` this server does not know (or no longer):
    /// the client starts its connection again.
    #[error("unknown or expired sliding sync position")]
    UnknownPos,
    #[error("{0}")]
    Internal(String),
}

/// What a client is told to wait before retrying an `Unavailable` request.
pub const UNAVAILABLE_RETRY_MS: u64 = 1000;

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "storage error");
        match e {
            StoreError::Conflict(m) => Error::BadState(m),
            StoreError::Unavailable(m) => Error::Unavailable(format!("storage is unavailable: {m}")),
            other => Error::Internal(other.to_string()),
        }
    }
}

impl From<kabar_domain::BuildError> for Error {
    fn from(e: kabar_domain::BuildError) -> Self {
        match e {
            kabar_domain::BuildError::TooLarge => Error::TooLarge("event is larger than 65535 bytes".into()),
            kabar_domain::BuildError::Json(m) => Error::BadJson(m),
            kabar_domain::BuildError::UnsupportedRoomVersion(v) => {
                Error::UnsupportedRoomVersion(format!("room version {v} is not supported"))
            }
            kabar_domain::BuildError::Signing(m) => Error::Internal(m),
        }
    }
}

impl From<kabar_domain::AuthError> for Error {
    fn from(e: kabar_domain::AuthError) -> Self {
        match e {
            kabar_domain::AuthError::Forbidden(m) => Error::Forbidden(m),
            kabar_domain::AuthError::BadContent(m) => Error::BadJson(m),
        }
    }
}
