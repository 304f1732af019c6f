//! User-interactive authentication sessions.
//!
//! A client that must prove something (a password, a registration token)
//! gets a session id and the list of flows; it completes stages one request
//! at a time. Sessions live in the store, so the next step may reach any
//! process on the same database; they expire after a quarter of an hour.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kabar_store::Store;
use rand::{Rng, distributions::Alphanumeric};
use serde_json::{Value, json};

use crate::{
    error::{Error, Result},
    now_ms,
};

const SESSION_TTL: Duration = Duration::from_secs(15 * 60);
/// How often expired sessions are swept from the store.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

pub struct UiaSessions {
    store: Arc<dyn Store>,
    last_sweep: Mutex<Option<Instant>>,
}

/// What a stage handler decided about the `auth` dict it was given.
pub enum StageOutcome {
    /// The stage named here is complete.
    Completed(&'static str),
    /// The credentials were wrong; the client may try again.
    Failed(String),
}

impl UiaSessions {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            last_sweep: Mutex::new(None),
        }
    }

    async fn new_session(&self, request: &str) -> Result<String> {
        let sweep = {
            let mut last = self.last_sweep.lock().expect("uia sweep lock");
            let due = last.is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if sweep {
            let before = now_ms().saturating_sub(SESSION_TTL.as_millis() as u64);
            let swept = self.store.expire_uia_sessions(before).await?;
            if swept > 0 {
                tracing::debug!(swept, "expired user-interactive auth sessions");
            }
        }
        let id: String = rand::thread_rng().sample_iter(&Alphanumeric).take(24).map(char::from).collect();
        self.store.create_uia_session(&id, request, now_ms()).await?;
        Ok(id)
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
            let session = self.new_session(request).await?;
            return Err(Self::challenge(flows, &session, &[], params, None));
        };
        let gone = || Error::Forbidden("unknown or expired user-interactive auth session".into());
        // Clients may complete a single-stage flow without a session.
        let (session, completed) = match auth.get("session").and_then(Value::as_str) {
            Some(s) => {
                let known = self
                    .store
                    .uia_session(s)
                    .await?
                    .filter(|k| now_ms().saturating_sub(k.created_ms) < SESSION_TTL.as_millis() as u64)
                    .ok_or_else(gone)?;
                if known.request != request {
                    return Err(Error::Forbidden(
                        "this authentication session was started for another request".into(),
                    ));
                }
                (Some(s.to_owned()), known.completed)
            }
            None => (None, vec![]),
        };
        let kind = auth.get("type").and_then(Value::as_str).unwrap_or_default().to_owned();
        if kind.is_empty() {
            let session = match session {
                Some(s) => s,
                None => self.new_session(request).await?,
            };
            return Err(Self::challenge(flows, &session, &completed, params, None));
        }
        if !flows.iter().any(|f| f.contains(&kind.as_str())) {
            return Err(Error::BadJson(format!("unsupported auth type {kind}")));
        }
        let stage = match check(kind, auth.clone()).await? {
            StageOutcome::Completed(stage) => stage,
            StageOutcome::Failed(msg) => {
                let session = match session {
                    Some(s) => s,
                    None => self.new_session(request).await?,
                };
                return Err(Self::challenge(flows, &session, &completed, params, Some(msg)));
            }
        };
        let mut done = completed.to_vec();
        if !done.iter().any(|c| c == stage) {
            done.push(stage.to_owned());
        }
        let flow_complete = flows.iter().any(|f| f.iter().all(|stage| done.iter().any(|c| c == stage)));
        match (flow_complete, session) {
            (true, None) => Ok(()),
            // Ending the session is the claim: of two requests completing
            // it at once (on any process), one goes through.
            (true, Some(s)) => match self.store.delete_uia_session(&s).await? {
                true => Ok(()),
                false => Err(gone()),
            },
            (false, Some(s)) => {
                let completed = self.store.complete_uia_stage(&s, stage).await?.ok_or_else(gone)?;
                Err(Self::challenge(flows, &s, &completed, params, None))
            }
            (false, None) => {
                let s = self.new_session(request).await?;
                let completed = self.store.complete_uia_stage(&s, stage).await?.ok_or_else(gone)?;
                Err(Self::challenge(flows, &s, &completed, params, None))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions() -> (UiaSessions, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(kabar_store_sqlite::SqliteStore::open(&dir.path().join("db")).unwrap());
        (UiaSessions::new(store), dir)
    }

    #[tokio::test]
    async fn no_auth_gets_a_challenge_then_dummy_completes() {
        let (uia, _dir) = sessions();
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

    #[tokio::test]
    async fn a_session_started_through_one_handle_continues_through_another() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(kabar_store_sqlite::SqliteStore::open(&dir.path().join("db")).unwrap());
        let (first, second) = (UiaSessions::new(store.clone()), UiaSessions::new(store));
        let flows: &[&[&str]] = &[&["m.login.registration_token", "m.login.dummy"]];
        let Err(Error::UiaRequired(body)) = first.step(flows, json!({}), None, "r", |_, _| async { unreachable!() }).await else {
            panic!()
        };
        let token = json!({"type": "m.login.registration_token", "session": body["session"]});
        let Err(Error::UiaRequired(body)) = second
            .step(flows, json!({}), Some(&token), "r", |_, _| async {
                Ok(StageOutcome::Completed("m.login.registration_token"))
            })
            .await
        else {
            panic!("one stage of two is not a whole flow")
        };
        assert_eq!(body["completed"], json!(["m.login.registration_token"]));
        let dummy = json!({"type": "m.login.dummy", "session": body["session"]});
        first
            .step(flows, json!({}), Some(&dummy), "r", |_, _| async {
                Ok(StageOutcome::Completed("m.login.dummy"))
            })
            .await
            .expect("the stage completed through the other handle counts");
    }

    #[tokio::test]
    async fn a_session_completes_only_the_request_it_was_started_for() {
        let (uia, _dir) = sessions();
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
        let (uia, _dir) = sessions();
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
