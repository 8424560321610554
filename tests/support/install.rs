//! The service installed on the real node, as tests/install_node.rs and tests/release.rs do it:
//! its namespace with the Secret its Pods pull the image with, the config for the harness's
//! private registry, kubectl and Helm, and what proves the install runs (both replicas Ready
//! through HTTPS probes, the TLS Secret and `caBundle`, the Service's endpoints).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{json, Value};

use super::registry::{service_account_token, SERVICE};
use super::{create_namespace, post, pull_secret_names, repo, wait_for, ControlPlane};

pub const NS: &str = "pull-secret-injector";
pub const NAME: &str = "pull-secret-injector";
pub const IMAGE_REPOSITORY: &str = "pull-secret-injector/pull-secret-injector";

/// kubectl of the cluster's own release, built by hack/build-kubernetes with the node.
pub fn kubectl_binary() -> String {
    let path = Command::new(repo().join("hack/build-kubernetes"))
        .args(["path", "kubectl"])
        .output()
        .expect("hack/build-kubernetes path kubectl");
    String::from_utf8_lossy(&path.stdout).trim().to_string()
}

pub fn kubectl(cp: &ControlPlane, args: &[&str]) -> String {
    let out = Command::new(kubectl_binary())
        .args(args)
        .env("KUBECONFIG", cp.kubeconfig())
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn helm_release(cp: &ControlPlane, args: &[&str]) -> String {
    let out = Command::new(repo().join("hack/helm-release"))
        .arg(args[0])
        .arg(cp.kubeconfig())
        .args(&args[1..])
        .output()
        .expect("run hack/helm-release");
    assert!(
        out.status.success(),
        "hack/helm-release {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The config a user writes for this registry: tokens of each namespace's `default`
/// ServiceAccount with the registry's audience.
/// Pod Security Admission's `restricted` level, enforced: on the service's namespace (the
/// kustomize base's Namespace carries it; Helm users label the namespace they create, as the
/// README says) and on every opted-in namespace of this test.
pub fn restricted() -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "pod-security.kubernetes.io/enforce".to_string(),
            "restricted".to_string(),
        ),
        (
            "pod-security.kubernetes.io/enforce-version".to_string(),
            "latest".to_string(),
        ),
    ])
}

/// What `restricted` asks of a Pod and of each container.
pub fn restricted_pod_context() -> Value {
    json!({"runAsNonRoot": true, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}})
}

pub fn restricted_container_context() -> Value {
    json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}})
}

/// The enforcement is on in `ns`: a Pod that breaks the level is refused, so the Pods that
/// run there (the service's own, or the test's) meet it. The Pod is one `baseline` allows (no
/// security context: root allowed, privilege escalation and capabilities left as they are),
/// not a privileged one, which the API server refuses itself (`--allow-privileged` is off)
/// before Pod Security sees it.
pub async fn assert_restricted_enforced(c: &kube::Client, ns: &str) {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "not-restricted"},
        "spec": {"containers": [{"name": "app", "image": "registry.invalid/app:1"}]}});
    let (status, _, text) =
        post(c, &format!("/api/v1/namespaces/{ns}/pods?dryRun=All"), &pod).await;
    // The Status's message, not the body: JSON escapes its quotes.
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|s| s["message"].as_str().map(str::to_owned))
        .unwrap_or_default();
    assert!(
        status == 403 && message.contains("violates PodSecurity \"restricted:latest\""),
        "{ns}: Pod Security `restricted` should refuse a Pod without a restricted security \
         context: {status} {text:.300}"
    );
}

