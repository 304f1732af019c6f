//! Test harness: runs the real `kabar` binary on a free port with a temporary
//! data directory, and builds clients against it.

#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use matrix_sdk::{
    Client,
    ruma::api::client::{account::register, uiaa},
};

/// Configuration every test server gets unless its test says otherwise: the
/// tests sign up many users from one address, so the per-address limits are
/// off (the admission tests set their own).
pub const HARNESS_CONFIG: &str = "[admission.register]\nper_address_per_minute = 0\n\n[admission.login]\nper_address_per_minute = 0\n";

/// The engine the tests run on: the embedded store, or PostgreSQL when
/// `KABAR_TEST_STORAGE=postgres` (the README's test command runs the suite
/// both ways).
pub fn on_postgres() -> bool {
    std::env::var("KABAR_TEST_STORAGE").as_deref() == Ok("postgres")
}

/// The `[storage]` section a test server gets: none for the embedded store;
/// on PostgreSQL, a database of the process's shared test cluster named
/// after the data directory (so a restart on the same directory finds its
/// data again).
pub fn storage_toml(data_dir: &Path) -> String {
    if !on_postgres() {
        return String::new();
    }
    let cluster = kabar_store_postgres::test_cluster::TestCluster::shared().expect("start the test PostgreSQL cluster");
    let url = cluster.ensure_database(&database_name(data_dir)).expect("create a test database");
    format!("\n{}", postgres_storage(&url))
}

/// A `[storage]` section for the PostgreSQL database at `url`, with the
/// small pool every test server gets (many run at once on one cluster).
pub fn postgres_storage(url: &str) -> String {
    format!("[storage]\nengine = \"postgres\"\n\n[storage.postgres]\nurl = \"{url}\"\npool_size = 4\n")
}

/// Writes `dir/kabar.toml`: listening on a free port, data in `dir/data`,
/// [`HARNESS_CONFIG`], and `storage` (a `[storage]` section, or nothing).
pub fn config_in(dir: &Path, storage: &str) -> PathBuf {
    let path = dir.join("kabar.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{HARNESS_CONFIG}\n{storage}",
            dir.join("data").display()
        ),
    )
    .expect("write config");
    path
}

/// The name of the test database of a data directory (see [`storage_toml`]).
fn database_name(data_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut h);
    format!("kabar_{:016x}", h.finish())
}

/// Everything the server stored, as bytes: the SQLite files in its data
/// directory, or a dump of its PostgreSQL database.
pub fn stored_bytes(server: &Server) -> Vec<u8> {
    if on_postgres() {
        let cluster = kabar_store_postgres::test_cluster::TestCluster::shared().expect("test cluster");
        return cluster.dump(&database_name(server.data_dir())).expect("pg_dump");
    }
    let mut bytes = vec![];
    for entry in std::fs::read_dir(server.data_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().contains(".db") {
            bytes.extend(std::fs::read(path).unwrap());
        }
    }
    bytes
}

/// Adds the test storage section to a configuration file that has none.
fn add_storage(config: &Path, data_dir: &Path) {
    let text = std::fs::read_to_string(config).unwrap_or_default();
    if !text.contains("[storage") {
        std::fs::write(config, format!("{text}\n{}", storage_toml(data_dir))).expect("write config");
    }
}

