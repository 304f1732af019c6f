//! User-interactive authentication sessions.
//!
//! A client that must prove something (a password, a registration token)
//! gets a session id and the list of flows; it completes stages one request
//! at a time. Sessions live in memory, expire, and their number is bounded.

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use rand::{Rng, distributions::Alphanumeric};
use serde_json::{Value, json};

use crate::error::{Error, Result};

const SESSION_TTL: Duration = Duration::from_secs(15 * 60);
const MAX_SESSIONS: usize = 100_000;

#[derive(Debug, Clone)]
struct UiaSession {
    completed: Vec<String>,
    created: Instant,
    /// What the session was started for (who asked, to do what): proving
    /// something for one request never authorizes another.
    request: String,
}

#[derive(Default)]
pub struct UiaSessions {
    sessions: Mutex<Sessions>,
}

/// The live sessions and the order they were made in, so the oldest can be
/// dropped in constant time: a flood of first steps must not make each new
/// session scan all the others.
#[derive(Default)]
struct Sessions {
    live: HashMap<String, UiaSession>,
    created: VecDeque<(Instant, String)>,
}

impl Sessions {
    fn get(&self, id: &str) -> Option<&UiaSession> {
        self.live.get(id).filter(|s| s.created.elapsed() < SESSION_TTL)
    }

    fn insert(&mut self, id: String, request: &str) {
        let now = Instant::now();
        while let Some((made, old)) = self.created.front() {
            if now.duration_since(*made) < SESSION_TTL && self.created.len() < MAX_SESSIONS {
                break;
            }
            self.live.remove(old);
            self.created.pop_front();
        }
        self.created.push_back((now, id.clone()));
        self.live.insert(
            id,
            UiaSession {
                completed: vec![],
                created: now,
                request: request.to_owned(),
            },
        );
    }
}

/// What a stage handler decided about the `auth` dict it was given.
pub enum StageOutcome {
    /// The stage named here is complete.
    Completed(&'static str),
    /// The credentials were wrong; the client may try again.
    Failed(String),
}

impl UiaSessions {
    pub fn new() -> Self {
        Self::default()
    }

    fn new_session(&self, request: &str) -> String {
        let id: String = rand::thread_rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect();
        self.sessions.lock().expect("uia lock").insert(id.clone(), request);
        id
    }

