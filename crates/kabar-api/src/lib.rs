//! The Matrix Client-Server HTTP API.
//!
//! **API boundary:** this crate translates HTTP into service calls and service
//! results into HTTP; it holds no Matrix rules of its own. Handlers are named
//! `<endpoint>_route` and their doc comment starts with the method and path.
//! All edge concerns (body limits, CORS, panics, tracing, unknown endpoints)
//! are set up in [`router`].

mod account;
mod e2ee;
pub mod error;
mod extract;
mod media;
pub mod ops;
mod rooms;
mod sync;

use std::{
    any::Any,
    sync::{Arc, RwLock},
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, FromRef},
    http::{Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use kabar_core::{
    accounts::Accounts, ephemeral::Ephemeral, health::Readiness, key_backup::KeyBackups, keys::Keys, media::Media, rooms::Rooms,
    sync::SyncEngine, to_device::ToDevice, user_data::UserData, views::ViewCounts,
};
use tower_http::{catch_panic::CatchPanicLayer, cors::CorsLayer};

pub use error::ApiError;
pub use ops::ApiMetrics;

/// Facts about this server that handlers report to clients.
#[derive(Debug)]
pub struct ServerInfo {
    pub server_name: String,
    /// The URL clients should use, for `/.well-known/matrix/client`; a
    /// configuration reload may change it.
    public_base_url: RwLock<String>,
    /// Random per process, reported by `/health`: tells a probe whether the
    /// server behind a URL is this one.
    pub instance: String,
    /// The TURN server handed to callers (`/voip/turnServer`).
    pub turn: kabar_core::voip::TurnConfig,
}

impl ServerInfo {
    pub fn new(server_name: String, public_base_url: String, instance: String) -> Self {
        Self {
            server_name,
            public_base_url: RwLock::new(public_base_url),
            instance,
            turn: kabar_core::voip::TurnConfig::default(),
        }
    }

    /// The same, handing out credentials for this TURN server.
    pub fn with_turn(self, turn: kabar_core::voip::TurnConfig) -> Self {
        Self { turn, ..self }
    }

    pub fn public_base_url(&self) -> String {
        self.public_base_url.read().expect("server info").clone()
    }

    pub fn set_public_base_url(&self, url: String) {
        *self.public_base_url.write().expect("server info") = url;
    }
}

/// What the router hands to handlers. Each handler extracts only the services
/// it uses (axum's `FromRef`), so its signature shows its dependencies.
pub struct Services {
    pub accounts: Arc<Accounts>,
    pub rooms: Arc<Rooms>,
    pub sync: Arc<SyncEngine>,
    pub views: Arc<ViewCounts>,
    pub ephemeral: Arc<Ephemeral>,
    pub user_data: Arc<UserData>,
    pub keys: Arc<Keys>,
    pub to_device: Arc<ToDevice>,
    pub key_backups: Arc<KeyBackups>,
    pub media: Arc<Media>,
    pub info: Arc<ServerInfo>,
    pub readiness: Arc<Readiness>,
    pub metrics: Arc<ApiMetrics>,
}

/// The router's state: the services behind one `Arc`, because axum clones
/// the state for every request (one reference count, not one per service).
#[derive(Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

/// `State<Arc<Service>>` extraction for each service.
macro_rules! services_from_state {
    ($($field:ident: $service:ty),* $(,)?) => {
        $(impl FromRef<AppState> for Arc<$service> {
            fn from_ref(state: &AppState) -> Self {
                state.0.$field.clone()
            }
        })*
    };
}

services_from_state!(
    accounts: Accounts,
    rooms: Rooms,
    sync: SyncEngine,
    views: ViewCounts,
    ephemeral: Ephemeral,
    user_data: UserData,
    keys: Keys,
    to_device: ToDevice,
    key_backups: KeyBackups,
    media: Media,
    info: ServerInfo,
    readiness: Readiness,
    metrics: ApiMetrics,
);

/// Limits applied at the edge.
#[derive(Debug, Clone, Copy)]
pub struct EdgeLimits {
    /// Largest request body of any kind, refused from its declared length
    /// before it is read.
    pub max_request_body: usize,
    /// Largest JSON request body.
    pub max_json_body: usize,
    /// Largest media upload.
    pub max_upload: usize,
}

fn client_routes() -> Router<AppState> {
    use account::*;
    use e2ee::*;
    use rooms::*;
    use sync::*;
    Router::new()
        .route("/capabilities", get(capabilities_route))
        .route("/login", get(login_types_route).post(login_route))
        .route("/register", post(register_route))
        .route("/register/available", get(register_available_route))
        .route(
            "/register/m.login.registration_token/validity",
            get(registration_token_validity_route),
        )
        .route("/account/3pid", get(threepids_route))
        .route("/thirdparty/protocols", get(thirdparty_protocols_route))
        .route("/voip/turnServer", get(turn_server_route))
        .route("/logout", post(logout_route))
        .route("/logout/all", post(logout_all_route))
        .route("/account/whoami", get(whoami_route))
        .route("/account/password", post(password_route))
        .route("/account/deactivate", post(deactivate_route))
        .route("/devices", get(devices_route))
        .route(
            "/devices/{device_id}",
            get(device_route).put(rename_device_route).delete(delete_device_route),
        )
        .route("/delete_devices", post(delete_devices_route))
        .route("/profile/{user_id}", get(profile_route))
        .route("/profile/{user_id}/{field}", get(profile_field_route).put(set_profile_field_route))
        .route("/user_directory/search", post(user_search_route))
        .route("/createRoom", post(create_room_route))
        .route("/join/{room}", post(join_route))
        .route("/joined_rooms", get(joined_rooms_route))
        .route("/rooms/{room}/join", post(join_by_id_route))
        .route("/rooms/{room}/leave", post(leave_route))
        .route("/rooms/{room}/forget", post(forget_route))
        .route("/rooms/{room}/invite", post(invite_route))
        .route("/rooms/{room}/kick", post(kick_route))
        .route("/rooms/{room}/ban", post(ban_route))
        .route("/rooms/{room}/unban", post(unban_route))
        .route("/rooms/{room}/send/{kind}/{txn}", put(send_route))
        .route("/rooms/{room}/state", get(state_route))
        .route(
            "/rooms/{room}/state/{kind}",
            get(get_state_empty_key_route).put(put_state_empty_key_route),
        )
        .route(
            "/rooms/{room}/state/{kind}/",
            get(get_state_empty_key_route).put(put_state_empty_key_route),
        )
        .route("/rooms/{room}/state/{kind}/{key}", get(get_state_route).put(put_state_route))
        .route("/rooms/{room}/redact/{event}/{txn}", put(redact_route))
        .route("/rooms/{room}/event/{event}", get(event_route))
        .route("/rooms/{room}/context/{event}", get(context_route))
        .route("/rooms/{room}/messages", get(messages_route))
        .route("/rooms/{room}/members", get(members_route))
        .route("/rooms/{room}/joined_members", get(joined_members_route))
        .route("/rooms/{room}/relations/{event}", get(relations_route))
        .route("/rooms/{room}/relations/{event}/{rel}", get(relations_type_route))
        .route("/rooms/{room}/relations/{event}/{rel}/{kind}", get(relations_type_event_route))
        .route("/rooms/{room}/threads", get(threads_route))
        .route("/rooms/{room}/aliases", get(room_aliases_route))
        .route("/rooms/{room}/typing/{user}", put(typing_route))
        .route("/rooms/{room}/receipt/{kind}/{event}", post(receipt_route))
        .route("/rooms/{room}/read_markers", post(read_markers_route))
        .route(
            "/directory/room/{alias}",
            get(get_alias_route).put(put_alias_route).delete(delete_alias_route),
        )
        .route("/directory/list/room/{room}", get(get_visibility_route).put(set_visibility_route))
        .route("/publicRooms", get(public_rooms_get_route).post(public_rooms_post_route))
        .route("/sync", get(sync_route))
        .route("/user/{user}/filter", post(create_filter_route))
        .route("/user/{user}/filter/{id}", get(get_filter_route))
        .route("/presence/{user}/status", get(get_presence_route).put(set_presence_route))
        .route(
            "/user/{user}/account_data/{kind}",
            get(get_account_data_route).put(put_account_data_route),
        )
        .route(
            "/user/{user}/rooms/{room}/account_data/{kind}",
            get(get_room_account_data_route).put(put_room_account_data_route),
        )
        .route("/user/{user}/rooms/{room}/tags", get(get_tags_route))
        .route("/user/{user}/rooms/{room}/tags/{tag}", put(put_tag_route).delete(delete_tag_route))
        .route("/pushrules/", get(push_rules_route))
        .route("/pushrules", get(push_rules_route))
        .route("/pushrules/global/", get(push_rules_global_route))
        .route(
            "/pushrules/{scope}/{kind}/{id}",
            get(get_push_rule_route).put(put_push_rule_route).delete(delete_push_rule_route),
        )
        .route(
            "/pushrules/{scope}/{kind}/{id}/enabled",
            get(get_push_rule_enabled_route).put(push_rule_enabled_route),
        )
        .route(
            "/pushrules/{scope}/{kind}/{id}/actions",
            get(get_push_rule_actions_route).put(push_rule_actions_route),
        )
        .route("/pushers", get(pushers_route))
        .route("/pushers/set", post(set_pusher_route))
        .route("/keys/upload", post(upload_keys_route))
        .route("/keys/query", post(query_keys_route))
        .route("/keys/claim", post(claim_keys_route))
        .route("/keys/changes", get(key_changes_route))
        .route("/keys/device_signing/upload", post(upload_cross_signing_route))
        .route("/keys/signatures/upload", post(upload_signatures_route))
        .route("/sendToDevice/{kind}/{txn}", put(send_to_device_route))
        .route("/room_keys/version", get(current_backup_route).post(create_backup_route))
        .route(
            "/room_keys/version/{version}",
            get(backup_route).put(update_backup_route).delete(delete_backup_route),
        )
        .route(
            "/room_keys/keys",
            get(get_room_keys_route).put(put_room_keys_route).delete(delete_room_keys_route),
        )
        .route(
            "/room_keys/keys/{room}",
            get(get_room_keys_route).put(put_room_keys_route).delete(delete_room_keys_route),
        )
        .route(
            "/room_keys/keys/{room}/{session}",
            get(get_room_keys_route).put(put_room_keys_route).delete(delete_room_keys_route),
        )
}

fn legacy_media_routes(limits: EdgeLimits) -> Router<AppState> {
    use media::*;
    Router::new()
        .route("/upload", post(upload_route).layer(DefaultBodyLimit::max(limits.max_upload)))
        .route("/config", get(config_route))
        .route("/download/{server}/{id}", get(download_legacy_route))
        .route("/download/{server}/{id}/{name}", get(download_legacy_named_route))
        .route("/thumbnail/{server}/{id}", get(thumbnail_legacy_route))
}

fn authed_media_routes() -> Router<AppState> {
    use media::*;
    Router::new()
        .route("/config", get(config_route))
        .route("/download/{server}/{id}", get(download_authed_route))
        .route("/download/{server}/{id}/{name}", get(download_authed_named_route))
        .route("/thumbnail/{server}/{id}", get(thumbnail_authed_route))
}

async fn unrecognized() -> ApiError {
    ApiError::unrecognized()
}

fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "M_UNKNOWN", "internal server error").into_response()
}

