//! A minimal Client-Server API client: only what the scenarios need, nothing
//! server-specific, so the same run can target any homeserver.

use std::time::Duration;

use serde_json::{Value, json};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// The request did not complete (connection refused, reset, timed out).
    #[error("transport: {0}")]
    Transport(String),
    /// The server answered with a Matrix error.
    #[error("{status} {errcode}: {message}")]
    Matrix { status: u16, errcode: String, message: String },
}

impl ApiError {
    /// The key errors are counted under in reports.
    pub fn kind(&self) -> String {
        match self {
            ApiError::Transport(m) if m.contains("timed out") => "TIMEOUT".into(),
            ApiError::Transport(_) => "TRANSPORT".into(),
            ApiError::Matrix { errcode, .. } => errcode.clone(),
        }
    }
}

/// The error and its causes on one line (reqwest's own message hides the cause).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// How to reach the server.
#[derive(Clone)]
pub struct Target {
    pub http: reqwest::Client,
    pub base: String,
    /// Other nodes of the same server (`--spread`): members of one room are
    /// spread over `base` and these, so deliveries cross nodes.
    pub others: Vec<String>,
    /// With `others`: each room's sends go through one node (room r through
    /// node r mod N), as a load balancer routing by room does; syncs stay
    /// on each member's own node.
    pub writes_by_room: bool,
    /// Follow rooms with simplified sliding sync (MSC4186) instead of `/v3/sync`.
    pub sliding: bool,
    /// Sign up without a password (Matrix makes it optional): nothing to
    /// hash, so a million accounts for a channel take minutes, not hours.
    pub passwordless: bool,
}

impl Target {
    pub fn new(base: &str) -> Self {
        Self::with_client(base, Self::builder().build().expect("http client"))
    }

