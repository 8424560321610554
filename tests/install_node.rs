//! The install as a user runs it, on the real node: the project's own image (`hack/image`,
//! pushed to the private registry, pulled by the kubelet with credentials), `kubectl apply -k`
//! of the kustomize base, then the Helm chart installed with the helm CLI. Both replicas
//! run as Pods: the `certs` init container, HTTPS probes, the API server calling the webhook
//! through its Service (at the Pods' addresses on the node's bridge: `hack/control-plane`), the
//! Lease hand-over when its holder is deleted, a rolling update, and uninstall.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{json, Value};
use support::install::*;
use support::node::*;
use support::registry::*;
use support::*;

/// A Pod with a pull Secret of its own (so that the API server sends it to the webhook: the
/// shipped matchConditions skip Pods that get the reference from their ServiceAccount).
fn app_pod(name: &str, image: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                 "imagePullSecrets": [{"name": "mine"}],
                 "securityContext": restricted_pod_context(),
                 "containers": [{"name": "app", "image": image, "imagePullPolicy": "Always",
                                 "command": ["/bin/sh", "-c", "cat /hello.txt"],
                                 "securityContext": restricted_container_context()}]}
    })
}

async fn lease_holder(c: &kube::Client) -> Option<String> {
    Api::<Lease>::namespaced(c.clone(), NS)
        .get_opt(NAME)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// Points 2 to 4 on whichever install is running: a Pod patched and pulled with the injected
/// Secret; the Lease holder deleted with admissions running; a rolling update (`restart`)
/// with admissions running.
async fn exercise(
    cp: &ControlPlane,
    c: &kube::Client,
    team: &str,
    late: &str,
    image: &str,
    restart: &dyn Fn(),
) {
    // 2. The namespace opts in; a Pod is patched and its image pulled with the Secret.
    label_namespace(c, team, true).await;
    wait_secret(c, team, "the Secret the installed service made", |_| true).await;
    let ran = run_pod(cp, c, team, app_pod("app", image)).await;
    assert_eq!(pull_secret_names(&ran.pod), ["mine", "pull-secret"]);
    assert!(ran.printed.contains(MARKER), "printed: {}", ran.printed);
    let evs = events(c, team, &ran.name).await;
    assert!(
        evs.iter().any(|e| e.starts_with("Pulled:")),
        "the kubelet pulled it: {evs:?}"
    );
    // A ServiceAccount made now is patched at admission.
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "worker"}})).unwrap();
    let sa = Api::<ServiceAccount>::namespaced(c.clone(), team)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    assert!(sa
        .image_pull_secrets
        .iter()
        .flatten()
        .any(|r| r.name == "pull-secret"));

    // 3. The Pod holding the Lease is deleted: the other replica takes over the refresher, and
    //    admissions never stop.
    let holder = lease_holder(c).await.expect("a replica holds the Lease");
    let holder_before = holder.clone();
    let pods = service_pods(c).await;
    let leader = pods
        .iter()
        .find(|p| holder.starts_with(p.metadata.name.as_deref().unwrap()))
        .unwrap_or_else(|| panic!("the holder {holder} is one of the Pods"));
    let leader_name = leader.metadata.name.clone().unwrap();
    let other = pods
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .find(|n| *n != leader_name)
        .unwrap();
    let admissions = Admissions::start(c, &[team], Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deleted_at = Instant::now();
    Api::<Pod>::namespaced(c.clone(), NS)
        .delete(&leader_name, &DeleteParams::default())
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        let holder = lease_holder(c).await;
        if seen.last() != Some(&holder) {
            seen.push(holder.clone());
        }
        if holder.as_ref().is_some_and(|h| *h != holder_before) {
            break;
        }
        if deleted_at.elapsed() > Duration::from_secs(60) {
            dump_logs(cp);
            panic!("no other replica took the Lease; holders seen: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let hand_over = deleted_at.elapsed();
    let successor = seen.last().cloned().flatten().unwrap();
    eprintln!(
        "Lease: {leader_name} deleted; {successor} holds it {hand_over:?} later (lease duration \
         15 s; the other replica was {other}); holders seen: {seen:?}"
    );
    // The waiting replica watches the Lease and takes it when the holder releases it on its way
    // out; the Pod started in the deleted one's place finds it held.
    if !successor.starts_with(&other) {
        dump_logs(cp);
        panic!("the other replica {other} should take the Lease, not {successor}");
    }
    assert!(
        hand_over < Duration::from_secs(15),
        "hand-over took {hand_over:?}, more than the lease duration"
    );
    // The refresher runs there: a namespace opted in now gets its Secret.
    label_namespace(c, late, true).await;
    wait_secret(c, late, "a Secret made by the new leader", |_| true).await;
    wait_rolled_out(c, "the Deployment back at two Ready replicas").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    admissions.finish("Lease holder deleted").await;

    // 4. A rolling update completes with no admission lost.
    let admissions = Admissions::start(c, &[team], Duration::from_millis(100));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before: Vec<String> = service_pods(c)
        .await
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    let started = Instant::now();
    restart();
    wait_for("the rollout to start", Duration::from_secs(60), || async {
        !service_pods(c)
            .await
            .iter()
            .all(|p| before.contains(p.metadata.name.as_ref().unwrap()))
    })
    .await;
    wait_rolled_out(c, "the rolling update").await;
    eprintln!("rolling update: {:?}", started.elapsed());
    let after: Vec<String> = service_pods(c)
        .await
        .into_iter()
        .map(|p| p.metadata.name.unwrap())
        .collect();
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "every Pod was replaced: {before:?} -> {after:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    admissions.finish("rolling update").await;
    check_running(cp, c).await;
}

/// What is left of the install: objects named like it, cluster-wide and in its namespace.
async fn leftovers(c: &kube::Client) -> Vec<String> {
    let mut left = Vec::new();
    if Api::<MutatingWebhookConfiguration>::all(c.clone())
        .get_opt(NAME)
        .await
        .unwrap()
        .is_some()
    {
        left.push("MutatingWebhookConfiguration".to_string());
    }
    if Api::<ClusterRole>::all(c.clone())
        .get_opt(NAME)
        .await
        .unwrap()
        .is_some()
    {
        left.push("ClusterRole".into());
    }
    if Api::<ClusterRoleBinding>::all(c.clone())
        .get_opt(NAME)
        .await
        .unwrap()
        .is_some()
    {
        left.push("ClusterRoleBinding".into());
    }
    let ns = Api::<Namespace>::all(c.clone()).get_opt(NS).await.unwrap();
    if let Some(ns) = ns.filter(|n| n.metadata.deletion_timestamp.is_none()) {
        left.push(format!("Namespace {}", ns.metadata.name.unwrap()));
        for s in Api::<Secret>::namespaced(c.clone(), NS)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
        {
            left.push(format!("Secret {}", s.metadata.name.unwrap()));
        }
        for l in Api::<Lease>::namespaced(c.clone(), NS)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
        {
            left.push(format!("Lease {}", l.metadata.name.unwrap()));
        }
        for kind in [
            "deployments",
            "services",
            "configmaps",
            "serviceaccounts",
            "poddisruptionbudgets",
            "pods",
        ] {
            let out = Command::new(kubectl_binary())
                .args(["get", kind, "-n", NS, "-o", "name"])
                .env("KUBECONFIG", ControlPlane::get().kubeconfig())
                .output()
                .unwrap();
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                left.push(line.to_string());
            }
        }
    }
    left.sort();
    left
}

/// The order in which the audit log saw webhook configurations and Deployments deleted.
fn deletions(cp: &ControlPlane) -> Vec<String> {
    cp.audit(|e| {
        e["verb"] == "delete"
            && e["stage"] == "ResponseComplete"
            && (e["objectRef"]["resource"] == "mutatingwebhookconfigurations"
                || e["objectRef"]["resource"] == "deployments")
            && e["objectRef"]["name"] == NAME
            && e["responseStatus"]["code"]
                .as_u64()
                .is_some_and(|c| c < 300)
    })
    .iter()
    .map(|e| e["objectRef"]["resource"].as_str().unwrap().to_string())
    .collect()
}

/// Point 6 after either uninstall: what stays in the namespaces the service served. The one
/// opted out before uninstalling has nothing left; the one still opted in keeps its Secret and
/// its ServiceAccounts' references (no one is left to remove them), until deleted by hand.
async fn check_served_namespaces_after_uninstall(c: &kube::Client, kept: &str, released: &str) {
    let kept_secret = get_secret(c, kept).await.expect("the Secret stays");
    assert_eq!(
        kept_secret.metadata.labels.unwrap()["app.kubernetes.io/managed-by"],
        "pull-secret-injector"
    );
    let kept_sa = Api::<ServiceAccount>::namespaced(c.clone(), kept)
        .get("default")
        .await
        .unwrap();
    assert!(kept_sa
        .image_pull_secrets
        .iter()
        .flatten()
        .any(|r| r.name == "pull-secret"));
    assert!(get_secret(c, released).await.is_none());
    let sa = Api::<ServiceAccount>::namespaced(c.clone(), released)
        .get("default")
        .await
        .unwrap();
    assert!(
        !sa.image_pull_secrets
            .iter()
            .flatten()
            .any(|r| r.name == "pull-secret"),
        "opt-out took the reference back"
    );
    // What the README's cleanup command removes.
    Api::<Secret>::namespaced(c.clone(), kept)
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app.kubernetes.io/managed-by=pull-secret-injector"),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_install_runs_on_the_node_and_uninstalls_cleanly() {
    if !tools_present() {
        return;
    }
    let _serial = serial();
    let cp = ControlPlane::with_node();
    let c = cp.client().await;
    let work = tempfile::tempdir().unwrap();
    let rules = format!(
        r#"  - {{namespace: {NS}, repositories: ["{IMAGE_REPOSITORY}"]}}
  - {{namespace: install-ci, serviceAccount: pusher, repositories: ["{IMAGE_REPOSITORY}", "team-a/*"], actions: [pull, push]}}
  - {{namespace: kustomize-team, repositories: ["team-a/*"]}}
  - {{namespace: helm-team, repositories: ["team-a/*"]}}
"#
    );
    let registry =
        PrivateRegistry::start(cp, &c, work.path(), &cp.host_ip(), "install-infra", &rules).await;
    trust_registry(cp, &registry);
    let host = registry.host.clone();
    create_namespace(&c, "install-ci", Default::default()).await;
    let pusher = service_account_token(&c, "install-ci", "pusher", vec![SERVICE.into()]).await;

    // The project's image, built without a container engine and pushed with skopeo.
    let service_image = format!("{host}/{IMAGE_REPOSITORY}:test");
    let built = Instant::now();
    let out = Command::new(repo().join("hack/image"))
        .arg("--out")
        .arg(work.path().join("image.tar"))
        .args(["--name", &service_image])
        .args(["--push", &format!("docker://{service_image}")])
        .args(["--dest-creds", &format!("pusher:{pusher}")])
        .arg("--dest-cert-dir")
        .arg(&registry.cert_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hack/image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("hack/image built and pushed in {:?}", built.elapsed());
    let app_image = format!("{host}/team-a/app:v1");
    registry.push(
        &busybox_image(work.path(), &app_image),
        "team-a/app:v1",
        &format!("pusher:{pusher}"),
    );
    for team in [
        "kustomize-team",
        "kustomize-late",
        "kustomize-released",
        "helm-team",
        "helm-late",
        "helm-released",
    ] {
        create_namespace(&c, team, restricted()).await;
    }

    // ---- kustomize: `kubectl apply -k` of an overlay of the base, as a user writes it. The
    // namespace is made unlabelled: the base's Namespace brings Pod Security `restricted`.
    namespace_with_image_pull_secret(&c, &host, BTreeMap::new()).await;
    // Pod Security `restricted` covers all the hardening but a read-only root filesystem: a
    // policy refuses the service's Pods here without it, for both installs.
    enforce_read_only_root(&c, NS).await;
    let overlay = kustomize_overlay(
        &format!("install-overlay-{}", std::process::id()),
        &repo().join("deploy/kustomize/base"),
        &host,
        "test",
        &|_| {},
    );
    let applied = Instant::now();
    kubectl(cp, &["apply", "-k", overlay.to_str().unwrap()]);
    wait_rolled_out(&c, "both replicas Ready (kustomize)").await;
    assert_restricted_enforced(&c, NS).await;
    assert_restricted_enforced(&c, "kustomize-team").await;
    eprintln!(
        "kustomize: both replicas Ready {:?} after apply",
        applied.elapsed()
    );
    check_running(cp, &c).await;
    let restart = || {
        kubectl(
            cp,
            &[
                "-n",
                NS,
                "patch",
                "deployment",
                NAME,
                "--type=merge",
                "-p",
                r#"{"spec":{"template":{"metadata":{"annotations":{"example.com/restarted":"1"}}}}}"#,
            ],
        );
    };
    exercise(
        cp,
        &c,
        "kustomize-team",
        "kustomize-late",
        &app_image,
        &restart,
    )
    .await;

    // 6. Uninstall: opt one namespace out first (the service deletes its Secret), then the
    //    webhook configuration, then the rest.
    label_namespace(&c, "kustomize-released", true).await;
    wait_secret(&c, "kustomize-released", "its Secret", |_| true).await;
    label_namespace(&c, "kustomize-released", false).await;
    wait_for(
        "the opted-out Secret deleted",
        Duration::from_secs(60),
        || async { get_secret(&c, "kustomize-released").await.is_none() },
    )
    .await;
    kubectl(cp, &["delete", "mutatingwebhookconfiguration", NAME]);
    kubectl(
        cp,
        &[
            "delete",
            "-k",
            overlay.to_str().unwrap(),
            "--wait=true",
            "--ignore-not-found",
        ],
    );
    wait_for("the namespace gone", Duration::from_secs(120), || async {
        Api::<Namespace>::all(c.clone())
            .get_opt(NS)
            .await
            .unwrap()
            .is_none()
    })
    .await;
    assert_eq!(leftovers(&c).await, Vec::<String>::new());
    assert_eq!(
        deletions(cp),
        ["mutatingwebhookconfigurations", "deployments"]
    );
    check_served_namespaces_after_uninstall(&c, "kustomize-team", "kustomize-released").await;
    let _ = std::fs::remove_dir_all(&overlay);
    // With no webhook, Pods are created as they are.
    let pod = create_pod(
        &c,
        "kustomize-team",
        "after",
        json!({"imagePullSecrets": [{"name": "mine"}], "securityContext": restricted_pod_context(),
               "containers": [{"name": "app", "image": "registry.invalid/app:1",
                               "securityContext": restricted_container_context()}]}),
        true,
    )
    .await;
    assert_eq!(pull_secret_names(&pod.pod), ["mine"]);

    // ---- 5. Helm: the chart installed with the helm CLI, the image and config as values.
    // The namespace made as the README's hardened-cluster step makes it for Helm (which
    // cannot label a namespace it creates): Pod Security `restricted` enforced.
    let mut labels = restricted();
    labels.insert(
        "pull-secret-injector.io/inject".to_string(),
        "disabled".to_string(),
    );
    namespace_with_image_pull_secret(&c, &host, labels).await;
    let values = |annotation: &str| {
        json!({
            "image": {"repository": format!("{host}/{IMAGE_REPOSITORY}"), "tag": "test"},
            "imagePullSecrets": [{"name": "registry-creds"}],
            "podAnnotations": {"example.com/revision": annotation},
            "config": {"registries": registry_config(&host)}
        })
        .to_string()
    };
    let chart = repo().join("deploy/helm/pull-secret-injector");
    let notes = helm_release(
        cp,
        &["install", chart.to_str().unwrap(), NS, NAME, &values("1")],
    );
    assert!(
        notes
            .contains("kubectl label namespace <namespace> pull-secret-injector.io/inject=enabled"),
        "helm install prints the NOTES: {notes}"
    );
    wait_rolled_out(&c, "both replicas Ready (Helm)").await;
    assert_restricted_enforced(&c, NS).await;
    assert_restricted_enforced(&c, "helm-team").await;
    check_running(cp, &c).await;
    let restart = || {
        helm_release(
            cp,
            &["upgrade", chart.to_str().unwrap(), NS, NAME, &values("2")],
        );
    };
    exercise(cp, &c, "helm-team", "helm-late", &app_image, &restart).await;
    label_namespace(&c, "helm-released", true).await;
    wait_secret(&c, "helm-released", "its Secret", |_| true).await;
    label_namespace(&c, "helm-released", false).await;
    wait_for(
        "the opted-out Secret deleted",
        Duration::from_secs(60),
        || async { get_secret(&c, "helm-released").await.is_none() },
    )
    .await;
    let before = deletions(cp).len();
    helm_release(cp, &["uninstall", NS, NAME]);
    assert_eq!(
        deletions(cp)[before..],
        ["mutatingwebhookconfigurations", "deployments"],
        "Helm deletes the webhook configuration first"
    );
    wait_for("the Pods gone", Duration::from_secs(120), || async {
        Api::<Pod>::namespaced(c.clone(), NS)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;
    // The namespace was made by `helm install --create-namespace`, not by the chart, so it
    // stays, with what the service and the user made in it.
    assert_eq!(
        leftovers(&c).await,
        [
            "Lease pull-secret-injector",
            "Namespace pull-secret-injector",
            "Secret pull-secret-injector-tls",
            "Secret registry-creds",
            "configmap/kube-root-ca.crt",
            "serviceaccount/default",
            "serviceaccount/image-puller",
        ]
    );
    check_served_namespaces_after_uninstall(&c, "helm-team", "helm-released").await;
    registry.shutdown().await;
}