/// Pod Security has no rule for a read-only root filesystem: a ValidatingAdmissionPolicy
/// enforces it on `ns`'s Pods (every container and init container), so that the service's Pods
/// being admitted there proves they run with it. Returns once the API server applies it.
pub async fn enforce_read_only_root(c: &kube::Client, ns: &str) {
    let name = format!("read-only-root-{ns}");
    let every = |list: &str| {
        format!(
            "(!has(object.spec.{list}) || object.spec.{list}.all(c, has(c.securityContext) && \
             has(c.securityContext.readOnlyRootFilesystem) && \
             c.securityContext.readOnlyRootFilesystem))"
        )
    };
    super::apply_untyped(
        c,
        &[
            json!({"apiVersion": "admissionregistration.k8s.io/v1",
                   "kind": "ValidatingAdmissionPolicy", "metadata": {"name": name},
                   "spec": {"failurePolicy": "Fail",
                            "matchConstraints": {"resourceRules": [{"apiGroups": [""],
                                "apiVersions": ["v1"], "operations": ["CREATE"],
                                "resources": ["pods"]}]},
                            "validations": [{
                                "expression": format!("{} && {}", every("containers"), every("initContainers")),
                                "message": "every container must set securityContext.readOnlyRootFilesystem: true"}]}}),
            json!({"apiVersion": "admissionregistration.k8s.io/v1",
                   "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": name},
                   "spec": {"policyName": name, "validationActions": ["Deny"],
                            "matchResources": {"namespaceSelector": {"matchLabels":
                                {"kubernetes.io/metadata.name": ns}}}}}),
        ],
    )
    .await;
    // A Pod `restricted` allows, with a writable root filesystem: refused once in force.
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "writable-root"},
        "spec": {"securityContext": restricted_pod_context(),
                 "containers": [{"name": "app", "image": "registry.invalid/app:1",
                                 "securityContext": restricted_container_context()}]}});
    wait_for(
        "the read-only root policy in force",
        Duration::from_secs(30),
        || async {
            let (status, _, text) =
                post(c, &format!("/api/v1/namespaces/{ns}/pods?dryRun=All"), &pod).await;
            // A policy's denial is 422 Invalid unless the validation names a reason.
            let refused = status == 422 && text.contains("readOnlyRootFilesystem: true");
            if !refused {
                eprintln!("read-only root policy not yet in force: {status} {text:.300}");
            }
            refused
        },
    )
    .await;
}

pub fn registry_config(host: &str) -> Value {
    json!([{"host": host, "kubernetes": {"serviceAccount": "default", "audience": SERVICE,
            "expirationSeconds": 600, "username": "k8s"}}])
}

/// The service's own namespace with the Secret its Pods pull the image with (the namespace is
/// never injected into): a token of a ServiceAccount there, which the token server's rules let
/// pull `pull-secret-injector/*`.
pub async fn namespace_with_image_pull_secret(
    c: &kube::Client,
    host: &str,
    labels: BTreeMap<String, String>,
) {
    if Api::<Namespace>::all(c.clone())
        .get_opt(NS)
        .await
        .unwrap()
        .is_none()
    {
        create_namespace(c, NS, labels).await;
    }
    let token = service_account_token(c, NS, "image-puller", vec![SERVICE.into()]).await;
    let auth = base64_encode(&format!("k8s:{token}"));
    let config = json!({"auths": {host: {"username": "k8s", "password": token, "auth": auth}}});
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "registry-creds"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config.to_string()}
    }))
    .unwrap();
    Api::<Secret>::namespaced(c.clone(), NS)
        .patch(
            "registry-creds",
            &PatchParams::apply("install-test").force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
}

