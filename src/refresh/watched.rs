//! Objects as the refresher's watches last saw them, each reduced to a small summary: a managed
//! Secret to what it says about itself (`layout::assess`), a ServiceAccount to whether it
//! references its pull Secret. The refresher reads these instead of asking the API server:
//! adopting 10,000 namespaces at start-up then costs a few paged LISTs instead of a GET and a
//! LIST per namespace, and checking a namespace at renewal costs no read at all. Credentials
//! are not kept.
//!
//! A view from a watch can lag behind the API server. So it only ever confirms what the
//! refresher already believes, or that nothing needs doing; anything else (absent, different,
//! damaged) sends the caller to the API server, as without the view.

use std::collections::HashMap;
#[cfg(test)]
use std::sync::Arc;
use std::sync::RwLock;

use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};

/// Summaries by namespace, then name.
type ByNamespace<S> = HashMap<String, HashMap<String, S>>;

pub(crate) struct Watched<S> {
    state: RwLock<State<S>>,
    /// True once a first complete list has been folded in.
    synced: tokio::sync::watch::Sender<bool>,
}

struct State<S> {
    current: ByNamespace<S>,
    /// During a (re)list: the objects listed so far. When the list completes they replace
    /// `current`, which drops the objects deleted while the watch was down.
    relisting: Option<ByNamespace<S>>,
}

