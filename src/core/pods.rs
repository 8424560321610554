//! Pods that slipped through: admitted in an opted-in namespace without the pull Secret (the
//! service was down, or a webhook timeout let them through with `failurePolicy: Ignore`). A Pod's
//! `imagePullSecrets` cannot change after admission, so such a Pod pulls without the Secret for
//! its whole life; all the service can do is say so. This decides which Pods those are.

use k8s_openapi::api::core::v1::Pod;

use super::images;
use super::subject::{IdentityScope, Subject};

/// The kubelet's mark on the API server's copy of a static Pod; those may not reference Secrets.
pub(crate) const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// What a Pod of an opted-in namespace is expected to carry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Expected<'a> {
    pub scope: IdentityScope,
    /// The configured `secretName` (per ServiceAccount it is prefixed).
    pub secret_name: &'a str,
    /// With `inject: matchingImages`: the registries the namespace gets; only a Pod with an image
    /// on one of them is expected to carry the Secret. `None`: every Pod is.
    pub only_for_hosts: Option<&'a [String]>,
}

/// The name of the Secret `pod` should list and does not; `None` when it lists it, is not
/// expected to, or no longer matters (finished, being deleted, a mirror Pod).
pub(crate) fn missing_pull_secret(pod: &Pod, expected: &Expected) -> Option<String> {
    let meta = &pod.metadata;
    let spec = pod.spec.as_ref()?;
    let namespace = meta.namespace.as_deref()?;
    if meta.deletion_timestamp.is_some()
        || meta
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
    {
        return None;
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded") | Some("Failed")) {
        return None;
    }
    if let Some(hosts) = expected.only_for_hosts {
        let images = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .filter_map(|c| c.image.as_deref());
        if !images::any_on(images, hosts) {
            return None;
        }
    }
    let service_account = spec
        .service_account_name
        .as_deref()
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let secret = Subject::for_workload(expected.scope, namespace, service_account)
        .secret_name(expected.secret_name);
    let listed = spec
        .image_pull_secrets
        .iter()
        .flatten()
        .any(|r| r.name == secret);
    (!listed).then_some(secret)
}

/// The Event note on such a Pod: what happened and what to do. No Pod is ever changed.
pub(crate) fn advice(secret: &str) -> String {
    format!(
        "this Pod was admitted without imagePullSecrets entry {secret:?} (the service or the \
         admission policy did not patch it: down, or a webhook timeout with failurePolicy \
         Ignore), so the kubelet pulls its images without that credential; a Pod's pull \
         Secrets cannot change: delete the Pod so that its controller recreates it with the \
         Secret, or recreate it yourself"
    )
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

    #[test]
    fn which_pods_lack_their_secret() {
        let ns = Expected {
            scope: IdentityScope::Namespace,
            secret_name: "pull-secret",
            only_for_hosts: None,
        };
        let per_sa = Expected {
            scope: IdentityScope::ServiceAccount,
            ..ns
        };
        let hosts = ["registry.example.com".to_string()];
        let matching = Expected {
            only_for_hosts: Some(&hosts),
            ..ns
        };
        let missing = |s: &str| Some(s.to_string());
        for (what, pod, expected, answer) in [
            ("no list", pod(json!({})), ns, missing("pull-secret")),
            (
                "another Secret only",
                pod(json!({"spec": {"imagePullSecrets": [{"name": "mine"}]}})),
                ns,
                missing("pull-secret"),
            ),
            (
                "listed",
                pod(
                    json!({"spec": {"imagePullSecrets": [{"name": "mine"}, {"name": "pull-secret"}]}}),
                ),
                ns,
                None,
            ),
            (
                "running",
                pod(json!({"status": {"phase": "Running"}})),
                ns,
                missing("pull-secret"),
            ),
            (
                "finished",
                pod(json!({"status": {"phase": "Succeeded"}})),
                ns,
                None,
            ),
            (
                "failed",
                pod(json!({"status": {"phase": "Failed"}})),
                ns,
                None,
            ),
            (
                "being deleted",
                pod(json!({"metadata": {"deletionTimestamp": "2026-12-01T00:00:00Z"}})),
                ns,
                None,
            ),
            (
                "mirror Pod",
                pod(json!({"metadata": {"annotations": {"kubernetes.io/config.mirror": "x"}}})),
                ns,
                None,
            ),
            (
                "per ServiceAccount, default",
                pod(json!({})),
                per_sa,
                missing("default-pull-secret"),
            ),
            (
                "per ServiceAccount, named",
                pod(json!({"spec": {"serviceAccountName": "builder"}})),
                per_sa,
                missing("builder-pull-secret"),
            ),
            (
                "per ServiceAccount, listed",
                pod(json!({"spec": {"serviceAccountName": "builder",
                    "imagePullSecrets": [{"name": "builder-pull-secret"}]}})),
                per_sa,
                None,
            ),
            (
                "matching image",
                pod(json!({})),
                matching,
                missing("pull-secret"),
            ),
            (
                "no matching image",
                pod(json!({"spec": {"containers": [{"name": "c", "image": "nginx"}]}})),
                matching,
                None,
            ),
            (
                "matching init container",
                pod(
                    json!({"spec": {"containers": [{"name": "c", "image": "nginx"}],
                    "initContainers": [{"name": "i", "image": "registry.example.com/init"}]}}),
                ),
                matching,
                missing("pull-secret"),
            ),
        ] {
            assert_eq!(missing_pull_secret(&pod, &expected), answer, "{what}");
            // The Pod watch decodes only what this reads: the same answer from that.
            let slim = serde_json::from_value::<crate::slim::Slim<Pod>>(
                serde_json::to_value(&pod).unwrap(),
            )
            .unwrap()
            .0;
            assert_eq!(
                missing_pull_secret(&slim, &expected),
                answer,
                "{what}, slim"
            );
        }
    }

    #[test]
    fn the_advice_says_what_to_do() {
        let note = advice("pull-secret");
        assert!(note.contains("\"pull-secret\""), "{note}");
        assert!(note.contains("delete the Pod"), "{note}");
        assert!(note.len() < 1000, "Events take 1 kB");
    }
}