pub fn base64_encode(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Both replicas of the Deployment up to date and Ready, and no other Pod of it left.
pub async fn wait_rolled_out(c: &kube::Client, what: &str) {
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(c.clone(), NS);
    wait_for(what, Duration::from_secs(300), || async {
        let Some(d) = deployments.get_opt(NAME).await.ok().flatten() else {
            return false;
        };
        let status = d.status.clone().unwrap_or_default();
        let generation = d.metadata.generation.unwrap_or(0);
        let listed = pods
            .list(&ListParams::default().labels("app.kubernetes.io/name=pull-secret-injector"))
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        status.observed_generation.unwrap_or(0) >= generation
            && status.updated_replicas == Some(2)
            && status.ready_replicas == Some(2)
            && status.replicas == Some(2)
            && listed == 2
    })
    .await;
}

pub async fn service_pods(c: &kube::Client) -> Vec<Pod> {
    Api::<Pod>::namespaced(c.clone(), NS)
        .list(&ListParams::default().labels("app.kubernetes.io/name=pull-secret-injector"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// Point 1: both replicas Ready through their HTTPS probes, the `certs` init container made
/// the TLS Secret and set `caBundle`, and the Service's endpoints are the Pods on the node's
/// bridge (addresses the harness made, never this machine's own).
pub async fn check_running(cp: &ControlPlane, c: &kube::Client) {
    let pods = service_pods(c).await;
    assert_eq!(pods.len(), 2);
    let node: Value =
        serde_json::from_str(&std::fs::read_to_string(cp.dir.join("node.json")).unwrap()).unwrap();
    let n = node["netns"].as_str().unwrap().trim_start_matches("psi-");
    let pod_network = format!("10.214.{n}.");
    for pod in &pods {
        let spec = pod.spec.as_ref().unwrap();
        let status = pod.status.as_ref().unwrap();
        let name = pod.metadata.name.as_deref().unwrap();
        assert!(
            status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            "{name} is Ready"
        );
        let probe = spec.containers[0].readiness_probe.as_ref().unwrap();
        assert_eq!(
            probe.http_get.as_ref().unwrap().scheme.as_deref(),
            Some("HTTPS")
        );
        let init = &status.init_container_statuses.as_ref().unwrap()[0];
        assert_eq!(init.name, "certs");
        let done = init
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .expect("certs ran");
        assert_eq!(done.exit_code, 0, "certs succeeded in {name}");
        let ip = status.pod_ip.as_deref().unwrap();
        assert!(
            ip.starts_with(&pod_network),
            "{name} runs at {ip}, on the node's bridge"
        );
        assert_eq!(
            spec.image_pull_secrets.as_ref().unwrap()[0].name,
            "registry-creds"
        );
    }
    let tls = Api::<Secret>::namespaced(c.clone(), NS)
        .get("pull-secret-injector-tls")
        .await
        .expect("the certs init container made the TLS Secret");
    assert_eq!(tls.type_.as_deref(), Some("kubernetes.io/tls"));
    let ca = tls.data.as_ref().unwrap()["ca.crt"].0.clone();
    let hook = Api::<MutatingWebhookConfiguration>::all(c.clone())
        .get(NAME)
        .await
        .unwrap();
    let webhook = &hook.webhooks.as_ref().unwrap()[0];
    assert_eq!(
        webhook.client_config.ca_bundle.as_ref().unwrap().0,
        ca,
        "caBundle is the TLS Secret's CA"
    );
    let service = webhook.client_config.service.as_ref().expect("by Service");
    assert_eq!(
        (service.namespace.as_str(), service.name.as_str()),
        (NS, NAME)
    );
    assert!(webhook.client_config.url.is_none());
    // The Service's endpoints: both Pods, Ready. The EndpointSlice controller follows the
    // Pods' readiness a moment later, so it is waited for (on a busy machine, seconds).
    let mut ips: Vec<String> = pods
        .iter()
        .map(|p| p.status.as_ref().unwrap().pod_ip.clone().unwrap())
        .collect();
    ips.sort();
    let slices = Api::<EndpointSlice>::namespaced(c.clone(), NS);
    let selector = ListParams::default().labels(&format!("kubernetes.io/service-name={NAME}"));
    let ready_endpoints = || async {
        let mut ready: Vec<String> = slices
            .list(&selector)
            .await
            .unwrap()
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .flat_map(|e| e.addresses.clone())
            .collect();
        ready.sort();
        ready
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut ready = ready_endpoints().await;
    while ready != ips && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ready = ready_endpoints().await;
    }
    assert_eq!(ready, ips, "the Service's ready endpoints are the two Pods");
}

pub async fn label_namespace(c: &kube::Client, ns: &str, opted_in: bool) {
    let value = if opted_in {
        json!("enabled")
    } else {
        Value::Null
    };
    Api::<Namespace>::all(c.clone())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"pull-secret-injector.io/inject": value}}}),
            ),
        )
        .await
        .unwrap();
}

