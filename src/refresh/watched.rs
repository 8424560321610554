//! Objects as the refresher's watches last saw them, each reduced to a small summary: a managed
//! Secret to what it says about itself (`layout::assess`), a ServiceAccount to whether it
//! references its pull Secret. The refresher reads these instead of asking the API server:
//! adopting 10,000 namespaces at start-up then costs one list of each kind instead of a GET and a
//! LIST per namespace, and checking a namespace at renewal costs no read at all. Credentials
//! are not kept.
//!
//! A view from a watch can lag behind the API server. So it only ever confirms what the
//! refresher already believes, or that nothing needs doing; anything else (absent, different,
//! damaged) sends the caller to the API server, as without the view.

use std::collections::BTreeMap;
use std::ops::Bound;
#[cfg(test)]
use std::sync::Arc;
use std::sync::RwLock;

use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};

/// Summaries by `namespace/name` (neither name holds a `/`), in order, so that a namespace's
/// objects are one range. One flat map rather than a map per namespace: a hash map per
/// namespace cost a table of its own for the one or two objects most namespaces have.
type Entries<S> = BTreeMap<Box<str>, S>;

fn key(namespace: &str, name: &str) -> Box<str> {
    format!("{namespace}/{name}").into_boxed_str()
}

/// The names and summaries of `namespace`'s objects.
fn in_namespace<'a, S>(
    entries: &'a Entries<S>,
    namespace: &str,
) -> impl Iterator<Item = (&'a str, &'a S)> + 'a {
    let prefix = format!("{namespace}/");
    entries
        .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
        .map(move |(k, s)| (k.strip_prefix(prefix.as_str()), s))
        .take_while(|(name, _)| name.is_some())
        .filter_map(|(name, s)| Some((name?, s)))
}

/// `namespace/name` split again.
fn split(key: &str) -> (String, String) {
    let (namespace, name) = key.split_once('/').unwrap_or(("", key));
    (namespace.to_string(), name.to_string())
}

pub(crate) struct Watched<S> {
    state: RwLock<State<S>>,
    /// True once a first complete list has been folded in.
    synced: tokio::sync::watch::Sender<bool>,
}

struct State<S> {
    current: Entries<S>,
    /// During a (re)list: the objects listed so far. When the list completes they replace
    /// `current`, which drops the objects deleted while the watch was down.
    relisting: Option<Entries<S>>,
}

impl<S> Default for Watched<S> {
    fn default() -> Self {
        Self {
            state: RwLock::new(State {
                current: BTreeMap::new(),
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
        let key_of = |o: &K| key(&o.namespace().unwrap_or_default(), &o.name_any());
        match event {
            // The first list fills the view directly (nothing to keep apart from it, and no
            // second copy of 10,000 entries); a relist fills a buffer beside the old view.
            Event::Init if *self.synced.borrow() => state.relisting = Some(BTreeMap::new()),
            Event::Init => state.current.clear(),
            Event::InitApply(object) => {
                let (key, summary) = (key_of(object), summarise(object));
                let into = match state.relisting.as_mut() {
                    Some(listed) => listed,
                    None => &mut state.current,
                };
                into.insert(key, summary);
            }
            Event::InitDone => {
                let mut gone = Vec::new();
                if let Some(listed) = state.relisting.take() {
                    gone = state
                        .current
                        .keys()
                        .filter(|k| !listed.contains_key(*k))
                        .map(|k| split(k))
                        .collect();
                    state.current = listed;
                }
                self.synced.send_replace(true);
                return gone;
            }
            Event::Apply(object) => {
                let (key, summary) = (key_of(object), summarise(object));
                state.current.insert(key, summary);
            }
            Event::Delete(object) => {
                if let Some((key, _)) = state.current.remove_entry(&*key_of(object)) {
                    return vec![split(&key)];
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
        seen.get(&*key(namespace, name)).cloned()
    }

    /// Whether the namespace holds any object.
    pub(crate) fn any_in(&self, namespace: &str) -> bool {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let any = in_namespace(&state.current, namespace).next().is_some();
        any
    }

    /// Whether every object of the namespace (none at all included) passes `check`.
    pub(crate) fn all_in(&self, namespace: &str, check: impl Fn(&S) -> bool) -> bool {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let all = in_namespace(&state.current, namespace).all(|(_, s)| check(s));
        all
    }

    /// The names of the namespace's objects.
    pub(crate) fn names_in(&self, namespace: &str) -> Vec<String> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let names = in_namespace(&state.current, namespace)
            .map(|(name, _)| name.to_string())
            .collect();
        names
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
    fn a_namespace_is_not_confused_with_one_whose_name_it_begins() {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let w: Watched<bool> = Watched::default();
        let account = |namespace: &str, name: &str| {
            let mut sa = ServiceAccount::default();
            sa.metadata.namespace = Some(namespace.into());
            sa.metadata.name = Some(name.into());
            sa
        };
        for (namespace, name, attached) in [
            ("team", "default", true),
            ("team-a", "builder", false),
            ("team.b", "x", false),
            ("tea", "y", false),
        ] {
            w.apply(&Event::Apply(account(namespace, name)), |_| attached);
        }
        assert_eq!(w.names_in("team"), ["default"]);
        assert!(w.all_in("team", |attached| *attached));
        assert!(w.any_in("team-a") && !w.any_in("te"));
        assert_eq!(w.get("team-a", "builder"), Some(false));
        assert_eq!(w.get("team", "builder"), None);
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
