//! Pods that slipped through admission without the pull Secret (`core::pods`), as the leader's
//! Pod watch sees them: counted in `pods_without_pull_secret`, and each gets one Warning Event
//! (`MissingPullSecret`) saying what to do. No Pod is ever changed: its pull Secrets cannot be
//! after admission. With `remediation.mode: evictStuckPods`, those that cannot pull are put
//! right as `core::remediation` decides: evicted once their namespace's Secret exists (so that
//! their controller recreates them through admission), at a bounded rate, or told to be
//! recreated. Only what that needs is decoded (`slim`), and kept: the UIDs of the Pods
//! flagged, and of those stuck their name and controller, not the Pods.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::ListParams;
use tokio::time::Instant;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Pod};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};

use super::watched::Watched;
use crate::cluster::KubeError;
use crate::config::{InjectMode, RemediationMode};
use crate::core::namespaces::{registries_annotation, registries_for, Eligibility};
use crate::core::pods::{self, Expected};
use crate::core::remediation::{self, Bucket, Decision, PodView, Situation};
use crate::secret::layout::Seen;
use crate::secret::provisioner::Provisioner;
use crate::settings::Settings;
use crate::slim::Slim;

/// The Event's reason, as `kubectl get events` shows it.
pub(crate) const REASON: &str = "MissingPullSecret";
/// The reason of the Event on a Pod evicted to be recreated with the Secret.
pub(crate) const EVICTED_REASON: &str = "EvictedWithoutPullSecret";
/// The reason of the Event on a stuck Pod nothing would recreate.
pub(crate) const RECREATE_REASON: &str = "RecreatePod";

/// A Pod lacking its Secret that cannot pull, as last seen.
#[derive(Clone, Debug)]
struct Stuck {
    namespace: String,
    name: String,
    secret: String,
    view: PodView,
    /// Told to be recreated (a bare Pod is told once).
    told_to_recreate: bool,
    /// Not tried again before this (after an eviction, or one a budget held).
    not_before: Option<Instant>,
    /// Evictions tried: the wait before the next grows with them.
    tries: u32,
}

#[derive(Default)]
struct Flagged {
    /// UIDs of the Pods lacking their Secret now.
    now: HashSet<String>,
    /// UIDs whose Event this process recorded (a Pod is told once).
    told: HashSet<String>,
    /// During a (re)list: the UIDs listed so far; at its end the others are gone.
    listing: Option<HashSet<String>>,
    /// With `evictStuckPods`: the Pods lacking their Secret that cannot pull, by UID.
    stuck: HashMap<String, Stuck>,
}

