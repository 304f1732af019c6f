//! Media upload, download and thumbnails, authenticated (v1) and legacy (v3).

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use futures::StreamExt;
use kabar_core::media::{Media, MediaPath, ThumbnailMethod};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    ServerInfo,
    error::{ApiError, ApiResult},
    extract::{Auth, ClientAddr, PathParams, QueryParams},
};

#[derive(Deserialize)]
pub struct UploadQuery {
    filename: Option<String>,
}

/// POST /_matrix/media/v3/upload
pub async fn upload_route(
    State(media): State<Arc<Media>>,
    State(info): State<Arc<ServerInfo>>,
    Auth(s): Auth,
    QueryParams(q): QueryParams<UploadQuery>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> ApiResult<Json<Value>> {
    let body = body.map_err(|_| ApiError::too_large(format!("uploads are limited to {} bytes", media.max_upload_bytes())))?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let id = media.upload(&s.user_id, content_type, q.filename, body.to_vec()).await?;
    Ok(Json(json!({ "content_uri": format!("mxc://{}/{id}", info.server_name) })))
}

/// GET /_matrix/media/v3/config and /_matrix/client/v1/media/config
pub async fn config_route(State(media): State<Arc<Media>>, Auth(_): Auth) -> Json<Value> {
    Json(json!({ "m.upload.size": media.max_upload_bytes() }))
}

fn check_server(info: &ServerInfo, server: &str) -> ApiResult<()> {
    if server != info.server_name {
        return Err(ApiError::not_found("remote media is not available: this server does not federate"));
    }
    Ok(())
}

fn safe_filename(name: &str) -> String {
    name.chars().filter(|c| !c.is_control() && *c != '"' && *c != '\\').collect()
}

/// One download, as its path asks: the file is streamed from disk with a
/// small buffer (never read whole into memory), holding one of the client
/// address's download slots until the last byte is sent.
async fn download(media: &Media, info: &ServerInfo, at: MediaFile<'_>, path: MediaPath, client: std::net::IpAddr) -> ApiResult<Response> {
    let MediaFile { server, id, filename } = at;
    check_server(info, server)?;
    let d = media.download(id, path, client).await?;
    let content_type = d.record.content_type.clone().unwrap_or_else(|| "application/octet-stream".into());
    let name = filename.or(d.record.filename.clone());
    // Only types that cannot run script are shown inline; everything else downloads.
    let inline = [
        "image/jpeg",
        "image/png",
        "image/gif",
        "image/webp",
        "video/mp4",
        "audio/ogg",
        "audio/mpeg",
        "text/plain",
    ]
    .contains(&content_type.as_str());
    let disposition = match (inline, name) {
        (true, Some(n)) => format!("inline; filename=\"{}\"", safe_filename(&n)),
        (true, None) => "inline".into(),
        (false, Some(n)) => format!("attachment; filename=\"{}\"", safe_filename(&n)),
        (false, None) => "attachment".into(),
    };
    let size = d.record.size;
    let slot = d.slot;
    let body = tokio_util::io::ReaderStream::new(d.body).map(move |chunk| {
        let _held = &slot;
        chunk
    });
    let mut resp = axum::body::Body::from_stream(body).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, size.into());
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type).unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    if let Ok(v) = HeaderValue::from_str(&disposition) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(
        "Content-Security-Policy",
        HeaderValue::from_static(
            "sandbox; default-src 'none'; script-src 'none'; plugin-types application/pdf; style-src 'unsafe-inline'; object-src 'self';",
        ),
    );
    h.insert("Cross-Origin-Resource-Policy", HeaderValue::from_static("cross-origin"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=86400, immutable"));
    Ok(resp)
}

/// Which file a download path names.
struct MediaFile<'a> {
    server: &'a str,
    id: &'a str,
    filename: Option<String>,
}

