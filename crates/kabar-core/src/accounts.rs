//! Accounts: registration, login, access tokens, devices, passwords.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use kabar_store::{NewDevice, NewUser, Session, Store};
use rand::{Rng, RngCore, distributions::Alphanumeric};
use ruma::{OwnedServerName, OwnedUserId, UserId};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{
    admission::NewcomerAdmission,
    applier::Applied,
    error::{Error, Result},
    now_ms,
    password::PasswordHasher,
    sessions::SessionCache,
    uia::{StageOutcome, UiaSessions},
};

/// Bound on devices whose last sighting is remembered.
const MAX_LAST_SEEN: usize = 200_000;

/// Who may register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationPolicy {
    Closed,
    /// Anyone, with the `m.login.dummy` stage.
    Open,
    /// Only with a registration token (`m.login.registration_token`).
    TokenRequired,
}

#[derive(Debug, Default, Clone)]
pub struct RegistrationRequest {
    pub username: Option<String>,
    pub password: Option<String>,
    pub device_id: Option<String>,
    pub initial_device_display_name: Option<String>,
    pub inhibit_login: bool,
    pub auth: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct LoggedIn {
    pub user_id: OwnedUserId,
    pub device_id: String,
    pub access_token: Option<String>,
}

/// Which of a user's devices to remove.
enum DeviceSelection<'a> {
    These(&'a [String]),
    AllBut(Option<&'a str>),
}

pub struct Accounts {
    store: Arc<dyn Store>,
    /// Where the applier stands: a write that revokes a token answers only
    /// once the token cache has dropped it.
    applied: Applied,
    hasher: Arc<PasswordHasher>,
    admission: Arc<NewcomerAdmission>,
    server_name: OwnedServerName,
    /// Changed by a configuration reload.
    policy: Mutex<RegistrationPolicy>,
    /// Names nobody may register (a reload may change them).
    reserved_localparts: Mutex<Arc<Vec<String>>>,
    uia: UiaSessions,
    /// token hash -> session; the applier drops a user's entries when the
    /// stream says their sessions changed.
    sessions: Arc<SessionCache>,
    /// When and from where each device was last noted as seen.
    last_seen: Mutex<HashMap<(OwnedUserId, String), (u64, IpAddr)>>,
}

/// How often a device's last-seen time is written while it is in use.
const LAST_SEEN_EVERY_MS: u64 = 5 * 60 * 1000;

fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn new_access_token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("kbr_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Refuses a device id or device name a client should never send: control
/// characters (a NUL, a newline) or more than 255 bytes.
fn check_device_fields(device_id: Option<&str>, display_name: Option<&str>) -> Result<()> {
    for (what, value) in [("device id", device_id), ("device name", display_name)] {
        if let Some(v) = value
            && (v.len() > 255 || kabar_domain::names::has_control_chars(v))
        {
            return Err(Error::InvalidParam(format!(
                "the {what} must be at most 255 bytes without control characters"
            )));
        }
    }
    Ok(())
}

/// A random alphanumeric string, for registration tokens and the like.
pub fn random_token(len: usize) -> String {
    rand::thread_rng().sample_iter(&Alphanumeric).take(len).map(char::from).collect()
}

fn new_device_id() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(10)
        .map(|c| (c as char).to_ascii_uppercase())
        .collect()
}

impl Accounts {
    pub fn new(
        store: Arc<dyn Store>,
        hasher: Arc<PasswordHasher>,
        admission: NewcomerAdmission,
        server_name: OwnedServerName,
        policy: RegistrationPolicy,
        sessions: Arc<SessionCache>,
        applied: Applied,
    ) -> Self {
        Self {
            uia: UiaSessions::new(store.clone()),
            store,
            applied,
            hasher,
            admission: Arc::new(admission),
            server_name,
            policy: Mutex::new(policy),
            reserved_localparts: Mutex::default(),
            sessions,
            last_seen: Mutex::new(HashMap::new()),
        }
    }

    pub fn server_name(&self) -> &ruma::ServerName {
        &self.server_name
    }

    /// Who may register now.
    pub fn policy(&self) -> RegistrationPolicy {
        *self.policy.lock().expect("registration policy")
    }

    /// Changes who may register (a configuration reload).
    pub fn set_policy(&self, policy: RegistrationPolicy) {
        *self.policy.lock().expect("registration policy") = policy;
    }

    /// Sets the user names nobody may register (the operator still can).
    pub fn set_reserved_localparts(&self, names: Vec<String>) {
        *self.reserved_localparts.lock().expect("reserved names") = Arc::new(names);
    }

    /// A user id a newcomer may register: valid and not reserved.
    fn new_user_id(&self, localpart: &str) -> Result<OwnedUserId> {
        let reserved = self.reserved_localparts.lock().expect("reserved names").clone();
        if kabar_domain::names::is_reserved(localpart, &reserved) {
            return Err(Error::InvalidUsername(format!("the user name {localpart} is reserved")));
        }
        self.user_id(localpart)
    }

    /// The sign-up and login limits, which a reload may change.
    pub fn admission(&self) -> &Arc<NewcomerAdmission> {
        &self.admission
    }

    /// The password hasher, whose queue a reload may resize.
    pub fn hasher(&self) -> &PasswordHasher {
        &self.hasher
    }

    /// Creates an account for the operator, whatever the registration policy
    /// and limits: the break-glass path. The password is hashed on a blocking
    /// thread outside the (possibly saturated) hashing pool.
    pub async fn create_user_as_operator(&self, localpart: &str, password: Option<String>) -> Result<OwnedUserId> {
        let user_id = self.user_id(&localpart.to_lowercase())?;
        let password_hash = match password {
            Some(p) if p.is_empty() || p.len() > 1024 => return Err(Error::InvalidParam("password must be 1 to 1024 bytes".into())),
            Some(p) => {
                let hasher = self.hasher.clone();
                Some(
                    tokio::task::spawn_blocking(move || hasher.hash_blocking(&p))
                        .await
                        .map_err(|e| Error::Internal(e.to_string()))??,
                )
            }
            None => None,
        };
        self.insert_user(&user_id, password_hash).await?;
        tracing::info!(user = %user_id, "account created by the operator");
        Ok(user_id)
    }

    /// Deactivates an account for the operator: its devices are signed out
    /// and it can no longer log in.
    pub async fn deactivate_as_operator(&self, user_id: &UserId) -> Result<()> {
        if self.store.user(user_id).await?.is_none() {
            return Err(Error::NotFound("no such user".into()));
        }
        self.deactivate_user(user_id).await?;
        tracing::info!(user = %user_id, "deactivated by the operator");
        Ok(())
    }

    fn user_id(&self, localpart: &str) -> Result<OwnedUserId> {
        if !kabar_domain::names::is_valid_new_localpart(localpart, self.server_name.as_str()) {
            return Err(Error::InvalidUsername(
                "user names may contain only a-z, 0-9, and . _ = - / +".into(),
            ));
        }
        UserId::parse_with_server_name(localpart, &self.server_name).map_err(|e| Error::InvalidUsername(e.to_string()))
    }

    /// Parses what a client typed at login: a localpart or a full user id.
    pub fn parse_login_user(&self, user: &str) -> Result<OwnedUserId> {
        let user = user.trim();
        let id = if user.starts_with('@') {
            UserId::parse(user.to_lowercase())
        } else {
            UserId::parse_with_server_name(user.to_lowercase(), &self.server_name)
        };
        id.map_err(|_| Error::Forbidden("invalid username or password".into()))
    }

    /// Whether a registration token could be used now (it is not spent by asking).
    pub async fn registration_token_valid(&self, token: &str) -> Result<bool> {
        if token.is_empty() || token.len() > 64 {
            return Ok(false);
        }
        Ok(self.store.registration_token_valid(token, now_ms()).await?)
    }

    pub async fn username_available(&self, localpart: &str) -> Result<bool> {
        let id = self.new_user_id(localpart)?;
        if self.store.user(&id).await?.is_some() {
            return Err(Error::UserInUse);
        }
        Ok(true)
    }

    /// Registers an account for a request from `client`. The request that
    /// completes authentication is the attempt that counts against the
    /// address's and the server's allowance, and it takes its hashing slot
    /// before a registration token is spent, so a refusal loses nothing.
    pub async fn register(&self, req: RegistrationRequest, client: IpAddr) -> Result<LoggedIn> {
        check_device_fields(req.device_id.as_deref(), req.initial_device_display_name.as_deref())?;
        let flows: &[&[&'static str]] = match self.policy() {
            RegistrationPolicy::Closed => return Err(Error::RegistrationDisabled),
            // Only the stage a newcomer can complete: a client shown a token
            // flow as well asks every newcomer for a token they do not have.
            RegistrationPolicy::Open => &[&["m.login.dummy"]],
            RegistrationPolicy::TokenRequired => &[&["m.login.registration_token"]],
        };
        let password = match req.password {
            Some(p) if p.len() > 1024 => return Err(Error::InvalidParam("password is too long".into())),
            Some(p) if !p.is_empty() => Some(p),
            _ => None,
        };
        let user_id = match &req.username {
            Some(name) => self.new_user_id(&name.to_lowercase())?,
            None => self.user_id(&new_device_id().to_lowercase())?,
        };
        // Admission comes before any store read, so a refusal costs next to
        // nothing. The first step (no `auth`) only learns whether it would be
        // let in now; the step that completes authentication is the attempt
        // that counts, and takes its hashing slot.
        let hash_slot = match (&req.auth, &password) {
            (None, Some(_)) => {
                self.hasher.check_room()?;
                None
            }
            (None, None) => None,
            (Some(_), _) => {
                self.admission.register.check(client)?;
                if password.is_some() {
                    Some(self.hasher.slot().await?)
                } else {
                    None
                }
            }
        };
        // Check the name before asking for auth, so a taken name fails fast.
        if self.store.user(&user_id).await?.is_some() {
            return Err(Error::UserInUse);
        }
        let store = self.store.clone();
        let request = format!("register {user_id}");
        self.uia
            .step(flows, json!({}), req.auth.as_ref(), &request, |kind, auth| async move {
                match kind.as_str() {
                    "m.login.dummy" => Ok(StageOutcome::Completed("m.login.dummy")),
                    "m.login.registration_token" => {
                        let token = auth.get("token").and_then(Value::as_str).unwrap_or_default();
                        if token.len() <= 64 && store.use_registration_token(token, now_ms()).await? {
                            Ok(StageOutcome::Completed("m.login.registration_token"))
                        } else {
                            Ok(StageOutcome::Failed("invalid registration token".into()))
                        }
                    }
                    _ => Ok(StageOutcome::Failed("unsupported stage".into())),
                }
            })
            .await?;

        let password_hash = match (password, hash_slot) {
            (Some(p), Some(slot)) => Some(slot.hash(p).await?),
            // Unreachable today (without `auth` the flow stops at the
            // challenge); should it happen, the password is hashed as usual.
            (Some(p), None) => Some(self.hasher.hash(p).await?),
            (None, _) => None,
        };
        self.insert_user(&user_id, password_hash).await?;
        tracing::info!(user = %user_id, "registered");
        if req.inhibit_login {
            return Ok(LoggedIn {
                user_id,
                device_id: String::new(),
                access_token: None,
            });
        }
        self.new_session(user_id, req.device_id, req.initial_device_display_name, client)
            .await
    }

    /// Stores a new account; a taken id (also a deactivated one) is `UserInUse`.
    async fn insert_user(&self, user_id: &UserId, password_hash: Option<String>) -> Result<()> {
        self.store
            .create_user(NewUser {
                user_id: user_id.to_owned(),
                password_hash,
                created_ms: now_ms(),
            })
            .await
            .map_err(|e| match e {
                kabar_store::StoreError::Conflict(_) => Error::UserInUse,
                other => other.into(),
            })
    }

    async fn new_session(
        &self,
        user_id: OwnedUserId,
        device_id: Option<String>,
        display_name: Option<String>,
        client: IpAddr,
    ) -> Result<LoggedIn> {
        let chosen = device_id.filter(|d| !d.is_empty() && d.len() <= 255);
        let device_id = chosen.unwrap_or_else(new_device_id);
        let token = new_access_token();
        // A new device changes the user's device list (their contacts'
        // clients must learn of it, and so must their own other devices); a
        // device id the client chose may have had a token, which this one
        // replaces. The applier does both once the write is applied.
        let pos = self
            .store
            .upsert_device(NewDevice {
                user_id: user_id.clone(),
                device_id: device_id.clone(),
                display_name,
                token_hash: hash_token(&token),
                now_ms: now_ms(),
                ip: Some(client.to_string()),
            })
            .await?;
        self.applied.reached(pos).await;
        Ok(LoggedIn {
            user_id,
            device_id,
            access_token: Some(token),
        })
    }

    async fn check_password(&self, user_id: &UserId, password: &str) -> Result<bool> {
        let Some(user) = self.store.user(user_id).await? else {
            return Ok(false);
        };
        match (user.deactivated, user.password_hash) {
            (false, Some(hash)) if password.len() <= 1024 => self.hasher.verify(password.to_owned(), hash).await,
            _ => Ok(false),
        }
    }

    /// Signs in with a password, for a request from `client`.
    pub async fn login_password(
        &self,
        user: &str,
        password: &str,
        device_id: Option<String>,
        display_name: Option<String>,
        client: IpAddr,
    ) -> Result<LoggedIn> {
        check_device_fields(device_id.as_deref(), display_name.as_deref())?;
        self.admission.login.check(client)?;
        // Refused before the store is read when hashing is saturated.
        self.hasher.check_room()?;
        let user_id = self.parse_login_user(user)?;
        if !self.check_password(&user_id, password).await? {
            return Err(Error::Forbidden("invalid username or password".into()));
        }
        self.new_session(user_id, device_id, display_name, client).await
    }

    /// The session an access token belongs to.
    pub async fn authenticate(&self, token: &str) -> Result<Session> {
        let h = hash_token(token);
        if let Some(s) = self.sessions.get(&h) {
            return Ok(s);
        }
        let epoch = self.sessions.epoch();
        let session = self.store.session_by_token_hash(&h).await?.ok_or(Error::UnknownToken)?;
        self.sessions.insert(epoch, h, session.clone());
        Ok(session)
    }

    /// Removes devices (their keys and queued messages go with them) and
    /// tells whoever shares a room with the user that the device list changed.
    async fn remove_devices(&self, user_id: &UserId, devices: DeviceSelection<'_>) -> Result<()> {
        let removed = match devices {
            DeviceSelection::These(ids) => self.store.delete_devices(user_id, ids).await?,
            DeviceSelection::AllBut(keep) => self.store.delete_all_devices(user_id, keep).await?,
        };
        if let Some(pos) = removed.list_changed_at {
            self.applied.reached(pos).await;
        }
        Ok(())
    }

    async fn deactivate_user(&self, user_id: &UserId) -> Result<()> {
        if let Some(pos) = self.store.deactivate_user(user_id).await?.list_changed_at {
            self.applied.reached(pos).await;
        }
        Ok(())
    }

    pub async fn logout(&self, session: &Session) -> Result<()> {
        self.remove_devices(&session.user_id, DeviceSelection::These(std::slice::from_ref(&session.device_id)))
            .await
    }

    pub async fn logout_all(&self, user_id: &UserId) -> Result<()> {
        self.remove_devices(user_id, DeviceSelection::AllBut(None)).await
    }

    /// Runs a password UIA for an action the signed-in user takes on their account.
    /// `action` names what the password is asked for (with what
    /// arguments): a session started for one action cannot authorize another.
    pub async fn require_password(&self, session: &Session, auth: Option<&Value>, action: &str) -> Result<()> {
        let user_id = session.user_id.clone();
        let request = format!("{user_id} {action}");
        self.uia
            .step(&[&["m.login.password"]], json!({}), auth, &request, |_, auth| async move {
                let claimed = auth
                    .pointer("/identifier/user")
                    .or_else(|| auth.get("user"))
                    .and_then(Value::as_str)
                    .map(|u| self.parse_login_user(u))
                    .transpose()?;
                if claimed.is_some_and(|c| c != user_id) {
                    return Err(Error::Forbidden("you can only authenticate as yourself".into()));
                }
                let password = auth.get("password").and_then(Value::as_str).unwrap_or_default();
                if self.check_password(&user_id, password).await? {
                    Ok(StageOutcome::Completed("m.login.password"))
                } else {
                    Ok(StageOutcome::Failed("invalid password".into()))
                }
            })
            .await
    }

    pub async fn change_password(&self, session: &Session, new_password: String, logout_devices: bool, auth: Option<&Value>) -> Result<()> {
        self.require_password(session, auth, "change password").await?;
        if new_password.is_empty() || new_password.len() > 1024 {
            return Err(Error::InvalidParam("password must be 1 to 1024 bytes".into()));
        }
        let hash = self.hasher.hash(new_password).await?;
        self.store.set_password_hash(&session.user_id, &hash).await?;
        if logout_devices {
            self.remove_devices(&session.user_id, DeviceSelection::AllBut(Some(&session.device_id)))
                .await?;
        }
        Ok(())
    }

    pub async fn deactivate(&self, session: &Session, auth: Option<&Value>) -> Result<()> {
        self.require_password(session, auth, "deactivate").await?;
        self.deactivate_user(&session.user_id).await?;
        tracing::info!(user = %session.user_id, "deactivated");
        Ok(())
    }

    /// Renames one of the user's devices; other users see the name, so it
    /// is a device-list change.
    pub async fn rename_device(&self, session: &Session, device_id: &str, name: Option<&str>) -> Result<()> {
        check_device_fields(None, name)?;
        match self.store.rename_device(&session.user_id, device_id, name).await? {
            Some(pos) => {
                self.applied.reached(pos).await;
                Ok(())
            }
            None => Err(Error::NotFound("device not found".into())),
        }
    }

    /// Notes that `session` was used from `client`, for `/devices`. Written
    /// at most once per device every few minutes (or when the address
    /// changes), in the background: a request never waits for it.
    pub fn seen(&self, session: &Session, client: IpAddr) {
        let now = now_ms();
        let key = (session.user_id.clone(), session.device_id.clone());
        {
            let mut seen = self.last_seen.lock().expect("last seen");
            if let Some((at, ip)) = seen.get(&key)
                && *ip == client
                && now.saturating_sub(*at) < LAST_SEEN_EVERY_MS
            {
                return;
            }
            if seen.len() >= MAX_LAST_SEEN {
                seen.clear();
            }
            seen.insert(key, (now, client));
        }
        let store = self.store.clone();
        let session = session.clone();
        tokio::spawn(async move {
            if let Err(e) = store
                .touch_device(&session.user_id, &session.device_id, &client.to_string(), now)
                .await
            {
                tracing::warn!(error = %e, "could not note when a device was last seen");
            }
        });
    }

    pub async fn delete_devices(&self, session: &Session, device_ids: &[String], auth: Option<&Value>) -> Result<()> {
        let mut sorted = device_ids.to_vec();
        sorted.sort();
        sorted.dedup();
        self.require_password(session, auth, &format!("delete devices {sorted:?}")).await?;
        self.remove_devices(&session.user_id, DeviceSelection::These(device_ids)).await
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        admission::{Admission, RateLimits},
        load::LoadMetrics,
        password::{HashCost, HashingPool},
    };

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn accounts_with(policy: RegistrationPolicy, max_queued: usize, admission: NewcomerAdmission) -> (Accounts, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(kabar_store_sqlite::SqliteStore::open(&dir.path().join("db")).unwrap());
        let pool = HashingPool {
            threads: 1,
            max_queued,
            max_queue_delay: std::time::Duration::from_secs(5),
            priority: crate::password::HashPriority::Normal,
        };
        let cost = HashCost {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        let hasher = Arc::new(PasswordHasher::new(cost, pool, LoadMetrics::default().class("password_hashing")).unwrap());
        let targets = crate::applier::ApplierTargets::fresh(&store, Arc::new(crate::notifier::Notifier::new()));
        let sessions = targets.sessions.clone();
        let applier = crate::applier::Applier::spawn(
            store.clone(),
            targets,
            Arc::new(kabar_bus::LocalBus::new("test")),
            std::time::Duration::from_secs(1),
        );
        (
            Accounts::new(
                store.clone(),
                hasher,
                admission,
                ruma::owned_server_name!("localhost"),
                policy,
                sessions,
                applier.applied(),
            ),
            dir,
        )
    }

    fn accounts(policy: RegistrationPolicy) -> (Accounts, tempfile::TempDir) {
        accounts_with(policy, 16, NewcomerAdmission::unlimited(&LoadMetrics::default()))
    }

    fn dummy() -> Option<Value> {
        Some(json!({"type": "m.login.dummy"}))
    }

    #[tokio::test]
    async fn register_login_and_token_lifecycle() {
        let (acc, _dir) = accounts(RegistrationPolicy::Open);
        let r = acc
            .register(
                RegistrationRequest {
                    username: Some("Alice".into()),
                    password: Some("pw".into()),
                    auth: dummy(),
                    ..Default::default()
                },
                CLIENT,
            )
            .await
            .unwrap();
        assert_eq!(r.user_id.as_str(), "@alice:localhost", "names are lowercased");
        let token = r.access_token.unwrap();
        assert!(token.len() >= 40, "at least 128 bits of randomness");
        assert_eq!(acc.authenticate(&token).await.unwrap().user_id, r.user_id);
        assert!(matches!(
            acc.register(
                RegistrationRequest {
                    username: Some("alice".into()),
                    auth: dummy(),
                    ..Default::default()
                },
                CLIENT
            )
            .await,
            Err(Error::UserInUse)
        ));
        assert!(matches!(
            acc.login_password("alice", "bad", None, None, CLIENT).await,
            Err(Error::Forbidden(_))
        ));
        let second = acc.login_password("@alice:localhost", "pw", None, None, CLIENT).await.unwrap();
        acc.logout(&acc.authenticate(&token).await.unwrap()).await.unwrap();
        assert!(matches!(acc.authenticate(&token).await, Err(Error::UnknownToken)));
        assert!(
            acc.authenticate(second.access_token.as_deref().unwrap()).await.is_ok(),
            "other devices stay signed in"
        );
    }

    #[tokio::test]
    async fn token_policy_and_bad_names() {
        let (acc, _dir) = accounts(RegistrationPolicy::TokenRequired);
        assert!(matches!(
            acc.register(
                RegistrationRequest {
                    username: Some("bob".into()),
                    auth: dummy(),
                    ..Default::default()
                },
                CLIENT
            )
            .await,
            Err(Error::BadJson(_))
        ));
        acc.store().create_registration_token("letmein", Some(1), None).await.unwrap();
        let auth = Some(json!({"type": "m.login.registration_token", "token": "letmein"}));
        acc.register(
            RegistrationRequest {
                username: Some("bob".into()),
                auth: auth.clone(),
                ..Default::default()
            },
            CLIENT,
        )
        .await
        .unwrap();
        assert!(matches!(
            acc.register(
                RegistrationRequest {
                    username: Some("carol".into()),
                    auth,
                    ..Default::default()
                },
                CLIENT
            )
            .await,
            Err(Error::UiaRequired(_))
        ));
        assert!(matches!(
            acc.register(
                RegistrationRequest {
                    username: Some("bad name".into()),
                    auth: dummy(),
                    ..Default::default()
                },
                CLIENT
            )
            .await,
            Err(Error::InvalidUsername(_))
        ));
        let (closed, _d) = accounts(RegistrationPolicy::Closed);
        assert!(matches!(
            closed.register(RegistrationRequest::default(), CLIENT).await,
            Err(Error::RegistrationDisabled)
        ));
    }

    /// A registration refused because hashing is saturated is refused before
    /// its registration token is spent, so the retry still works.
    #[tokio::test]
    async fn a_refused_registration_keeps_its_token() {
        let (acc, _dir) = accounts_with(
            RegistrationPolicy::TokenRequired,
            0,
            NewcomerAdmission::unlimited(&LoadMetrics::default()),
        );
        acc.store().create_registration_token("once", Some(1), None).await.unwrap();
        let request = || RegistrationRequest {
            username: Some("dora".into()),
            password: Some("pw".into()),
            auth: Some(json!({"type": "m.login.registration_token", "token": "once"})),
            ..Default::default()
        };
        let busy = acc.hasher.slot().await.unwrap();
        assert!(matches!(
            acc.register(request(), CLIENT).await,
            Err(Error::LimitExceeded { retry_after_ms }) if retry_after_ms > 0
        ));
        drop(busy);
        acc.register(request(), CLIENT).await.unwrap();
    }

    #[tokio::test]
    async fn each_address_gets_its_allowance_of_attempts() {
        let metrics = LoadMetrics::default();
        let limits = RateLimits {
            per_address_per_minute: 1,
            per_address_burst: 2,
            global_per_second: 0,
            global_burst: 0,
        };
        let admission = NewcomerAdmission {
            register: Admission::new(metrics.class("register"), limits),
            login: Admission::new(metrics.class("login"), limits),
        };
        let (acc, _dir) = accounts_with(RegistrationPolicy::Open, 16, admission);
        let register = |name: &str| RegistrationRequest {
            username: Some(name.into()),
            password: Some("pw".into()),
            auth: dummy(),
            ..Default::default()
        };
        // The first step (no auth) is a challenge and costs no allowance.
        assert!(matches!(
            acc.register(
                RegistrationRequest {
                    auth: None,
                    ..register("a0")
                },
                CLIENT
            )
            .await,
            Err(Error::UiaRequired(_))
        ));
        acc.register(register("a1"), CLIENT).await.unwrap();
        acc.register(register("a2"), CLIENT).await.unwrap();
        assert!(matches!(
            acc.register(register("a3"), CLIENT).await,
            Err(Error::LimitExceeded { retry_after_ms }) if retry_after_ms > 20_000
        ));
        assert!(
            acc.store().user(&acc.user_id("a3").unwrap()).await.unwrap().is_none(),
            "nothing was created"
        );
        let other: IpAddr = "192.0.2.99".parse().unwrap();
        acc.register(register("a3"), other).await.unwrap();
        for _ in 0..2 {
            assert!(matches!(
                acc.login_password("a1", "wrong", None, None, CLIENT).await,
                Err(Error::Forbidden(_))
            ));
        }
        assert!(matches!(
            acc.login_password("a1", "pw", None, None, CLIENT).await,
            Err(Error::LimitExceeded { .. })
        ));
        assert_eq!(metrics.shed_total("register"), 1);
        assert_eq!(metrics.shed_total("login"), 1);
    }
}