impl Flagged {
    /// A (re)list completed: what it did not list is gone.
    fn relisted(&mut self) {
        if let Some(listed) = self.listing.take() {
            self.now.retain(|uid| listed.contains(uid));
            self.told.retain(|uid| listed.contains(uid));
            self.stuck.retain(|uid, _| listed.contains(uid));
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

/// Keeps `uid` among the stuck Pods while it lacks its Secret and cannot pull; what was
/// learnt about it (told, tries) stays.
fn track(flagged: &mut Flagged, uid: &str, pod: &Pod, missing: Option<&str>) {
    let view = PodView::of(pod);
    match missing {
        Some(secret) if view.pull_failing => {
            let entry = flagged
                .stuck
                .entry(uid.to_string())
                .or_insert_with(|| Stuck {
                    namespace: pod.namespace().unwrap_or_default(),
                    name: pod.name_any(),
                    secret: secret.to_string(),
                    view: view.clone(),
                    told_to_recreate: false,
                    not_before: None,
                    tries: 0,
                });
            entry.view = view;
        }
        _ => {
            flagged.stuck.remove(uid);
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
    secrets: Arc<Watched<Seen>>,
) -> futures::future::BoxFuture<'static, ()> {
    use futures::FutureExt;
    let flagged = Arc::new(Mutex::new(Flagged::default()));
    let evicting = settings.config.remediation.mode == RemediationMode::EvictStuckPods;
    let remediate = Remediate {
        client: client.clone(),
        settings: settings.clone(),
        namespaces: namespaces.clone(),
        provisioner: provisioner.clone(),
        secrets,
        flagged: flagged.clone(),
    };
    let watch = async move {
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
                                if evicting {
                                    track(&mut f, &uid, pod, missing.as_deref());
                                }
                                note(&mut f, &uid, missing).map(|secret| (pod.clone(), secret))
                            }
                            watcher::Event::Delete(pod) => {
                                let uid = pod.uid().unwrap_or_default();
                                f.now.remove(&uid);
                                f.told.remove(&uid);
                                f.stuck.remove(&uid);
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
    };
    async move {
        if evicting {
            futures::future::join(watch, remediate.run()).await;
        } else {
            watch.await;
        }
    }
    .boxed()
}

/// How often the stuck Pods are looked at: a Secret made meanwhile is acted on within this.
const PASS: Duration = Duration::from_secs(1);

/// The first wait before a Pod is tried again (a budget held it, or the eviction failed);
/// it doubles with each try, up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(5);
const MAX_RETRY: Duration = Duration::from_secs(300);

/// After an eviction the Pod goes away; if it is still seen stuck after this, it is tried again.
const AFTER_EVICTION: Duration = Duration::from_secs(60);

/// The remediation loop: every [`PASS`], the stuck Pods are decided on again with what is known
/// now (their namespace, its Secret) and acted on, evictions paced by a token bucket.
struct Remediate {
    client: Client,
    settings: Arc<Settings>,
    namespaces: Store<Namespace>,
    provisioner: Arc<Provisioner>,
    secrets: Arc<Watched<Seen>>,
    flagged: Arc<Mutex<Flagged>>,
}

/// What an eviction came to, as the `pod_evictions` outcome says it.
fn outcome(result: &Result<(), kube::Error>) -> &'static str {
    match result {
        Ok(()) => "evicted",
        // The Eviction API answers 429 while a PodDisruptionBudget allows no disruption.
        Err(kube::Error::Api(s)) if s.code == 429 => "disruption_budget",
        // 409: the precondition failed, the name is another Pod's now.
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => "gone",
        Err(_) => "failed",
    }
}

impl Remediate {
    async fn run(self) {
        let r = &self.settings.config.remediation;
        let mut bucket = Bucket::new(r.max_evictions_per_minute, r.eviction_burst);
        let start = Instant::now();
        let mut tick = tokio::time::interval(PASS);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for (uid, stuck) in self.due() {
                match self.decide(&stuck) {
                    Decision::Evict { controller } => {
                        if !bucket.take(start.elapsed()) {
                            // Out of tokens: the others wait for the next pass.
                            break;
                        }
                        self.evict(&uid, &stuck, &controller).await;
                    }
                    Decision::TellToRecreate if !stuck.told_to_recreate => {
                        self.tell_to_recreate(&uid, &stuck).await;
                    }
                    _ => {}
                }
            }
        }
    }

    /// The stuck Pods not waiting for a retry, oldest names first (a stable order).
    fn due(&self) -> Vec<(String, Stuck)> {
        let now = Instant::now();
        let f = self.flagged.lock().unwrap_or_else(|p| p.into_inner());
        let mut due: Vec<(String, Stuck)> = f
            .stuck
            .iter()
            .filter(|(_, s)| s.not_before.is_none_or(|t| t <= now))
            .map(|(uid, s)| (uid.clone(), s.clone()))
            .collect();
        due.sort_by(|a, b| (&a.1.namespace, &a.1.name).cmp(&(&b.1.namespace, &b.1.name)));
        due
    }

    fn decide(&self, stuck: &Stuck) -> Decision {
        let ns = self.namespaces.get(&ObjectRef::new(&stuck.namespace));
        let opted_in = ns.is_some_and(|ns| {
            self.settings
                .policy
                .eligibility(&stuck.namespace, ns.metadata.labels.as_ref())
                == Eligibility::OptedIn
        });
        remediation::decide(
            &stuck.view,
            &Situation {
                evict: true,
                namespace: &stuck.namespace,
                own_namespace: self.settings.own_namespace.as_deref(),
                opted_in,
                lacks_secret: true,
                secret_exists: self.secrets.get(&stuck.namespace, &stuck.secret).is_some(),
            },
        )
    }

    fn update(&self, uid: &str, change: impl FnOnce(&mut Stuck)) {
        let mut f = self.flagged.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = f.stuck.get_mut(uid) {
            change(s);
        }
    }

    async fn evict(&self, uid: &str, stuck: &Stuck, controller: &str) {
        let result = match self.budget_holding(stuck).await {
            Ok(Some(budget)) => Err(held_by_budget(&budget)),
            Ok(None) => evict(&self.client, &stuck.namespace, &stuck.name, uid).await,
            Err(e) => Err(e),
        };
        let outcome = outcome(&result);
        self.provisioner.metrics().pod_evicted(outcome);
        let (namespace, pod) = (&stuck.namespace, &stuck.name);
        match result {
            Ok(()) => {
                tracing::info!(%namespace, %pod, %controller, "evicted a Pod stuck pulling without the pull Secret");
                let regarding = pod_reference(stuck, uid);
                self.provisioner
                    .events()
                    .warn(
                        &regarding,
                        "Evict",
                        EVICTED_REASON,
                        &remediation::evicted_note(&stuck.secret, controller),
                    )
                    .await;
            }
            Err(e) if outcome == "disruption_budget" => {
                tracing::info!(%namespace, %pod, error = %KubeError::from(e), "eviction held by a PodDisruptionBudget; trying again later");
            }
            Err(e) => {
                tracing::warn!(%namespace, %pod, error = %KubeError::from(e), "could not evict a Pod stuck pulling without the pull Secret");
            }
        }
        let wait = match outcome {
            "evicted" => AFTER_EVICTION,
            _ => FIRST_RETRY
                .saturating_mul(2u32.saturating_pow(stuck.tries.min(16)))
                .min(MAX_RETRY),
        };
        if outcome == "gone" {
            let mut f = self.flagged.lock().unwrap_or_else(|p| p.into_inner());
            f.stuck.remove(uid);
            return;
        }
        self.update(uid, |s| {
            s.tries += 1;
            s.not_before = Some(Instant::now() + wait);
        });
    }

    /// The budget of the Pod's namespace that holds its eviction, if one does.
    async fn budget_holding(&self, stuck: &Stuck) -> Result<Option<String>, kube::Error> {
        let budgets = Api::<PodDisruptionBudget>::namespaced(self.client.clone(), &stuck.namespace)
            .list(&ListParams::default())
            .await?;
        Ok(remediation::held_by(&budgets.items, &stuck.view.labels))
    }

    async fn tell_to_recreate(&self, uid: &str, stuck: &Stuck) {
        self.update(uid, |s| s.told_to_recreate = true);
        tracing::warn!(namespace = %stuck.namespace, pod = %stuck.name, "a Pod without a controller is stuck without the pull Secret; it is not evicted");
        self.provisioner
            .events()
            .warn(
                &pod_reference(stuck, uid),
                "Remediate",
                RECREATE_REASON,
                &remediation::recreate_advice(&stuck.secret),
            )
            .await;
        self.provisioner.metrics().recreate_pod_events.inc();
    }
}

/// The Eviction body: only the Pod of this UID (not one of the same name made since), with its
/// own grace period. Written out rather than kube's `Api::evict`, whose body names the field
/// `delete_options`, which the API server ignores (and with it the precondition).
pub(crate) fn eviction(namespace: &str, name: &str, uid: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "policy/v1", "kind": "Eviction",
        "metadata": {"name": name, "namespace": namespace},
        "deleteOptions": {"preconditions": {"uid": uid}},
    })
}