/// Builds the whole HTTP surface.
pub fn router(state: AppState, limits: EdgeLimits) -> Router {
    let client = client_routes();
    let cors = CorsLayer::new()
        .allow_origin(tower_http::cors::Any)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::HeaderName::from_static("x-requested-with"),
        ]);
    let edge = Arc::new(ops::Edge::new(
        state.0.metrics.clone(),
        limits.max_request_body,
        &state.0.info.instance,
    ));
    Router::new()
        .route("/health", get(ops::health_route))
        .route("/ready", get(ops::ready_route))
        .route("/_matrix/client/versions", get(account::versions_route))
        .route("/.well-known/matrix/client", get(account::well_known_route))
        .route(
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
            post(sync::sliding_sync_route),
        )
        .route(
            "/_matrix/client/unstable/kabar/rooms/{room}/views/{event}",
            get(rooms::post_views_route),
        )
        .route(
            "/_matrix/client/unstable/kabar/rooms/{room}/members",
            get(rooms::members_page_route),
        )
        .nest("/_matrix/client/v3", client.clone())
        .nest("/_matrix/client/r0", client.clone())
        .nest("/_matrix/client/v1", client.nest("/media", authed_media_routes()))
        .nest("/_matrix/media/v3", legacy_media_routes(limits))
        .nest("/_matrix/media/r0", legacy_media_routes(limits))
        .route(
            "/_matrix/client/v1/media/upload",
            post(media::upload_route).layer(DefaultBodyLimit::max(limits.max_upload)),
        )
        .fallback(unrecognized)
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "M_UNRECOGNIZED",
                "method not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(limits.max_json_body))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(axum::middleware::from_fn_with_state(edge, ops::edge))
        .layer(cors)
        .with_state(state)
}