/// GET /_matrix/client/v1/media/download/{serverName}/{mediaId}
pub async fn download_authed_route(
    State(media): State<Arc<Media>>,
    State(info): State<Arc<ServerInfo>>,
    ClientAddr(client): ClientAddr,
    Auth(_): Auth,
    PathParams((server, id)): PathParams<(String, String)>,
) -> ApiResult<Response> {
    let at = MediaFile {
        server: &server,
        id: &id,
        filename: None,
    };
    download(&media, &info, at, MediaPath::Authenticated, client).await
}

/// GET /_matrix/client/v1/media/download/{serverName}/{mediaId}/{fileName}
pub async fn download_authed_named_route(
    State(media): State<Arc<Media>>,
    State(info): State<Arc<ServerInfo>>,
    ClientAddr(client): ClientAddr,
    Auth(_): Auth,
    PathParams((server, id, name)): PathParams<(String, String, String)>,
) -> ApiResult<Response> {
    let at = MediaFile {
        server: &server,
        id: &id,
        filename: Some(name),
    };
    download(&media, &info, at, MediaPath::Authenticated, client).await
}

/// GET /_matrix/media/v3/download/{serverName}/{mediaId}
pub async fn download_legacy_route(
    State(media): State<Arc<Media>>,
    State(info): State<Arc<ServerInfo>>,
    ClientAddr(client): ClientAddr,
    PathParams((server, id)): PathParams<(String, String)>,
) -> ApiResult<Response> {
    let at = MediaFile {
        server: &server,
        id: &id,
        filename: None,
    };
    download(&media, &info, at, MediaPath::Legacy, client).await
}

/// GET /_matrix/media/v3/download/{serverName}/{mediaId}/{fileName}
pub async fn download_legacy_named_route(
    State(media): State<Arc<Media>>,
    State(info): State<Arc<ServerInfo>>,
    ClientAddr(client): ClientAddr,
    PathParams((server, id, name)): PathParams<(String, String, String)>,
) -> ApiResult<Response> {
    let at = MediaFile {
        server: &server,
        id: &id,
        filename: Some(name),
    };
    download(&media, &info, at, MediaPath::Legacy, client).await
}

#[derive(Deserialize)]
pub struct ThumbnailQuery {
    width: u32,
    height: u32,
    method: Option<String>,
}

async fn thumbnail(
    media: &Media,
    info: &ServerInfo,
    (server, id): (&str, &str),
    path: MediaPath,
    q: ThumbnailQuery,
) -> ApiResult<Response> {
    check_server(info, server)?;
    let method = match q.method.as_deref() {
        None | Some("scale") => ThumbnailMethod::Scale,
        Some("crop") => ThumbnailMethod::Crop,
        Some(_) => return Err(ApiError::invalid_param("method must be crop or scale")),
    };
    let (content_type, bytes) = media.thumbnail(id, path, (q.width, q.height), method).await?;
    let mut resp = bytes.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type).unwrap_or(HeaderValue::from_static("image/png")),
    );
    Ok(resp)
}

/// GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}
pub async fn thumbnail_authed_route(
    State(media): State<Arc<Media>>,
    State(info): State<Arc<ServerInfo>>,
    Auth(_): Auth,
    PathParams((server, id)): PathParams<(String, String)>,
    QueryParams(q): QueryParams<ThumbnailQuery>,
) -> ApiResult<Response> {
    thumbnail(&media, &info, (&server, &id), MediaPath::Authenticated, q).await
}

/// GET /_matrix/media/v3/thumbnail/{serverName}/{mediaId}
pub async fn thumbnail_legacy_route(
    State(media): State<Arc<Media>>,
    State(info): State<Arc<ServerInfo>>,
    PathParams((server, id)): PathParams<(String, String)>,
    QueryParams(q): QueryParams<ThumbnailQuery>,
) -> ApiResult<Response> {
    thumbnail(&media, &info, (&server, &id), MediaPath::Legacy, q).await
}
