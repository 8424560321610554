//! Pods that slipped through admission without the pull Secret and now cannot pull: what to do
//! with one (`remediation.mode: evictStuckPods`). A Pod's `imagePullSecrets` cannot change, so
//! the only way to give it the Secret is a new Pod, made through admission. A Pod a controller
//! recreates (ReplicaSet, StatefulSet, DaemonSet, Job) is evicted through the Eviction API once
//! its namespace's Secret exists, so that the replacement gets the Secret; a bare Pod, or one
//! another kind of owner made, is never evicted (nothing would bring it back), it is told to be
//! recreated. The rules are here, decided from their arguments; the watch and the eviction
//! are in `refresh::slipped`.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::core::{Selector, SelectorExt};

/// The controllers that recreate an evicted Pod, by `apiVersion` and `kind` of the Pod's
/// controller reference.
const RECREATING: [(&str, &str); 4] = [
    ("apps/v1", "ReplicaSet"),
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "DaemonSet"),
    ("batch/v1", "Job"),
];

/// The kubelet's waiting reasons for a container whose image cannot be pulled.
const PULL_FAILING: [&str; 2] = ["ErrImagePull", "ImagePullBackOff"];

/// Namespaces never touched, whatever their labels say.
const NEVER: [&str; 1] = ["kube-system"];

/// What of a Pod the decision reads (`slim` decodes only these, besides what `core::pods`
/// reads).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PodView {
    /// The `kind` of its controller reference, when that controller recreates evicted Pods.
    pub recreated_by: Option<String>,
    /// Whether a container (or init container) waits with `ErrImagePull`/`ImagePullBackOff`.
    pub pull_failing: bool,
    /// Its labels, which PodDisruptionBudgets select by.
    pub labels: BTreeMap<String, String>,
}

impl PodView {
    pub(crate) fn of(pod: &Pod) -> Self {
        let recreated_by = pod
            .metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
            .filter(|o| {
                RECREATING
                    .iter()
                    .any(|(v, k)| o.api_version == *v && o.kind == *k)
            })
            .map(|o| o.kind.clone());
        let status = pod.status.as_ref();
        let pull_failing = status
            .into_iter()
            .flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
            })
            .filter_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.as_deref())
            .any(|r| PULL_FAILING.contains(&r));
        Self {
            recreated_by,
            pull_failing,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
        }
    }
}

/// Where the Pod is and what is known about its namespace.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Situation<'a> {
    /// `remediation.mode: evictStuckPods`.
    pub evict: bool,
    pub namespace: &'a str,
    /// The service's own namespace.
    pub own_namespace: Option<&'a str>,
    /// The namespace is selected and not excluded, as the service sees it now.
    pub opted_in: bool,
    /// The Pod lacks the Secret it should list (`core::pods::missing_pull_secret`).
    pub lacks_secret: bool,
    /// That Secret exists now in the namespace.
    pub secret_exists: bool,
}

/// What is done with one Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Nothing: it has its Secret, pulls fine, remediation is off, or the namespace is not
    /// one to touch.
    Leave,
    /// Stuck, but its namespace's Secret does not exist yet: a replacement would be no better.
    WaitForSecret,
    /// Evict it: its controller (named) recreates it through admission.
    Evict { controller: String },
    /// Stuck with nothing to recreate it: an Event tells to recreate it.
    TellToRecreate,
}

pub(crate) fn decide(pod: &PodView, s: &Situation) -> Decision {
    let untouchable = NEVER.contains(&s.namespace) || s.own_namespace == Some(s.namespace);
    if !s.evict || untouchable || !s.opted_in || !s.lacks_secret || !pod.pull_failing {
        return Decision::Leave;
    }
    if !s.secret_exists {
        return Decision::WaitForSecret;
    }
    match &pod.recreated_by {
        Some(kind) => Decision::Evict {
            controller: kind.clone(),
        },
        None => Decision::TellToRecreate,
    }
}

/// The PodDisruptionBudget that holds an eviction of a Pod with `labels`, if one does: one that
/// selects it and allows no disruption now (or whose status the disruption controller has not
/// computed yet). The Eviction API itself lets a Pending Pod (which a Pod that cannot pull is)
/// go whatever its budgets say; the service holds to them all the same.
pub(crate) fn held_by(
    budgets: &[PodDisruptionBudget],
    labels: &BTreeMap<String, String>,
) -> Option<String> {
    budgets
        .iter()
        .filter(|b| {
            b.spec
                .as_ref()
                .and_then(|s| s.selector.clone())
                .and_then(|s| Selector::try_from(s).ok())
                // An empty selector selects every Pod of the namespace.
                .is_some_and(|s| s.matches(labels))
        })
        .find(|b| {
            let observed = b
                .status
                .as_ref()
                .is_some_and(|s| s.observed_generation >= b.metadata.generation);
            !observed || b.status.as_ref().is_none_or(|s| s.disruptions_allowed < 1)
        })
        .map(|b| b.metadata.name.clone().unwrap_or_default())
}