pub struct Server {
    child: Child,
    pub url: String,
    /// The Prometheus listener's `/metrics` URL, when `metrics_listen` is set.
    pub metrics_url: Option<String>,
    data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server with a fresh data directory.
    pub fn start() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_owned();
        let mut s = Self::start_in(&dir, &[]);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server with extra config lines (TOML) and a fresh data
    /// directory. [`HARNESS_CONFIG`] is added unless the lines set admission limits.
    pub fn start_with_config(toml: &str) -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = tmp.path().join("kabar.toml");
        let toml = if toml.contains("[admission") {
            toml.to_owned()
        } else {
            format!("{toml}\n{HARNESS_CONFIG}")
        };
        std::fs::write(&config, toml).expect("write config");
        let dir = tmp.path().join("data");
        add_storage(&config, &dir);
        let mut s = Self::start_in(&dir, &["--config".into(), config.to_string_lossy().into_owned()]);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on an existing data directory (for restarts), with
    /// [`HARNESS_CONFIG`] unless `extra` names a configuration file.
    pub fn start_in(dir: &Path, extra: &[String]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kabar"));
        cmd.arg("serve");
        match extra.iter().position(|a| a == "--config") {
            None => {
                std::fs::create_dir_all(dir).expect("data directory");
                let config = dir.join("harness.toml");
                std::fs::write(&config, format!("{HARNESS_CONFIG}{}", storage_toml(dir))).expect("write config");
                cmd.arg("--config").arg(config);
            }
            Some(i) => {
                if let Some(config) = extra.get(i + 1) {
                    add_storage(Path::new(config), dir);
                }
            }
        }
        if !extra.iter().any(|a| a == "--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("RUST_LOG", std::env::var("KABAR_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .stderr(Stdio::inherit());
        Self::spawn(cmd, dir)
    }

    /// Starts a server from `config` alone (no command-line overrides), so
    /// the file decides everything a reload may change; `data_dir` must be
    /// the one the file names. With `logs`, its log goes to that file, at
    /// the level the file's `log` sets.
    pub fn start_from_file(config: &Path, data_dir: &Path, logs: Option<&Path>) -> Self {
        add_storage(config, data_dir);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kabar"));
        cmd.arg("serve").arg("--config").arg(config);
        match logs {
            Some(path) => {
                cmd.env_remove("RUST_LOG").stderr(std::fs::File::create(path).expect("log file"));
            }
            None => {
                cmd.env("RUST_LOG", std::env::var("KABAR_TEST_LOG").unwrap_or_else(|_| "warn".into()))
                    .stderr(Stdio::inherit());
            }
        }
        Self::spawn(cmd, data_dir)
    }

    fn spawn(mut cmd: Command, dir: &Path) -> Self {
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn kabar");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut metrics_url = None;
        let url = loop {
            let line = lines.next().expect("kabar exited before listening").expect("read stdout");
            if let Some(addr) = line.strip_prefix("kabar listening on ") {
                break addr.trim().to_owned();
            }
            if let Some(addr) = line.strip_prefix("kabar metrics on ") {
                metrics_url = Some(addr.trim().to_owned());
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self {
            child,
            url,
            metrics_url,
            data_dir: dir.to_owned(),
            _tmp: None,
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The configuration file the harness wrote for this server (it names
    /// the storage engine, for commands run beside the server).
    pub fn config_file(&self) -> PathBuf {
        let harness = self.data_dir.join("harness.toml");
        if harness.exists() {
            return harness;
        }
        self.data_dir.parent().map(|p| p.join("kabar.toml")).unwrap_or(harness)
    }

    /// Runs `kabar admin --data-dir <this server's> args...`.
    pub fn admin(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_kabar"))
            .arg("admin")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .output()
            .expect("run kabar admin")
    }

    /// `kabar admin` with a JSON answer, which must succeed.
    pub fn admin_json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.admin(args);
        assert!(
            out.status.success(),
            "kabar admin {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("admin JSON")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`HUP`, `TERM`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name}");
    }

    /// Waits up to `limit` for the process to end; its exit status if it did.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server the hard way (SIGKILL), as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Hands the temporary directory to a later server.
    pub fn take_tmp(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn client(url: &str) -> Client {
    Client::builder()
        .homeserver_url(url)
        .request_config(
            matrix_sdk::config::RequestConfig::new()
                .timeout(Duration::from_secs(30))
                .disable_retry(),
        )
        .build()
        .await
        .expect("build client")
}

/// A new client registered (and so logged in) as `name`.
pub async fn registered(url: &str, name: &str) -> Client {
    let c = client(url).await;
    let mut req = register::v3::Request::new();
    req.username = Some(name.to_owned());
    req.password = Some(format!("{name}-password"));
    req.auth = Some(uiaa::AuthData::Dummy(uiaa::Dummy::new()));
    c.matrix_auth().register(req).await.expect("register");
    c
}

/// Percent-encodes a path or query component (room ids, aliases, filters);
/// the load generator's, so tests and benchmarks encode alike. Not every test
/// binary uses it, as with the rest of this module.
#[allow(unused_imports)]
pub use kabar_bench::client::enc;

/// One sample from the server's Prometheus metrics: the value of the line
/// that starts with `series` (name and labels, exactly as exposed).
pub async fn metric(server: &Server, series: &str) -> f64 {
    let url = server.metrics_url.as_deref().expect("metrics_listen is configured");
    let text = http().get(url).send().await.unwrap().text().await.unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// POSTs `body` (with `token`, if any) and returns the JSON answer.
pub async fn post_json(url: String, token: Option<&str>, body: serde_json::Value) -> serde_json::Value {
    let mut r = http().post(url).json(&body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap().json().await.unwrap()
}

/// GETs with `token` and returns the JSON answer.
pub async fn get_json(url: String, token: &str) -> serde_json::Value {
    http().get(url).bearer_auth(token).send().await.unwrap().json().await.unwrap()
}

/// GETs without a token and returns the JSON answer.
pub async fn get_public_json(url: String) -> serde_json::Value {
    http().get(url).send().await.unwrap().json().await.unwrap()
}

/// Runs the `kabar` binary with `args` and waits for it.
pub fn kabar(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kabar")).args(args).output().expect("run kabar")
}

/// A plain HTTP client for requests a Matrix SDK would never send.
pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// A user of the Client-Server API over raw HTTP, for what an SDK would
/// never send or hides from its caller (exact status codes, raw JSON).
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub token: String,
    pub user_id: String,
    pub device_id: String,
}

impl Api {
    /// Registers `name` (password `pw`) through the dummy stage.
    pub async fn register(server: &Server, name: &str) -> Self {
        let signup = serde_json::json!({"username": name, "password": "pw", "auth": {"type": "m.login.dummy"}});
        let (_, v) = post_public(&server.url, "/register", signup).await;
        Self {
            url: server.url.clone(),
            token: v["access_token"].as_str().unwrap_or_else(|| panic!("registered: {v}")).into(),
            user_id: v["user_id"].as_str().unwrap().into(),
            device_id: v["device_id"].as_str().unwrap().into(),
        }
    }

    /// A request to `/_matrix/client/v3{path}`: (status, JSON body or null).
    pub async fn req(&self, method: reqwest::Method, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        self.req_at(method, &format!("/_matrix/client/v3{path}"), body).await
    }

    /// A request to any path on the server, with this user's token.
    pub async fn req_at(&self, method: reqwest::Method, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        let mut r = http().request(method, format!("{}{path}", self.url)).bearer_auth(&self.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let s = resp.status().as_u16();
        (s, resp.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// [`Api::req`] that must answer 200; its body.
    pub async fn ok(&self, method: reqwest::Method, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        let (s, v) = self.req(method.clone(), path, body).await;
        assert_eq!(s, 200, "{method} {path}: {v}");
        v
    }
}

impl Api {
    /// The raw-HTTP view of a signed-in matrix-sdk client.
    pub fn of(client: &Client, server: &Server) -> Self {
        Self {
            url: server.url.clone(),
            token: client.access_token().expect("signed in"),
            user_id: client.user_id().expect("signed in").to_string(),
            device_id: client.device_id().expect("signed in").to_string(),
        }
    }

    /// Creates a room and returns its id.
    pub async fn create_room(&self, body: serde_json::Value) -> String {
        self.ok(reqwest::Method::POST, "/createRoom", Some(body)).await["room_id"]
            .as_str()
            .expect("room id")
            .to_owned()
    }

    /// A sync (`since` empty: initial) with an optional filter, answering at once.
    pub async fn sync(&self, since: &str, filter: Option<serde_json::Value>) -> serde_json::Value {
        let mut path = String::from("/sync?timeout=0");
        if !since.is_empty() {
            path.push_str(&format!("&since={since}"));
        }
        if let Some(f) = filter {
            path.push_str(&format!("&filter={}", enc(&f.to_string())));
        }
        self.ok(reqwest::Method::GET, &path, None).await
    }

    /// Sends a text message and returns its event id.
    pub async fn say(&self, room: &str, txn: &str, body: &str) -> String {
        self.ok(
            reqwest::Method::PUT,
            &format!("/rooms/{}/send/m.room.message/{txn}", enc(room)),
            Some(serde_json::json!({"msgtype": "m.text", "body": body})),
        )
        .await["event_id"]
            .as_str()
            .expect("event id")
            .to_owned()
    }
}

/// Where the first `null` in `v` is, as a JSON pointer: optional fields
/// must be left out, never null (strict clients refuse null).
pub fn first_null(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Null => Some(String::new()),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| first_null(item).map(|p| format!("/{i}{p}"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(k, item)| first_null(item).map(|p| format!("/{k}{p}"))),
        _ => None,
    }
}

impl Api {
    /// Joins a room by id or alias.
    /// The id of the room's newest event.
    pub async fn newest_event(&self, room: &str) -> String {
        let page = self
            .ok(reqwest::Method::GET, &format!("/rooms/{}/messages?dir=b&limit=1", enc(room)), None)
            .await;
        page["chunk"][0]["event_id"].as_str().expect("the room has an event").to_owned()
    }

    /// The bodies of the room's newest `limit` events that have one, newest first.
    pub async fn newest_bodies(&self, room: &str, limit: usize) -> Vec<String> {
        let page = self
            .ok(
                reqwest::Method::GET,
                &format!("/rooms/{}/messages?dir=b&limit={limit}", enc(room)),
                None,
            )
            .await;
        page["chunk"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["content"]["body"].as_str().map(str::to_owned))
            .collect()
    }

    /// The state keys of a room's member events through the paged member
    /// list (`/_matrix/client/unstable/kabar/rooms/{room}/members`), with
    /// `query` (`limit=...&membership=...`) on every page; and the pages.
    pub async fn member_pages(&self, room: &str, query: &str) -> (Vec<String>, usize) {
        let (mut listed, mut pages, mut from) = (vec![], 0, String::new());
        loop {
            let path = format!(
                "/_matrix/client/unstable/kabar/rooms/{}/members?{query}&from={}",
                enc(room),
                enc(&from)
            );
            let (status, page) = self.req_at(reqwest::Method::GET, &path, None).await;
            assert_eq!(status, 200, "{path}: {page}");
            pages += 1;
            listed.extend(
                page["chunk"]
                    .as_array()
                    .expect("a chunk")
                    .iter()
                    .map(|e| e["state_key"].as_str().expect("a member event").to_owned()),
            );
            match page["next_batch"].as_str() {
                Some(next) => from = next.to_owned(),
                None => return (listed, pages),
            }
        }
    }

    pub async fn join(&self, room: &str) {
        self.ok(reqwest::Method::POST, &format!("/join/{}", enc(room)), Some(serde_json::json!({})))
            .await;
    }

    /// Sets the global display name.
    pub async fn set_displayname(&self, name: &str) {
        self.ok(
            reqwest::Method::PUT,
            &format!("/profile/{}/displayname", enc(&self.user_id)),
            Some(serde_json::json!({ "displayname": name })),
        )
        .await;
    }

    /// Uploads media and returns its `server/id` (the `mxc://` URI's path).
    pub async fn upload(&self, bytes: impl Into<reqwest::Body>, content_type: &str) -> String {
        let up: serde_json::Value = http()
            .post(format!("{}/_matrix/media/v3/upload", self.url))
            .bearer_auth(&self.token)
            .header("content-type", content_type)
            .body(bytes)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        up["content_uri"]
            .as_str()
            .and_then(|u| u.strip_prefix("mxc://"))
            .unwrap_or_else(|| panic!("uploaded: {up}"))
            .to_owned()
    }
}

/// POSTs `body` to `/_matrix/client/v3{path}` without a token: (status, JSON).
pub async fn post_public(url: &str, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let r = http()
        .post(format!("{url}/_matrix/client/v3{path}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(serde_json::Value::Null))
}
