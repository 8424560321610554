//! The managed Secrets as the refresher's watch last saw them, each reduced to what it says
//! about itself (`pull_secret::assess`). The refresher reads a Secret's state here instead of
//! from the API server: adopting 10,000 Secrets at start-up then costs one paged LIST instead of
//! 10,000 GETs, and a renewal check no read at all. The credentials themselves are not kept.
//!
//! A view from a watch can lag behind the API server. So it only ever confirms what the cache
//! already believes, or that a stored Secret can be adopted as it is; anything else (absent,
//! different, damaged) sends the caller to the API server, as without this view.

use std::collections::HashMap;
use std::sync::RwLock;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::watcher::Event;
use kube::ResourceExt;

use crate::pull_secret::{self, Assessment};

pub struct WatchedSecrets {
    state: RwLock<State>,
    /// True once a first complete list has been folded in.
    synced: tokio::sync::watch::Sender<bool>,
}

impl Default for WatchedSecrets {
    fn default() -> Self {
        Self { state: RwLock::default(), synced: tokio::sync::watch::Sender::new(false) }
    }
}

#[derive(Default)]
struct State {
    /// By namespace, then name.
    current: HashMap<String, HashMap<String, Assessment>>,
    /// During a (re)list: the Secrets listed so far. When the list completes they replace
    /// `current`, which drops the Secrets deleted while the watch was down.
    relisting: Option<HashMap<String, HashMap<String, Assessment>>>,
}

impl WatchedSecrets {
    /// Folds one watch event in. Listed Secrets are visible at once, before their list
    /// completes: start-up adoption need not wait for the last page.
    pub fn apply(&self, event: &Event<Secret>) {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        match event {
            Event::Init => state.relisting = Some(HashMap::new()),
            Event::InitApply(secret) => {
                let (namespace, name, assessment) = entry(secret);
                if let Some(listed) = state.relisting.as_mut() {
                    listed.entry(namespace.clone()).or_default().insert(name.clone(), assessment.clone());
                }
                state.current.entry(namespace).or_default().insert(name, assessment);
            }
            Event::InitDone => {
                if let Some(listed) = state.relisting.take() {
                    state.current = listed;
                }
                self.synced.send_replace(true);
            }
            Event::Apply(secret) => {
                let (namespace, name, assessment) = entry(secret);
                state.current.entry(namespace).or_default().insert(name, assessment);
            }
            Event::Delete(secret) => {
                let namespace = secret.namespace().unwrap_or_default();
                if let Some(names) = state.current.get_mut(&namespace) {
                    names.remove(&secret.name_any());
                    if names.is_empty() {
                        state.current.remove(&namespace);
                    }
                }
            }
        }
    }

    /// The Secret's state as last seen; `None` when the watch has not seen it (yet).
    pub fn get(&self, namespace: &str, name: &str) -> Option<Assessment> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state.current.get(namespace)?.get(name).cloned()
    }

    /// Whether the namespace holds any managed Secret.
    pub fn any_in(&self, namespace: &str) -> bool {
        self.state.read().unwrap_or_else(|p| p.into_inner()).current.contains_key(namespace)
    }

    /// Whether the first complete list has been folded in.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Resolves once the first complete list has been folded in.
    pub async fn synced(&self) {
        let _ = self.synced.subscribe().wait_for(|synced| *synced).await;
    }
}

fn entry(secret: &Secret) -> (String, String, Assessment) {
    (secret.namespace().unwrap_or_default(), secret.name_any(), pull_secret::assess(Some(secret)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::{Credential, Sensitive};
    use jiff::{SignedDuration, Timestamp};

    fn secret(namespace: &str, password: &str) -> Secret {
        let now = Timestamp::now();
        let credential = Credential {
            username: "u".into(),
            password: Sensitive::new(password),
            issued_at: now,
            expires_at: now + SignedDuration::from_hours(1),
        };
        pull_secret::build(namespace, "pull-secret", &[("registry.example.com".into(), credential)]).0
    }

    fn is_intact(w: &WatchedSecrets, namespace: &str) -> bool {
        matches!(w.get(namespace, "pull-secret"), Some(Assessment::Intact(_)))
    }

    #[test]
    fn a_listed_secret_is_visible_before_its_list_completes() {
        let w = WatchedSecrets::default();
        w.apply(&Event::Init);
        w.apply(&Event::InitApply(secret("a", "p")));
        assert!(is_intact(&w, "a"));
        assert!(!w.is_synced());
        w.apply(&Event::InitDone);
        assert!(is_intact(&w, "a") && w.is_synced());
        assert_eq!(w.get("b", "pull-secret"), None);
    }

    #[test]
    fn a_relist_drops_the_secrets_deleted_while_the_watch_was_down() {
        let w = WatchedSecrets::default();
        for event in [Event::Init, Event::InitApply(secret("a", "p")), Event::InitApply(secret("b", "p")), Event::InitDone] {
            w.apply(&event);
        }
        for event in [Event::Init, Event::InitApply(secret("b", "p")), Event::InitDone] {
            w.apply(&event);
        }
        assert!(!w.any_in("a"));
        assert!(is_intact(&w, "b"));
    }

    #[test]
    fn edits_and_deletions_are_followed() {
        let w = WatchedSecrets::default();
        w.apply(&Event::Apply(secret("a", "p")));
        let mut edited = secret("a", "p");
        edited.data.as_mut().unwrap().values_mut().for_each(|v| v.0 = b"{}".to_vec());
        w.apply(&Event::Apply(edited.clone()));
        assert_eq!(w.get("a", "pull-secret"), Some(Assessment::Tampered));
        w.apply(&Event::Delete(edited));
        assert_eq!(w.get("a", "pull-secret"), None);
        assert!(!w.any_in("a"));
    }
}