/// The refusal the Eviction API gives when a budget holds, for a hold decided here: the API
/// server lets a Pending Pod go whatever its budgets say.
fn held_by_budget(budget: &str) -> kube::Error {
    let message = format!("PodDisruptionBudget {budget} allows no disruption now");
    kube::Error::Api(
        kube::core::Status::failure(&message, "TooManyRequests")
            .with_code(429)
            .boxed(),
    )
}

/// POSTs the eviction of `namespace/name` (UID `uid`).
async fn evict(client: &Client, namespace: &str, name: &str, uid: &str) -> Result<(), kube::Error> {
    let body =
        serde_json::to_vec(&eviction(namespace, name, uid)).map_err(kube::Error::SerdeError)?;
    let request = http::Request::post(format!(
        "/api/v1/namespaces/{namespace}/pods/{name}/eviction"
    ))
    .header(http::header::CONTENT_TYPE, "application/json")
    .body(body)
    .map_err(kube::Error::HttpError)?;
    client
        .request::<serde_json::Value>(request)
        .await
        .map(|_| ())
}

fn pod_reference(stuck: &Stuck, uid: &str) -> ObjectReference {
    ObjectReference {
        uid: Some(uid.to_string()),
        ..crate::cluster::reference("Pod", &stuck.namespace, &stuck.name)
    }
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

    #[test]
    fn stuck_pods_are_kept_while_they_lack_the_secret_and_cannot_pull() {
        let pod = |reason: &str| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "team", "uid": "u1"},
                "status": {"containerStatuses": [{"name": "c", "image": "i", "imageID": "",
                    "ready": false, "restartCount": 0, "state": {"waiting": {"reason": reason}}}]}
            }))
            .unwrap()
        };
        let mut f = Flagged::default();
        track(&mut f, "u1", &pod("ContainerCreating"), Some("pull-secret"));
        assert!(f.stuck.is_empty(), "not stuck pulling yet");
        track(&mut f, "u1", &pod("ErrImagePull"), Some("pull-secret"));
        f.stuck.get_mut("u1").unwrap().told_to_recreate = true;
        track(&mut f, "u1", &pod("ImagePullBackOff"), Some("pull-secret"));
        let s = &f.stuck["u1"];
        assert_eq!(
            (s.namespace.as_str(), s.name.as_str(), s.secret.as_str()),
            ("team", "p", "pull-secret")
        );
        assert!(s.told_to_recreate, "what was done stays");
        track(&mut f, "u1", &pod("ImagePullBackOff"), None);
        assert!(f.stuck.is_empty(), "has its Secret (or no longer counts)");
        // A relist forgets the Pods it did not list.
        track(&mut f, "u1", &pod("ErrImagePull"), Some("pull-secret"));
        f.listing = Some(HashSet::new());
        f.relisted();
        assert!(f.stuck.is_empty());
    }

    #[test]
    fn the_eviction_names_the_pods_uid_and_keeps_its_grace_period() {
        // The exact JSON the API server receives: camelCase deleteOptions (kube's own evict
        // sends `delete_options`, which is ignored), no gracePeriodSeconds (the fence refuses it).
        assert_eq!(
            eviction("team", "app-1", "u1"),
            serde_json::json!({"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": "app-1", "namespace": "team"},
                "deleteOptions": {"preconditions": {"uid": "u1"}}})
        );
    }

    #[test]
    fn eviction_outcomes_are_the_metric_words() {
        let api = |code: u16| -> Result<(), kube::Error> {
            Err(kube::Error::Api(
                serde_json::from_value(serde_json::json!({"status": "Failure", "code": code,
                    "message": "m", "reason": "r"}))
                .unwrap(),
            ))
        };
        assert_eq!(outcome(&Ok(())), "evicted");
        assert_eq!(outcome(&api(429)), "disruption_budget");
        assert_eq!(outcome(&api(404)), "gone");
        assert_eq!(outcome(&api(409)), "gone");
        assert_eq!(outcome(&api(403)), "failed");
        for word in ["evicted", "disruption_budget", "gone", "failed"] {
            assert!(crate::metrics::EVICTION_OUTCOMES.contains(&word));
        }
    }
}
