//! Extractors that turn HTTP into typed input, with Matrix errors on failure.

use axum::{
    extract::{ConnectInfo, FromRef, FromRequest, FromRequestParts, Request, rejection::BytesRejection},
    http::request::Parts,
};
use bytes::Bytes;
use kabar_core::{Error, accounts::Accounts};
use kabar_store::Session;
use serde::de::DeserializeOwned;
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
};

use crate::error::ApiError;

/// A JSON body. Not JSON at all is `M_NOT_JSON`; JSON of the wrong shape is
/// `M_BAD_JSON`; an empty body reads as `{}`, which some clients send for POSTs.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e: BytesRejection| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large("request body is too large")
            } else {
                ApiError::not_json(e.body_text())
            }
        })?;
        let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &bytes };
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| ApiError::not_json(format!("body is not JSON: {e}")))?;
        if !value.is_object() {
            return Err(ApiError::not_json("body must be a JSON object"));
        }
        serde_json::from_value(value)
            .map(JsonBody)
            .map_err(|e| ApiError::bad_json(e.to_string()))
    }
}

/// Path parameters, with a Matrix error for a malformed path.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathParams(p.0))
            .map_err(|e| ApiError::invalid_param(e.body_text()))
    }
}

/// Query parameters, with a Matrix error for a malformed query.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|e| ApiError::invalid_param(e.body_text()))
    }
}

/// The client's network address, for per-address admission limits. Served
/// without connection info (as in-process tests may be), every client shares
/// the unspecified address.
pub struct ClientAddr(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip()),
        ))
    }
}

/// The signed-in session behind the request's access token.
pub struct Auth(pub Session);

fn token_from(parts: &Parts) -> Option<String> {
    if let Some(h) = parts.headers.get(axum::http::header::AUTHORIZATION) {
        // HTTP authentication schemes are case-insensitive (RFC 9110 11.1).
        let (scheme, token) = h.to_str().ok()?.trim_start().split_once(' ')?;
        return scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned());
    }
    parts.uri.query()?.split('&').find_map(|kv| {
        kv.strip_prefix("access_token=")
            .map(|t| percent_encoding::percent_decode_str(t).decode_utf8_lossy().into_owned())
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Auth
where
    Arc<Accounts>: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let token = token_from(parts).ok_or(Error::MissingToken)?;
        let accounts = Arc::<Accounts>::from_ref(state);
        let session = accounts.authenticate(&token).await?;
        let ClientAddr(client) = ClientAddr::from_request_parts(parts, state).await?;
        accounts.seen(&session, client);
        Ok(Auth(session))
    }
}