    fn challenge(flows: &[&[&'static str]], session: &str, completed: &[String], params: Value, error: Option<String>) -> Error {
        let mut body = json!({
            "flows": flows.iter().map(|f| json!({"stages": f})).collect::<Vec<_>>(),
            "params": params,
            "session": session,
            "completed": completed,
        });
        if let Some(e) = error {
            body["errcode"] = json!("M_FORBIDDEN");
            body["error"] = json!(e);
        }
        Error::UiaRequired(body)
    }

    /// Drives one UIA request. `request` names what it is for (who asks, to
    /// do what); a session started for one request cannot complete another.
    /// `check` validates the `auth` dict for its stage. Returns `Ok(())` once
    /// a whole flow is complete, else the challenge to send.
    pub async fn step<F, Fut>(&self, flows: &[&[&'static str]], params: Value, auth: Option<&Value>, request: &str, check: F) -> Result<()>
    where
        F: FnOnce(String, Value) -> Fut,
        Fut: std::future::Future<Output = Result<StageOutcome>>,
    {
        let Some(auth) = auth else {
            let session = self.new_session(request);
            return Err(Self::challenge(flows, &session, &[], params, None));
        };
        let session = match auth.get("session").and_then(Value::as_str) {
            Some(s) => {
                let sessions = self.sessions.lock().expect("uia lock");
                match sessions.get(s) {
                    Some(known) if known.request == request => s.to_owned(),
                    Some(_) => {
                        return Err(Error::Forbidden(
                            "this authentication session was started for another request".into(),
                        ));
                    }
                    None => return Err(Error::Forbidden("unknown or expired user-interactive auth session".into())),
                }
            }
            // Clients may complete a single-stage flow without a session.
            None => self.new_session(request),
        };
        let kind = auth.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
        let completed = {
            let map = self.sessions.lock().expect("uia lock");
            map.get(&session).map(|s| s.completed.clone()).unwrap_or_default()
        };
        if kind.is_empty() {
            return Err(Self::challenge(flows, &session, &completed, params, None));
        }
        if !flows.iter().any(|f| f.contains(&kind.as_str())) {
            return Err(Error::BadJson(format!("unsupported auth type {kind}")));
        }
        let completed = match check(kind, auth.clone()).await? {
            StageOutcome::Completed(stage) => {
                let mut map = self.sessions.lock().expect("uia lock");
                if !map.live.contains_key(&session) {
                    map.insert(session.clone(), request);
                }
                let s = map.live.get_mut(&session).expect("inserted above");
                if !s.completed.iter().any(|c| c == stage) {
                    s.completed.push(stage.to_owned());
                }
                s.completed.clone()
            }
            StageOutcome::Failed(msg) => {
                return Err(Self::challenge(flows, &session, &completed, params, Some(msg)));
            }
        };
        if flows.iter().any(|f| f.iter().all(|stage| completed.iter().any(|c| c == stage))) {
            self.sessions.lock().expect("uia lock").live.remove(&session);
            Ok(())
        } else {
            Err(Self::challenge(flows, &session, &completed, params, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_auth_gets_a_challenge_then_dummy_completes() {
        let uia = UiaSessions::new();
        let flows: &[&[&str]] = &[&["m.login.dummy"]];
        let Err(Error::UiaRequired(body)) = uia.step(flows, json!({}), None, "r", |_, _| async { unreachable!() }).await else {
            panic!()
        };
        let session = body["session"].as_str().unwrap().to_owned();
        assert_eq!(body["flows"][0]["stages"][0], "m.login.dummy");
        let auth = json!({"type": "m.login.dummy", "session": session});
        uia.step(flows, json!({}), Some(&auth), "r", |_, _| async {
            Ok(StageOutcome::Completed("m.login.dummy"))
        })
        .await
        .unwrap();
        // The session is spent.
        assert!(
            uia.step(flows, json!({}), Some(&auth), "r", |_, _| async {
                Ok(StageOutcome::Completed("m.login.dummy"))
            })
            .await
            .is_err()
        );
    }

    #[test]
    fn the_oldest_sessions_make_room_for_new_ones() {
        let mut s = Sessions::default();
        for i in 0..MAX_SESSIONS + 10 {
            s.insert(format!("s{i}"), "r");
        }
        assert_eq!(s.live.len(), MAX_SESSIONS);
        assert!(s.get("s0").is_none() && s.get("s9").is_none());
        assert!(s.get("s10").is_some());
        assert!(s.get(&format!("s{}", MAX_SESSIONS + 9)).is_some());
    }

    #[tokio::test]
    async fn a_session_completes_only_the_request_it_was_started_for() {
        let uia = UiaSessions::new();
        let flows: &[&[&str]] = &[&["m.login.password"]];
        let Err(Error::UiaRequired(body)) = uia
            .step(flows, json!({}), None, "delete devices [A]", |_, _| async { unreachable!() })
            .await
        else {
            panic!()
        };
        let auth = json!({"type": "m.login.password", "session": body["session"]});
        let other = uia
            .step(flows, json!({}), Some(&auth), "delete devices [B]", |_, _| async {
                Ok(StageOutcome::Completed("m.login.password"))
            })
            .await;
        assert!(matches!(other, Err(Error::Forbidden(_))), "another request is refused");
        uia.step(flows, json!({}), Some(&auth), "delete devices [A]", |_, _| async {
            Ok(StageOutcome::Completed("m.login.password"))
        })
        .await
        .expect("its own request completes");
    }

    #[tokio::test]
    async fn failed_stage_repeats_the_challenge_with_an_error() {
        let uia = UiaSessions::new();
        let flows: &[&[&str]] = &[&["m.login.password"]];
        let auth = json!({"type": "m.login.password", "password": "x"});
        let Err(Error::UiaRequired(body)) = uia
            .step(flows, json!({}), Some(&auth), "r", |_, _| async {
                Ok(StageOutcome::Failed("wrong password".into()))
            })
            .await
        else {
            panic!()
        };
        assert_eq!(body["errcode"], "M_FORBIDDEN");
        assert!(body["completed"].as_array().unwrap().is_empty());
    }
}
