//! Pods that slipped through admission without the pull Secret (`core::pods`), as the leader's
//! Pod watch sees them: counted in `pods_without_pull_secret`, and each gets one Warning Event
//! (`MissingPullSecret`) saying what to do. No Pod is ever changed: its pull Secrets cannot be
//! after admission. Only what that needs is decoded (`slim`), and kept: the UIDs of the Pods
//! flagged, not the Pods.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};

use crate::config::InjectMode;
use crate::core::namespaces::{registries_annotation, registries_for, Eligibility};
use crate::core::pods::{self, Expected};
use crate::secret::provisioner::Provisioner;
use crate::settings::Settings;
use crate::slim::Slim;

/// The Event's reason, as `kubectl get events` shows it.
pub(crate) const REASON: &str = "MissingPullSecret";

#[derive(Default)]
struct Flagged {
    /// UIDs of the Pods lacking their Secret now.
    now: HashSet<String>,
    /// UIDs whose Event this process recorded (a Pod is told once).
    told: HashSet<String>,
    /// During a (re)list: the UIDs listed so far; at its end the others are gone.
    listing: Option<HashSet<String>>,
}

impl Flagged {
    /// A (re)list completed: what it did not list is gone.
    fn relisted(&mut self) {
        if let Some(listed) = self.listing.take() {
            self.now.retain(|uid| listed.contains(uid));
            self.told.retain(|uid| listed.contains(uid));
        }
    }
}

/// What one Pod event asks of the shell: tell this Pod (once), or nothing.
fn note(flagged: &mut Flagged, uid: &str, missing: Option<String>) -> Option<String> {
    if let Some(listing) = flagged.listing.as_mut() {
        listing.insert(uid.to_string());
    }
    match missing {
        Some(secret) => {
            flagged.now.insert(uid.to_string());
            flagged.told.insert(uid.to_string()).then_some(secret)
        }
        None => {
            flagged.now.remove(uid);
            None
        }
    }
}

/// Follows every Pod; runs until dropped. Starts once the Namespace store has listed, since
/// whether a Pod counts depends on its namespace.
pub(super) fn follow(
    client: Client,
    settings: Arc<Settings>,
    namespaces: Store<Namespace>,
    provisioner: Arc<Provisioner>,
) -> futures::future::BoxFuture<'static, ()> {
    use futures::FutureExt;
    let flagged = Arc::new(Mutex::new(Flagged::default()));
    async move {
        if !crate::cluster::wait_until_ready(&namespaces).await {
            return;
        }
        // Decoded slim: only what `core::pods` reads, whatever else the Pods hold.
        crate::cluster::watch_from_cache(Api::<Slim<Pod>>::all(client), watcher::Config::default())
            .map_ok(crate::slim::unwrap)
            .backoff(crate::cluster::WatchBackoff::default())
            .for_each(|event| {
                let (flagged, settings, namespaces, provisioner) = (
                    flagged.clone(),
                    settings.clone(),
                    namespaces.clone(),
                    provisioner.clone(),
                );
                async move {
                    let event = match event {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!(error = %e, kind = "Pod", "watch failed; retrying");
                            return;
                        }
                    };
                    let tell = {
                        let mut f = flagged.lock().unwrap_or_else(|p| p.into_inner());
                        let tell = match &event {
                            watcher::Event::Init => {
                                f.listing = Some(HashSet::new());
                                None
                            }
                            watcher::Event::InitDone => {
                                f.relisted();
                                None
                            }
                            watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
                                let uid = pod.uid().unwrap_or_default();
                                let missing = missing(pod, &settings, &namespaces);
                                note(&mut f, &uid, missing).map(|secret| (pod.clone(), secret))
                            }
                            watcher::Event::Delete(pod) => {
                                let uid = pod.uid().unwrap_or_default();
                                f.now.remove(&uid);
                                f.told.remove(&uid);
                                None
                            }
                        };
                        provisioner.metrics().pods_without_pull_secret.set(f.now.len() as i64);
                        tell
                    };
                    if let Some((pod, secret)) = tell {
                        let namespace = pod.namespace().unwrap_or_default();
                        tracing::warn!(%namespace, pod = %pod.name_any(), secret = %secret, "a Pod was admitted without the pull Secret");
                        let regarding = ObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            namespace: Some(namespace),
                            name: Some(pod.name_any()),
                            uid: pod.uid(),
                            ..Default::default()
                        };
                        provisioner
                            .events()
                            .warn(&regarding, "Admit", REASON, &pods::advice(&secret))
                            .await;
                        provisioner.metrics().missing_pull_secret_events.inc();
                    }
                }
            })
            .await
    }
    .boxed()
}

/// The Secret `pod` lacks, if its namespace is served and it should list one.
fn missing(pod: &Pod, settings: &Settings, namespaces: &Store<Namespace>) -> Option<String> {
    let name = pod.namespace()?;
    let ns = namespaces.get(&ObjectRef::new(&name))?;
    if settings
        .policy
        .eligibility(&name, ns.metadata.labels.as_ref())
        != Eligibility::OptedIn
    {
        return None;
    }
    let hosts = (settings.inject() == InjectMode::MatchingImages)
        .then(|| registries_for(registries_annotation(&ns), &settings.hosts()).hosts);
    pods::missing_pull_secret(
        pod,
        &Expected {
            scope: settings.scope(),
            secret_name: settings.secret_name(),
            only_for_hosts: hosts.as_deref(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_told_once_and_counted_while_it_lacks_the_secret() {
        let mut f = Flagged::default();
        let secret = || Some("pull-secret".to_string());
        assert_eq!(note(&mut f, "u1", secret()), secret());
        assert_eq!(note(&mut f, "u1", secret()), None, "told once");
        assert_eq!(f.now.len(), 1);
        assert_eq!(note(&mut f, "u1", None), None);
        assert!(f.now.is_empty(), "finished: no longer counted");
        // A relist forgets what it did not list.
        note(&mut f, "u2", secret());
        f.listing = Some(HashSet::new());
        note(&mut f, "u3", secret());
        f.relisted();
        assert_eq!(f.now.iter().collect::<Vec<_>>(), ["u3"]);
    }
}
