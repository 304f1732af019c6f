//! Matrix error responses.
//!
//! **Invariant:** every error a client sees is Matrix error JSON
//! (`{"errcode": ..., "error": ...}`) with the status the spec gives that code.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use kabar_core::Error;
use serde_json::json;

/// An error on its way to the client.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    errcode: &'static str,
    message: String,
    extra: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, errcode: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            errcode,
            message: message.into(),
            extra: None,
        }
    }

    pub fn not_json(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_NOT_JSON", m)
    }

    pub fn bad_json(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_BAD_JSON", m)
    }

    pub fn invalid_param(m: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "M_INVALID_PARAM", m)
    }

    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_NOT_FOUND", m)
    }

    pub fn forbidden(m: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "M_FORBIDDEN", m)
    }

    pub fn unrecognized() -> Self {
        Self::new(StatusCode::NOT_FOUND, "M_UNRECOGNIZED", "unrecognized request")
    }

    pub fn too_large(m: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE", m)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        use StatusCode as S;
        let message = e.to_string();
        let (status, errcode) = match &e {
            Error::Forbidden(_) => (S::FORBIDDEN, "M_FORBIDDEN"),
            Error::NotFound(_) => (S::NOT_FOUND, "M_NOT_FOUND"),
            Error::UnknownToken => (S::UNAUTHORIZED, "M_UNKNOWN_TOKEN"),
            Error::MissingToken => (S::UNAUTHORIZED, "M_MISSING_TOKEN"),
            Error::BadJson(_) => (S::BAD_REQUEST, "M_BAD_JSON"),
            Error::InvalidParam(_) => (S::BAD_REQUEST, "M_INVALID_PARAM"),
            Error::WrongRoomKeysVersion { current } => {
                return Self {
                    status: S::FORBIDDEN,
                    errcode: "M_WRONG_ROOM_KEYS_VERSION",
                    message,
                    extra: Some(json!({ "current_version": current })),
                };
            }
            Error::LimitExceeded { retry_after_ms } => {
                return Self {
                    status: S::TOO_MANY_REQUESTS,
                    errcode: "M_LIMIT_EXCEEDED",
                    message,
                    extra: Some(json!({ "retry_after_ms": retry_after_ms })),
                };
            }
            Error::UserInUse => (S::BAD_REQUEST, "M_USER_IN_USE"),
            Error::InvalidUsername(_) => (S::BAD_REQUEST, "M_INVALID_USERNAME"),
            Error::TooLarge(_) => (S::PAYLOAD_TOO_LARGE, "M_TOO_LARGE"),
            Error::RoomInUse(_) => (S::BAD_REQUEST, "M_ROOM_IN_USE"),
            Error::UnsupportedRoomVersion(_) => (S::BAD_REQUEST, "M_UNSUPPORTED_ROOM_VERSION"),
            Error::BadState(_) => (S::BAD_REQUEST, "M_BAD_STATE"),
            Error::RegistrationDisabled => (S::FORBIDDEN, "M_FORBIDDEN"),
            Error::UiaRequired(body) => {
                return Self {
                    status: S::UNAUTHORIZED,
                    errcode: "",
                    message: String::new(),
                    extra: Some(body.clone()),
                };
            }
            Error::Unavailable(_) => {
                return Self {
                    status: S::SERVICE_UNAVAILABLE,
                    errcode: "M_UNKNOWN",
                    message,
                    extra: Some(json!({ "retry_after_ms": kabar_core::error::UNAVAILABLE_RETRY_MS })),
                };
            }
            Error::UnknownPos => (S::BAD_REQUEST, "M_UNKNOWN_POS"),
            Error::Internal(_) => (S::INTERNAL_SERVER_ERROR, "M_UNKNOWN"),
        };
        let message = if matches!(e, Error::Internal(_)) {
            "internal server error".to_owned()
        } else {
            message
        };
        Self {
            status,
            errcode,
            message,
            extra: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A UIA challenge is its own body (flows, session, ...), possibly with an errcode.
        // Since Matrix 1.10 a refusal also carries the HTTP Retry-After
        // header, in whole seconds rounded up.
        let retry_after_secs = self
            .extra
            .as_ref()
            .and_then(|e| e.get("retry_after_ms"))
            .and_then(serde_json::Value::as_u64)
            .map(|ms| ms.div_ceil(1000).max(1));
        let mut body = if self.errcode.is_empty() {
            json!({})
        } else {
            json!({ "errcode": self.errcode, "error": self.message })
        };
        if let Some(serde_json::Value::Object(extra)) = self.extra {
            for (k, v) in extra {
                body[k] = v;
            }
        }
        let mut response = (self.status, Json(body)).into_response();
        if let Some(secs) = retry_after_secs {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