impl<S> Default for Watched<S> {
    fn default() -> Self {
        Self {
            state: RwLock::new(State {
                current: HashMap::new(),
                relisting: None,
            }),
            synced: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl<S: Clone> Watched<S> {
    /// Folds one watch event in. Objects of the first list are visible at once, before the
    /// list completes: start-up adoption need not wait for the last page. Returns the objects
    /// (namespace, name) gone from the view: the one a Delete event names, and those a
    /// completed relist found gone (no Delete event comes for those, and their owners should
    /// look again).
    pub(crate) fn apply<K: Resource>(
        &self,
        event: &Event<K>,
        summarise: impl Fn(&K) -> S,
    ) -> Vec<(String, String)> {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let key = |o: &K| (o.namespace().unwrap_or_default(), o.name_any());
        match event {
            // The first list fills the view directly (nothing to keep apart from it, and no
            // second copy of 10,000 entries); a relist fills a buffer beside the old view.
            Event::Init if *self.synced.borrow() => state.relisting = Some(HashMap::new()),
            Event::Init => state.current.clear(),
            Event::InitApply(object) => {
                let ((namespace, name), summary) = (key(object), summarise(object));
                let into = match state.relisting.as_mut() {
                    Some(listed) => listed,
                    None => &mut state.current,
                };
                into.entry(namespace).or_default().insert(name, summary);
            }
            Event::InitDone => {
                let mut gone = Vec::new();
                if let Some(listed) = state.relisting.take() {
                    for (namespace, names) in &state.current {
                        for name in names.keys() {
                            if listed.get(namespace).is_none_or(|l| !l.contains_key(name)) {
                                gone.push((namespace.clone(), name.clone()));
                            }
                        }
                    }
                    state.current = listed;
                }
                self.synced.send_replace(true);
                return gone;
            }
            Event::Apply(object) => {
                let ((namespace, name), summary) = (key(object), summarise(object));
                state
                    .current
                    .entry(namespace)
                    .or_default()
                    .insert(name, summary);
            }
            Event::Delete(object) => {
                let (namespace, name) = key(object);
                if let Some(names) = state.current.get_mut(&namespace) {
                    let removed = names.remove(&name).is_some();
                    if names.is_empty() {
                        state.current.remove(&namespace);
                    }
                    if removed {
                        return vec![(namespace, name)];
                    }
                }
            }
        }
        Vec::new()
    }

    /// The object's summary as last seen; `None` when the watch has not seen it (yet). During a
    /// relist, only what this list has shown counts: the object may have gone meanwhile.
    pub(crate) fn get(&self, namespace: &str, name: &str) -> Option<S> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let seen = state.relisting.as_ref().unwrap_or(&state.current);
        seen.get(namespace)?.get(name).cloned()
    }

    /// Whether the namespace holds any object.
    pub(crate) fn any_in(&self, namespace: &str) -> bool {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .current
            .contains_key(namespace)
    }

    /// Whether every object of the namespace (none at all included) passes `check`.
    pub(crate) fn all_in(&self, namespace: &str, check: impl Fn(&S) -> bool) -> bool {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state
            .current
            .get(namespace)
            .is_none_or(|names| names.values().all(check))
    }

    /// The names of the namespace's objects.
    pub(crate) fn names_in(&self, namespace: &str) -> Vec<String> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        state
            .current
            .get(namespace)
            .map(|names| names.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether the view is complete: its first list has been folded in, and no relist (after
    /// the watch was down) is under way.
    pub(crate) fn is_synced(&self) -> bool {
        *self.synced.borrow()
            && self
                .state
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .relisting
                .is_none()
    }

    /// Whether a first complete list has been folded in (a relist may be under way since).
    pub(crate) fn has_listed(&self) -> bool {
        *self.synced.borrow()
    }

    /// Whether the view is complete, waiting for its first list however long that takes.
    pub(crate) async fn first_list(&self) -> bool {
        let _ = self.synced.subscribe().wait_for(|listed| *listed).await;
        self.is_synced()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::credential::{Credential, Sensitive};
    use crate::secret::layout::{self, Assessment};
    use jiff::{SignedDuration, Timestamp};
    use k8s_openapi::api::core::v1::Secret;

    fn secret(namespace: &str, password: &str) -> Secret {
        let now = Timestamp::now();
        let credential = Credential {
            username: "u".into(),
            password: Sensitive::new(password),
            issued_at: now,
            expires_at: now + SignedDuration::from_hours(1),
        };
        layout::build(
            namespace,
            "pull-secret",
            &[("registry.example.com".into(), credential)],
        )
        .0
    }

    type WatchedSecrets = Watched<Assessment>;

    fn apply(w: &WatchedSecrets, event: Event<Secret>) -> Vec<(String, String)> {
        w.apply(&event, |s| layout::assess(Some(s)))
    }

    fn is_intact(w: &WatchedSecrets, namespace: &str) -> bool {
        matches!(w.get(namespace, "pull-secret"), Some(Assessment::Intact(_)))
    }

    #[test]
    fn a_listed_secret_is_visible_before_its_list_completes() {
        let w = WatchedSecrets::default();
        apply(&w, Event::Init);
        apply(&w, Event::InitApply(secret("a", "p")));
        assert!(is_intact(&w, "a"));
        assert!(!w.is_synced());
        apply(&w, Event::InitDone);
        assert!(is_intact(&w, "a") && w.is_synced());
        assert_eq!(w.get("b", "pull-secret"), None);
    }

    #[test]
    fn a_relist_drops_the_secrets_deleted_while_the_watch_was_down() {
        let w = WatchedSecrets::default();
        for event in [
            Event::Init,
            Event::InitApply(secret("a", "p")),
            Event::InitApply(secret("b", "p")),
            Event::InitDone,
        ] {
            assert!(apply(&w, event).is_empty());
        }
        apply(&w, Event::Init);
        apply(&w, Event::InitApply(secret("b", "p")));
        // Mid-relist, "a" may be gone: it is not vouched for, and the view is not complete.
        assert_eq!(w.get("a", "pull-secret"), None);
        assert!(is_intact(&w, "b") && w.any_in("a") && !w.is_synced());
        // The completed relist names the Secret that went, so that its namespace is looked at.
        assert_eq!(
            apply(&w, Event::InitDone),
            [("a".to_string(), "pull-secret".to_string())]
        );
        assert!(!w.any_in("a"));
        assert!(is_intact(&w, "b") && w.is_synced());
    }

    #[test]
    fn edits_and_deletions_are_followed() {
        let w = WatchedSecrets::default();
        apply(&w, Event::Apply(secret("a", "p")));
        let mut edited = secret("a", "p");
        edited
            .data
            .as_mut()
            .unwrap()
            .values_mut()
            .for_each(|v| v.0 = b"{}".to_vec());
        apply(&w, Event::Apply(edited.clone()));
        assert_eq!(w.get("a", "pull-secret"), Some(Assessment::Tampered));
        assert_eq!(
            apply(&w, Event::Delete(edited.clone())),
            [("a".to_string(), "pull-secret".to_string())]
        );
        assert_eq!(w.get("a", "pull-secret"), None);
        assert!(apply(&w, Event::Delete(edited)).is_empty(), "gone once");
        assert!(!w.any_in("a"));
    }

    #[test]
    fn a_namespace_without_objects_passes_every_check() {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let w: Watched<bool> = Watched::default();
        let account = |name: &str| {
            let mut sa = ServiceAccount::default();
            sa.metadata.namespace = Some("a".into());
            sa.metadata.name = Some(name.into());
            sa
        };
        assert!(w.all_in("a", |attached| *attached));
        w.apply(&Event::Apply(account("default")), |_| true);
        assert!(w.all_in("a", |attached| *attached));
        w.apply(&Event::Apply(account("builder")), |_| false);
        assert!(!w.all_in("a", |attached| *attached));
        let mut names = w.names_in("a");
        names.sort();
        assert_eq!(names, ["builder", "default"]);
    }

    #[tokio::test(start_paused = true)]
    async fn callers_wait_for_the_first_list_however_long_it_takes() {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let w: Arc<Watched<bool>> = Arc::new(Watched::default());
        let waiting = tokio::spawn({
            let w = w.clone();
            async move { w.first_list().await }
        });
        // A watch that cannot list for ten minutes (an RBAC rule missing): still waiting.
        tokio::time::sleep(std::time::Duration::from_secs(600)).await;
        assert!(!waiting.is_finished() && !w.has_listed());
        w.apply(&Event::<ServiceAccount>::Init, |_| true);
        w.apply(&Event::<ServiceAccount>::InitDone, |_| true);
        assert!(waiting.await.unwrap(), "complete once listed");
        // During a relist the answer comes at once: not complete, ask the API server.
        w.apply(&Event::<ServiceAccount>::Init, |_| true);
        assert!(!w.first_list().await && w.has_listed());
    }
}