/// The service's Pods' logs, as the kubelet keeps them, for a failure's message.
pub fn dump_logs(cp: &ControlPlane) {
    let logs = cp.dir.join("node/pod-logs");
    for pod in std::fs::read_dir(&logs).into_iter().flatten().flatten() {
        if !pod
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{NS}_"))
        {
            continue;
        }
        for container in std::fs::read_dir(pod.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for log in std::fs::read_dir(container.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let text = std::fs::read_to_string(log.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                eprintln!("== {}:", log.path().display());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A Pod with a pull Secret of its own (so that the API server sends it to the webhook: the
/// shipped matchConditions skip Pods that get the reference from their ServiceAccount), meeting
/// Pod Security `restricted`.
pub fn probe_pod(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                 "imagePullSecrets": [{"name": "mine"}],
                 "securityContext": restricted_pod_context(),
                 "containers": [{"name": "app", "image": "registry.invalid/app:1",
                                 "command": ["/bin/sh", "-c", "true"],
                                 "securityContext": restricted_container_context()}]}
    })
}

/// Pod creations (dry runs: they go through the whole admission chain, webhook included, and
/// nothing is scheduled) one after another, in each of `namespaces` in turn, until stopped: how
/// many, and each that failed or came back without the Secret.
pub struct Admissions {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>)>,
}

impl Admissions {
    pub fn start(c: &kube::Client, namespaces: &[&str], every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let namespaces: Vec<String> = namespaces.iter().map(|n| n.to_string()).collect();
        let (c, s) = (c.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let (mut count, mut lost) = (0, Vec::new());
            while !s.load(Ordering::SeqCst) {
                let ns = &namespaces[count % namespaces.len()];
                count += 1;
                let (status, warnings, text) = post(
                    &c,
                    &format!("/api/v1/namespaces/{ns}/pods?dryRun=All"),
                    &probe_pod(&format!("probe-{count}")),
                )
                .await;
                let patched = serde_json::from_str::<Pod>(&text)
                    .ok()
                    .map(|p| pull_secret_names(&p).contains(&"pull-secret".to_string()))
                    .unwrap_or(false);
                if !status.is_success() || !patched {
                    lost.push(format!(
                        "#{count} in {ns}: {status} {warnings:?} {text:.200}"
                    ));
                }
                tokio::time::sleep(every).await;
            }
            (count, lost)
        });
        Self { stop, task }
    }

    pub async fn finish(self, what: &str) {
        self.stop.store(true, Ordering::SeqCst);
        let (count, lost) = self.task.await.unwrap();
        eprintln!("{what}: {count} admissions, {} lost", lost.len());
        assert!(count > 10, "{what}: only {count} admissions were tried");
        assert!(lost.is_empty(), "{what}: admissions lost: {lost:#?}");
    }
}

/// A kustomize overlay of `base` (a checkout's `deploy/kustomize/base`) as a user writes it:
/// the image from the harness's registry at `tag`, the Secret the Pods pull it with, the
/// config's registries for that registry (`edit` may change the config further), and the
/// self-fencing policy's audiences following them. It sits in this checkout's target directory
/// (kustomize takes other kustomizations by relative path only); returns its directory.
pub fn kustomize_overlay(
    name: &str,
    base: &Path,
    host: &str,
    tag: &str,
    edit: &dyn Fn(&mut Value),
) -> PathBuf {
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let tmp = match tmp.starts_with(repo()) {
        true => tmp,
        // CARGO_TARGET_DIR elsewhere: the checkout's own (ignored) target directory.
        false => repo().join("target/tmp"),
    };
    let overlay = tmp.join(name);
    std::fs::create_dir_all(&overlay).unwrap();
    let mut config: Value = serde_yaml::from_str(
        serde_yaml::from_str::<Value>(
            &std::fs::read_to_string(base.join("configmap.yaml")).unwrap(),
        )
        .unwrap()["data"]["config.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let base = relative_path(&overlay, base);
    config["registries"] = registry_config(host);
    edit(&mut config);
    std::fs::write(
        overlay.join("kustomization.yaml"),
        serde_yaml::to_string(&json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [base],
            "images": [{"name": "pull-secret-injector", "newName": format!("{host}/{IMAGE_REPOSITORY}"), "newTag": tag}],
            "patches": [
                {"target": {"kind": "Deployment", "name": NAME},
                 "patch": serde_json::to_string(&json!([{"op": "add", "path": "/spec/template/spec/imagePullSecrets",
                                                          "value": [{"name": "registry-creds"}]}])).unwrap()},
                {"target": {"kind": "ConfigMap", "name": NAME},
                 "patch": serde_json::to_string(&json!([{"op": "replace", "path": "/data/config.yaml",
                                                          "value": serde_yaml::to_string(&config).unwrap()}])).unwrap()},
                // The self-fencing policy's audiences follow the registries, as the base says.
                {"target": {"kind": "ValidatingAdmissionPolicy", "name": format!("{NAME}-fence")},
                 "patch": serde_json::to_string(&json!([{"op": "test", "path": "/spec/variables/0/name", "value": "audiences"},
                                                         {"op": "replace", "path": "/spec/variables/0/expression",
                                                          "value": json!([SERVICE]).to_string()}])).unwrap()}
            ]
        }))
        .unwrap(),
    )
    .unwrap();
    overlay
}

/// `to` relative to the directory `from` (both absolute, symlinks resolved where they exist).
fn relative_path(from: &Path, to: &Path) -> String {
    let from = from.canonicalize().unwrap_or_else(|_| from.to_path_buf());
    let to = to.canonicalize().unwrap_or_else(|_| to.to_path_buf());
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let ups = from.components().count() - common;
    let rest: PathBuf = to.components().skip(common).collect();
    format!("{}{}", "../".repeat(ups), rest.display())
}

/// The kinds an install is made of (the charts' and kustomize bases' objects, and what a
/// user's overlay may add), as `kubectl get` names them.
const INSTALL_KINDS: &str = "serviceaccount,role,rolebinding,clusterrole,clusterrolebinding,\
configmap,service,deployment,poddisruptionbudget,networkpolicy,\
validatingadmissionpolicy,validatingadmissionpolicybinding,mutatingwebhookconfiguration";

/// `Kind/name` of an object when it is part of the install: a kind of [`INSTALL_KINDS`], named
/// after the service, in its namespace or cluster-scoped.
fn install_object(o: &Value) -> Option<String> {
    let kind = o["kind"].as_str()?;
    let name = o["metadata"]["name"].as_str()?;
    let ns = o["metadata"]["namespace"].as_str();
    let kinds: Vec<&str> = INSTALL_KINDS.split(',').collect();
    (kinds.contains(&kind.to_lowercase().as_str())
        && name.starts_with(NAME)
        && ns.is_none_or(|n| n == NS))
    .then(|| format!("{kind}/{name}"))
}

/// What is installed now: each object of [`INSTALL_KINDS`] named after the service.
pub fn installed_objects(cp: &ControlPlane) -> Vec<String> {
    let listed: Value = serde_json::from_str(&kubectl(
        cp,
        &["get", INSTALL_KINDS, "--all-namespaces", "-o", "json"],
    ))
    .unwrap();
    let mut found: Vec<String> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(install_object)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The same for a rendered YAML stream (`helm template`, `kubectl kustomize`): what an install
/// of it should leave, no more.
pub fn rendered_objects(yaml: &str) -> Vec<String> {
    use serde::Deserialize;
    let mut found: Vec<String> = serde_yaml::Deserializer::from_str(yaml)
        .filter_map(|doc| Value::deserialize(doc).ok())
        .filter(|o| !o.is_null())
        .filter_map(|o| install_object(&o))
        .collect();
    found.sort();
    found.dedup();
    found
}