/// The Event note on a stuck Pod that is not evicted.
pub(crate) fn recreate_advice(secret: &str) -> String {
    format!(
        "this Pod cannot pull its image and lacks imagePullSecrets entry {secret:?}, which now \
         exists; it is not evicted because no ReplicaSet, StatefulSet, DaemonSet or Job would \
         recreate it: recreate it yourself (delete and create it again) so that admission adds \
         the Secret"
    )
}

/// The Event note on an evicted Pod.
pub(crate) fn evicted_note(secret: &str, controller: &str) -> String {
    format!(
        "evicted: it could not pull its image and lacked imagePullSecrets entry {secret:?} \
         (admitted while the service was unavailable); its {controller} recreates it with the \
         Secret"
    )
}

/// A token bucket: at most `per_minute` evictions a minute, `burst` at once. The clock is
/// passed in.
#[derive(Clone, Debug)]
pub(crate) struct Bucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Option<Duration>,
}

impl Bucket {
    pub(crate) fn new(per_minute: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        Self {
            per_second: per_minute / 60.0,
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Takes a token at `now` (time since any fixed start) if one is there.
    pub(crate) fn take(&mut self, now: Duration) -> bool {
        if let Some(last) = self.last {
            let elapsed = now.saturating_sub(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(extra: serde_json::Value) -> Pod {
        let mut base = json!({
            "metadata": {"name": "p", "namespace": "team"},
            "spec": {"containers": [{"name": "c", "image": "registry.example.com/app:1"}]},
            "status": {"phase": "Pending"}
        });
        json_patch::merge(&mut base, &extra);
        serde_json::from_value(base).unwrap()
    }

    fn owner(api_version: &str, kind: &str, controller: bool) -> serde_json::Value {
        json!({"metadata": {"ownerReferences": [{"apiVersion": api_version, "kind": kind,
            "name": "o", "uid": "u", "controller": controller}]}})
    }

    fn waiting(field: &str, reason: &str) -> serde_json::Value {
        json!({"status": {field: [{"name": "c", "image": "i", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": reason}}}]}})
    }

    fn merged(parts: &[serde_json::Value]) -> Pod {
        let mut v = json!({});
        for p in parts {
            json_patch::merge(&mut v, p);
        }
        pod(v)
    }

    #[test]
    fn the_view_reads_the_controller_and_the_waiting_reasons() {
        let stuck = waiting("containerStatuses", "ImagePullBackOff");
        for (what, pod, recreated_by, pull_failing) in [
            ("bare, pending", pod(json!({})), None, false),
            (
                "ReplicaSet, back-off",
                merged(&[owner("apps/v1", "ReplicaSet", true), stuck.clone()]),
                Some("ReplicaSet"),
                true,
            ),
            (
                "StatefulSet, ErrImagePull",
                merged(&[
                    owner("apps/v1", "StatefulSet", true),
                    waiting("containerStatuses", "ErrImagePull"),
                ]),
                Some("StatefulSet"),
                true,
            ),
            (
                "DaemonSet, init container stuck",
                merged(&[
                    owner("apps/v1", "DaemonSet", true),
                    waiting("initContainerStatuses", "ImagePullBackOff"),
                ]),
                Some("DaemonSet"),
                true,
            ),
            (
                "Job",
                merged(&[owner("batch/v1", "Job", true), stuck.clone()]),
                Some("Job"),
                true,
            ),
            (
                "an owner that is not the controller",
                merged(&[owner("apps/v1", "ReplicaSet", false), stuck.clone()]),
                None,
                true,
            ),
            (
                "another controller kind",
                merged(&[owner("example.com/v1", "ReplicaSet", true), stuck.clone()]),
                None,
                true,
            ),
            (
                "a CronJob is not a Job",
                merged(&[owner("batch/v1", "CronJob", true), stuck.clone()]),
                None,
                true,
            ),
            (
                "another waiting reason",
                merged(&[
                    owner("apps/v1", "ReplicaSet", true),
                    waiting("containerStatuses", "ContainerCreating"),
                ]),
                Some("ReplicaSet"),
                false,
            ),
        ] {
            let expected = PodView {
                recreated_by: recreated_by.map(String::from),
                pull_failing,
                labels: BTreeMap::new(),
            };
            assert_eq!(PodView::of(&pod), expected, "{what}");
            // The Pod watch decodes only what is read: the same view from that.
            let slim = serde_json::from_value::<crate::slim::Slim<Pod>>(
                serde_json::to_value(&pod).unwrap(),
            )
            .unwrap()
            .0;
            assert_eq!(PodView::of(&slim), expected, "{what}, slim");
        }
    }

    #[test]
    fn which_pods_are_evicted() {
        let stuck_rs = PodView {
            recreated_by: Some("ReplicaSet".into()),
            pull_failing: true,
            labels: BTreeMap::new(),
        };
        let bare = PodView {
            recreated_by: None,
            ..stuck_rs.clone()
        };
        let pulling = PodView {
            pull_failing: false,
            ..stuck_rs.clone()
        };
        let s = Situation {
            evict: true,
            namespace: "team",
            own_namespace: Some("psi"),
            opted_in: true,
            lacks_secret: true,
            secret_exists: true,
        };
        let evict = Decision::Evict {
            controller: "ReplicaSet".into(),
        };
        for (what, pod, situation, decision) in [
            (
                "stuck, controlled, Secret there",
                &stuck_rs,
                s,
                evict.clone(),
            ),
            ("bare", &bare, s, Decision::TellToRecreate),
            ("not failing to pull", &pulling, s, Decision::Leave),
            (
                "Secret not made yet",
                &stuck_rs,
                Situation {
                    secret_exists: false,
                    ..s
                },
                Decision::WaitForSecret,
            ),
            (
                "bare, Secret not made yet",
                &bare,
                Situation {
                    secret_exists: false,
                    ..s
                },
                Decision::WaitForSecret,
            ),
            (
                "remediation off",
                &stuck_rs,
                Situation { evict: false, ..s },
                Decision::Leave,
            ),
            (
                "remediation off, bare",
                &bare,
                Situation { evict: false, ..s },
                Decision::Leave,
            ),
            (
                "has its Secret (fails for another reason)",
                &stuck_rs,
                Situation {
                    lacks_secret: false,
                    ..s
                },
                Decision::Leave,
            ),
            (
                "namespace not opted in",
                &stuck_rs,
                Situation {
                    opted_in: false,
                    ..s
                },
                Decision::Leave,
            ),
            (
                "kube-system, even if labelled",
                &stuck_rs,
                Situation {
                    namespace: "kube-system",
                    ..s
                },
                Decision::Leave,
            ),
            (
                "the service's own namespace",
                &stuck_rs,
                Situation {
                    namespace: "psi",
                    ..s
                },
                Decision::Leave,
            ),
        ] {
            assert_eq!(decide(pod, &situation), decision, "{what}");
        }
    }

    #[test]
    fn a_budget_that_allows_no_disruption_holds_the_pods_it_selects() {
        let budget = |name: &str, selector: serde_json::Value, allowed: i32, observed: i64| {
            serde_json::from_value::<PodDisruptionBudget>(json!({
                "metadata": {"name": name, "generation": 2},
                "spec": {"selector": selector, "minAvailable": 1},
                "status": {"disruptionsAllowed": allowed, "observedGeneration": observed,
                           "currentHealthy": 0, "desiredHealthy": 1, "expectedPods": 1}
            }))
            .unwrap()
        };
        let app = BTreeMap::from([("app".to_string(), "web".to_string())]);
        let web = json!({"matchLabels": {"app": "web"}});
        let other = json!({"matchLabels": {"app": "db"}});
        let everything = json!({});
        for (what, budgets, held) in [
            ("none", vec![], None),
            ("allows one", vec![budget("b", web.clone(), 1, 2)], None),
            (
                "allows none",
                vec![budget("b", web.clone(), 0, 2)],
                Some("b"),
            ),
            (
                "not observed yet",
                vec![budget("b", web.clone(), 1, 1)],
                Some("b"),
            ),
            ("another app's", vec![budget("b", other, 0, 2)], None),
            (
                "the whole namespace",
                vec![budget("all", everything, 0, 2)],
                Some("all"),
            ),
            (
                "one of two",
                vec![budget("a", web.clone(), 1, 2), budget("b", web, 0, 2)],
                Some("b"),
            ),
        ] {
            assert_eq!(held_by(&budgets, &app).as_deref(), held, "{what}");
        }
    }

    #[test]
    fn the_notes_say_what_to_do() {
        let note = recreate_advice("pull-secret");
        assert!(note.contains("recreate it yourself"), "{note}");
        assert!(note.contains("not evicted"), "{note}");
        assert!(evicted_note("pull-secret", "ReplicaSet").contains("its ReplicaSet recreates"));
        assert!(note.len() < 1000, "Events take 1 kB");
    }

    #[test]
    fn the_bucket_bounds_the_rate() {
        let s = Duration::from_secs;
        let mut b = Bucket::new(6.0, 2); // one every 10 s, two at once
        assert!(b.take(s(0)));
        assert!(b.take(s(0)));
        assert!(!b.take(s(0)), "the burst is spent");
        assert!(b.take(s(10)));
        assert!(!b.take(s(11)));
        // A long pause refills to the burst, no more.
        assert!(b.take(s(1000)));
        assert!(b.take(s(1000)));
        assert!(!b.take(s(1000)));
        // A clock that goes back takes nothing extra.
        assert!(!b.take(s(5)));
    }
}