    pub fn with_client(base: &str, http: reqwest::Client) -> Self {
        Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            others: vec![],
            writes_by_room: false,
            sliding: false,
            passwordless: false,
        }
    }

    /// The same server over another HTTP client (another connection pool).
    pub fn over(&self, http: reqwest::Client) -> Target {
        Self { http, ..self.clone() }
    }

    /// The same server through its `k`-th node (round `base` and `others`).
    pub fn node(&self, k: usize) -> Target {
        let n = self.others.len() + 1;
        let base = match k % n {
            0 => self.base.clone(),
            i => self.others[i - 1].trim_end_matches('/').to_owned(),
        };
        Self {
            http: self.http.clone(),
            base,
            others: self.others.clone(),
            writes_by_room: self.writes_by_room,
            sliding: self.sliding,
            passwordless: self.passwordless,
        }
    }

    pub fn builder() -> reqwest::ClientBuilder {
        // Idle connections are capped: a setup phase of thousands of sign-ups must
        // not leave thousands of sockets open on both sides (file descriptors
        // are limited, here to 20,000 a process).
        reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
    }

    /// Sends a request; returns the status and the JSON body (null if none).
    async fn call_raw(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, Value), ApiError> {
        let (status, bytes) = self.call_bytes(method, path, token, body).await?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<(u16, bytes::Bytes), ApiError> {
        let resp = req.send().await.map_err(|e| ApiError::Transport(error_chain(&e)))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| ApiError::Transport(e.to_string()))?;
        Ok((status, bytes))
    }

    /// Sends a request; returns the status and the raw body.
    async fn call_bytes(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Result<(u16, bytes::Bytes), ApiError> {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req).await
    }

    async fn call(&self, method: reqwest::Method, path: &str, token: Option<&str>, body: Option<&Value>) -> Result<Value, ApiError> {
        let (status, value) = self.call_raw(method, path, token, body).await?;
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            Err(ApiError::Matrix {
                status,
                errcode: value["errcode"].as_str().unwrap_or("NO_ERRCODE").to_owned(),
                message: value["error"].as_str().unwrap_or_default().to_owned(),
            })
        }
    }

    /// GET /_matrix/client/versions
    pub async fn versions(&self) -> Result<Value, ApiError> {
        self.call(reqwest::Method::GET, "/_matrix/client/versions", None, None).await
    }

    /// Registers through user-interactive auth with the dummy stage, as clients do:
    /// a first request to learn the flows and get a session, a second to complete it.
    pub async fn register(&self, username: &str, password: &str) -> Result<User, ApiError> {
        let path = "/_matrix/client/v3/register";
        let mut body = json!({ "username": username, "initial_device_display_name": "kabar-bench" });
        if !self.passwordless {
            body["password"] = json!(password);
        }
        let (status, challenge) = self.call_raw(reqwest::Method::POST, path, None, Some(&body)).await?;
        match status {
            200 => return User::from_login(self.clone(), &challenge),
            401 => {}
            _ => {
                return Err(ApiError::Matrix {
                    status,
                    errcode: challenge["errcode"].as_str().unwrap_or("NO_ERRCODE").to_owned(),
                    message: challenge["error"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
        body["auth"] = json!({ "type": "m.login.dummy", "session": challenge["session"] });
        let v = self.call(reqwest::Method::POST, path, None, Some(&body)).await?;
        User::from_login(self.clone(), &v)
    }
}

/// The outcome of one person's attempt to sign up, as a surge measures it.
#[derive(Debug)]
pub enum SignupOutcome {
    Registered,
    /// Refused with `M_LIMIT_EXCEEDED`: how long the refusing request took,
    /// and the `retry_after_ms` it carried (if any).
    Refused {
        answered_in_us: u64,
        retry_after_ms: Option<u64>,
    },
    Failed(ApiError),
}

impl Target {
    /// One registration attempt (challenge, then `m.login.dummy`) that reports
    /// a refusal instead of treating it as an error.
    pub async fn try_signup(&self, username: &str, password: &str) -> SignupOutcome {
        let path = "/_matrix/client/v3/register";
        let mut body = json!({ "username": username, "initial_device_display_name": "kabar-bench" });
        if !self.passwordless {
            body["password"] = json!(password);
        }
        let challenge = match self.signup_step(path, &body).await {
            Err(outcome) => return outcome,
            Ok(challenge) => challenge,
        };
        body["auth"] = json!({ "type": "m.login.dummy", "session": challenge["session"] });
        match self.signup_step(path, &body).await {
            Err(outcome) => outcome,
            Ok(_) => SignupOutcome::Failed(ApiError::Transport("registration still asks for authentication".into())),
        }
    }

    /// One registration request: the UIA challenge to answer (`Ok`), or how
    /// the attempt ended (`Err`).
    async fn signup_step(&self, path: &str, body: &Value) -> Result<Value, SignupOutcome> {
        let started = std::time::Instant::now();
        let (status, v) = self
            .call_raw(reqwest::Method::POST, path, None, Some(body))
            .await
            .map_err(SignupOutcome::Failed)?;
        match (status, v["errcode"].as_str()) {
            (200, _) => Err(SignupOutcome::Registered),
            (401, _) => Ok(v),
            (429, Some("M_LIMIT_EXCEEDED")) => Err(SignupOutcome::Refused {
                answered_in_us: started.elapsed().as_micros() as u64,
                retry_after_ms: v["retry_after_ms"].as_u64(),
            }),
            (status, errcode) => Err(SignupOutcome::Failed(ApiError::Matrix {
                status,
                errcode: errcode.unwrap_or("NO_ERRCODE").to_owned(),
                message: v["error"].as_str().unwrap_or_default().to_owned(),
            })),
        }
    }
}

/// A signed-in user.
#[derive(Clone)]
pub struct User {
    pub target: Target,
    pub user_id: String,
    pub device_id: String,
    pub token: String,
}

/// Percent-encodes a path or query component (room ids, aliases, filters).
pub fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl User {
    fn from_login(target: Target, v: &Value) -> Result<Self, ApiError> {
        let bad = || ApiError::Matrix {
            status: 200,
            errcode: "BAD_RESPONSE".into(),
            message: v.to_string(),
        };
        Ok(Self {
            target,
            user_id: v["user_id"].as_str().ok_or_else(bad)?.to_owned(),
            device_id: v["device_id"].as_str().ok_or_else(bad)?.to_owned(),
            token: v["access_token"].as_str().ok_or_else(bad)?.to_owned(),
        })
    }

    /// The same user over another connection pool (another source address).
    pub fn via(&self, target: &Target) -> Self {
        Self {
            target: target.clone(),
            ..self.clone()
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&Value>) -> Result<Value, ApiError> {
        self.target.call(method, path, Some(&self.token), body).await
    }

    /// POSTs `body` to `path` (from the server's root) as this user.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, ApiError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    /// GETs `path` (from the server's root) as this user.
    pub async fn get(&self, path: &str) -> Result<Value, ApiError> {
        self.call(reqwest::Method::GET, path, None).await
    }

    pub async fn create_room(&self, body: Value) -> Result<String, ApiError> {
        let v = self
            .call(reqwest::Method::POST, "/_matrix/client/v3/createRoom", Some(&body))
            .await?;
        Ok(v["room_id"].as_str().unwrap_or_default().to_owned())
    }

    pub async fn join(&self, room_id: &str) -> Result<(), ApiError> {
        self.call(
            reqwest::Method::POST,
            &format!("/_matrix/client/v3/join/{}", enc(room_id)),
            Some(&json!({})),
        )
        .await
        .map(|_| ())
    }

    pub async fn send_text(&self, room_id: &str, txn: &str, body: &str) -> Result<String, ApiError> {
        let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{}", enc(room_id), enc(txn));
        let v = self
            .call(reqwest::Method::PUT, &path, Some(&json!({ "msgtype": "m.text", "body": body })))
            .await?;
        Ok(v["event_id"].as_str().unwrap_or_default().to_owned())
    }

    /// PUT /sendToDevice/{type}/{txn} with one message to `user`'s `device`.
    pub async fn send_to_device(&self, kind: &str, txn: &str, user: &str, device: &str, content: Value) -> Result<(), ApiError> {
        let path = format!("/_matrix/client/v3/sendToDevice/{}/{}", enc(kind), enc(txn));
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(&json!({ "messages": { user: { device: content } } })),
        )
        .await
        .map(|_| ())
    }

    /// GET /sync; `filter` is inline JSON or the id of an uploaded filter.
    pub async fn sync(&self, since: Option<&str>, timeout_ms: u64, filter: &str) -> Result<Value, ApiError> {
        self.call(reqwest::Method::GET, &Self::sync_path(since, timeout_ms, filter), None)
            .await
    }

    /// GET /sync, reading only the timeline messages' bodies (what the
    /// delivery checks need), so the load generator spends little on each.
    pub async fn sync_messages(&self, since: &str, timeout_ms: u64, filter: &str) -> Result<SyncMessages, ApiError> {
        let path = Self::sync_path(Some(since), timeout_ms, filter);
        let (status, bytes) = self.target.call_bytes(reqwest::Method::GET, &path, Some(&self.token), None).await?;
        if (200..300).contains(&status)
            && let Ok(parsed) = serde_json::from_slice::<SyncMessages>(&bytes)
        {
            return Ok(parsed);
        }
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Err(ApiError::Matrix {
            status,
            errcode: value["errcode"].as_str().unwrap_or("BAD_RESPONSE").to_owned(),
            message: value["error"].as_str().unwrap_or_default().to_owned(),
        })
    }

    /// One simplified sliding sync (MSC4186) on connection `conn` of every room the user is in
    /// (up to 1,000, each with up to 1,000 new events), from `pos` (a new
    /// connection without), as the messages a `/v3/sync` would carry;
    /// `next_batch` is the new `pos`.
    pub async fn sliding_messages(&self, conn: &str, pos: Option<&str>, timeout_ms: u64) -> Result<SyncMessages, ApiError> {
        let mut path = format!("/_matrix/client/unstable/org.matrix.simplified_msc3575/sync?timeout={timeout_ms}");
        if let Some(p) = pos {
            path.push_str(&format!("&pos={}", enc(p)));
        }
        let body = serde_json::json!({
            "conn_id": conn,
            "lists": {"all": {"ranges": [[0, 999]], "timeline_limit": 1000, "required_state": []}}
        });
        let (status, bytes) = self
            .target
            .call_bytes(reqwest::Method::POST, &path, Some(&self.token), Some(&body))
            .await?;
        if (200..300).contains(&status)
            && let Ok(parsed) = serde_json::from_slice::<SlidingMessages>(&bytes)
        {
            let join = parsed
                .rooms
                .into_iter()
                .map(|(id, room)| {
                    (
                        id,
                        SyncJoinedRoom {
                            timeline: SyncTimeline { events: room.timeline },
                        },
                    )
                })
                .collect();
            return Ok(SyncMessages {
                next_batch: parsed.pos,
                rooms: SyncRooms { join },
                to_device: SyncTimeline::default(),
            });
        }
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Err(ApiError::Matrix {
            status,
            errcode: value["errcode"].as_str().unwrap_or("BAD_RESPONSE").to_owned(),
            message: value["error"].as_str().unwrap_or_default().to_owned(),
        })
    }

    fn sync_path(since: Option<&str>, timeout_ms: u64, filter: &str) -> String {
        let mut path = format!("/_matrix/client/v3/sync?timeout={timeout_ms}&filter={}", enc(filter));
        if let Some(s) = since {
            path.push_str(&format!("&since={}", enc(s)));
        }
        path
    }

    /// POST /user/{userId}/filter; returns the filter id.
    pub async fn upload_filter(&self, filter: &str) -> Result<String, ApiError> {
        let body: Value = serde_json::from_str(filter).map_err(|e| ApiError::Transport(format!("bad filter: {e}")))?;
        let path = format!("/_matrix/client/v3/user/{}/filter", enc(&self.user_id));
        let v = self.call(reqwest::Method::POST, &path, Some(&body)).await?;
        v["filter_id"].as_str().map(str::to_owned).ok_or_else(|| ApiError::Matrix {
            status: 200,
            errcode: "BAD_RESPONSE".into(),
            message: v.to_string(),
        })
    }
}

/// The parts of a sync response the delivery checks read; everything else is skipped.
#[derive(Debug, serde::Deserialize)]
pub struct SyncMessages {
    pub next_batch: String,
    #[serde(default)]
    pub rooms: SyncRooms,
    #[serde(default)]
    pub to_device: SyncTimeline,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct SyncRooms {
    #[serde(default)]
    pub join: std::collections::HashMap<String, SyncJoinedRoom>,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct SyncJoinedRoom {
    #[serde(default)]
    pub timeline: SyncTimeline,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct SyncTimeline {
    #[serde(default)]
    pub events: Vec<SyncEvent>,
}

#[derive(Debug, serde::Deserialize)]
pub struct SyncEvent {
    #[serde(default)]
    pub content: SyncContent,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct SyncContent {
    #[serde(default)]
    pub body: Option<String>,
}

/// The parts of a sliding-sync response the delivery checks read.
#[derive(Debug, serde::Deserialize)]
struct SlidingMessages {
    pos: String,
    #[serde(default)]
    rooms: std::collections::HashMap<String, SlidingRoom>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct SlidingRoom {
    #[serde(default)]
    timeline: Vec<SyncEvent>,
}

impl SyncMessages {
    /// The bodies of the timeline events in every joined room and of the
    /// to-device events.
    pub fn bodies(&self) -> impl Iterator<Item = &str> {
        self.rooms
            .join
            .values()
            .flat_map(|r| r.timeline.events.iter())
            .chain(&self.to_device.events)
            .filter_map(|e| e.content.body.as_deref())
    }
}
