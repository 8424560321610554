//! A real node pulls with the Secret the service made. `hack/control-plane up --node` runs a
//! kubelet of the same release, containerd and CNI bridge networking in a network namespace of
//! its own; the private registry (distribution with token auth against `token-server`) listens
//! on the host side of the node's link. The Pods carry no `imagePullSecrets` and no annotation:
//! the webhook adds the reference, the kubelet hands the Secret's credential to containerd,
//! the token server checks it against the API server's keys and its rules.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use k8s_openapi::api::core::v1::Secret;
use support::node::*;
use support::registry::*;
use support::*;

fn uid(secret: &Secret) -> String {
    secret.metadata.uid.clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubelet_pulls_with_the_injected_secret_and_only_with_it() {
    if !tools_present() {
        return;
    }
    let _serial = serial();
    let cp = ControlPlane::with_node();
    let c = cp.client().await;
    let work = tempfile::tempdir().unwrap();
    let rules = r#"  - {namespace: node-team-a, repositories: ["team-a/*"]}
  - {namespace: node-ci, serviceAccount: pusher, repositories: ["team-a/*"], actions: [pull, push]}
"#;
    let registry =
        PrivateRegistry::start(cp, &c, work.path(), &cp.host_ip(), "node-infra", rules).await;
    trust_registry(cp, &registry);
    let host = registry.host.clone();
    let image = format!("{host}/team-a/app:v1");

    // 1. An image built here, pushed by an identity the rules allow to push.
    create_namespace(&c, "node-ci", Default::default()).await;
    let pusher = service_account_token(&c, "node-ci", "pusher", vec![SERVICE.into()]).await;
    registry.push(
        &busybox_image(work.path(), &image),
        "team-a/app:v1",
        &format!("pusher:{pusher}"),
    );

    // The service, with tokens of `default` as the registry password; a 10-minute token (the
    // API server's minimum) renewed after 10 s, so that the test sees a renewal.
    let entry = format!(
        "  - host: \"{host}\"\n    kubernetes: {{serviceAccount: default, audience: {SERVICE}, \
         expirationSeconds: 600, username: k8s}}\n"
    );
    let mut inj = Injector::start_with("node", &entry, "refresh: {renewBefore: 9m50s}\n").await;
    let team_a = inj.namespace("team-a", true).await;
    let team_b = inj.namespace("team-b", true).await;
    let plain = inj.namespace("plain", false).await;
    wait_secret(&c, &team_a, "team-a's Secret", |_| true).await;

    // 2. No imagePullSecrets, no annotation, imagePullPolicy Always: it runs and prints the
    // file from the image.
    let ran = run_pod(cp, &c, &team_a, app_pod("app", &image, "Always")).await;
    assert_eq!(pull_secret_names(&ran.pod), ["pull-secret"]);
    assert!(
        ran.printed.contains(MARKER),
        "the container printed: {}",
        ran.printed
    );
    let evs = events(&c, &team_a, &ran.name).await;
    assert!(
        evs.iter().any(|e| e.starts_with("Pulled:")),
        "the kubelet pulled the image: {evs:?}"
    );

    // 3. The same Pod where the namespace did not opt in: no credential, the registry refuses.
    create(&c, &plain, app_pod("app", &image, "Always")).await;
    let evs = wait_pull_refused(&c, &plain, "app").await;
    assert!(
        evs.iter().any(|e| e.contains("401 Unauthorized")),
        "the registry's refusal: {evs:?}"
    );
    // An opted-in namespace whose identity the token server's rules do not allow: it has a
    // valid credential, which is granted nothing.
    wait_secret(&c, &team_b, "team-b's Secret", |_| true).await;
    create(&c, &team_b, app_pod("app", &image, "Always")).await;
    let evs = wait_pull_refused(&c, &team_b, "app").await;
    assert!(
        evs.iter()
            .any(|e| e.contains("insufficient_scope") || e.contains("authorization failed")),
        "the registry's refusal: {evs:?}"
    );

    // 4. After a renewal (in place: same Secret, same UID, another token) a new Pod pulls.
    let before = get_secret(&c, &team_a).await.unwrap();
    let renewed = wait_secret(&c, &team_a, "a renewed credential", |s| {
        password(s, &host) != password(&before, &host)
    })
    .await;
    assert_eq!(
        uid(&renewed),
        uid(&before),
        "the Secret was updated in place"
    );
    let ran = run_pod(cp, &c, &team_a, app_pod("app-2", &image, "Always")).await;
    assert!(ran.printed.contains(MARKER));

    // The node has the image now. With IfNotPresent the kubelet lets a Pod use that copy only
    // if it presents the Secret the image was pulled with (KEP-2535): team-a's Pod does, by
    // name and UID, after a renewal too; the namespace without the Secret must pull, and
    // cannot.
    wait_secret(&c, &team_a, "another renewal", |s| {
        password(s, &host) != password(&renewed, &host)
    })
    .await;
    let ran = run_pod(cp, &c, &team_a, app_pod("app-3", &image, "IfNotPresent")).await;
    assert!(ran.printed.contains(MARKER));
    let evs = events(&c, &team_a, &ran.name).await;
    eprintln!("{team_a}/app-3: {evs:#?}");
    assert!(
        evs.iter().any(|e| e.contains("already present on machine"))
            && !evs.iter().any(|e| e.starts_with("Pulling:")),
        "started from the node's copy: {evs:?}"
    );
    create(&c, &plain, app_pod("app-3", &image, "IfNotPresent")).await;
    let evs = wait_pull_refused(&c, &plain, "app-3").await;
    assert!(
        evs.iter().any(|e| e.contains("401 Unauthorized")),
        "the node's copy was not handed out without the Secret: {evs:?}"
    );

    inj.cleanup().await;
    registry.shutdown().await;
}

/// The password stored for `host` in a pull Secret.
fn password(secret: &Secret, host: &str) -> String {
    docker_config(secret)["auths"][host]["password"]
        .as_str()
        .expect("password")
        .to_string()
}

/// Policy mode on the real node: a Pod created after its namespace's label but before the
/// Secret exists (here the service is not even running yet) references a Secret that is not
/// there; the kubelet pulls without it and is refused, and its retries (image pull backoff)
/// pull once the refresher has made the Secret. No webhook is registered in this test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_policy_mode_a_pod_created_before_its_secret_starts_once_the_secret_exists() {
    if !tools_present() {
        return;
    }
    let _serial = serial();
    let cp = ControlPlane::with_node();
    let c = cp.client().await;
    let work = tempfile::tempdir().unwrap();
    let ns = "nodepol-team";
    let (registry, host, image) = registry_with_app(cp, &c, work.path(), "nodepol").await;

    let policies = shipped_admission_policies(None);
    apply_untyped(&c, &policies).await;
    let labels = std::collections::BTreeMap::from([
        (
            "pull-secret-injector.io/inject".to_string(),
            "enabled".to_string(),
        ),
        ("e2e-run".to_string(), "nodepol".to_string()),
    ]);
    create_namespace(&c, ns, labels).await;
    wait_for(
        "the policies applied",
        std::time::Duration::from_secs(30),
        || async {
            let pod = create_pod(&c, ns, "probe", serde_json::json!({}), true)
                .await
                .pod;
            pull_secret_names(&pod) == ["pull-secret"]
        },
    )
    .await;

    // 1. Labelled, no Secret yet: the Pod references it, the kubelet pulls without it.
    let pod = create(&c, ns, app_pod("early", &image, "Always")).await;
    assert_eq!(pull_secret_names(&pod), ["pull-secret"]);
    let evs = wait_pull_refused(&c, ns, "early").await;
    assert!(
        evs.iter().any(|e| e.contains("401 Unauthorized")),
        "pulled without a credential and refused: {evs:?}"
    );
    assert!(get_secret(&c, ns).await.is_none());

    // 2. The service starts; its refresher makes the Secret; the kubelet's next retry pulls.
    let entry = format!(
        "  - host: \"{host}\"\n    kubernetes: {{serviceAccount: default, audience: {SERVICE}, \
         expirationSeconds: 600, username: k8s}}\n"
    );
    let started = std::time::Instant::now();
    let inj =
        Injector::start_without_webhook("nodepol", &entry, "admission: {mode: policy}\n").await;
    wait_secret(&c, ns, "made by the refresher", |_| true).await;
    let secret_after = started.elapsed();
    let printed = wait_succeeded(cp, &c, ns, "early").await;
    eprintln!(
        "policy mode on the node: Secret {secret_after:?} after the service started; the early Pod ran {:?} after that",
        started.elapsed() - secret_after
    );
    assert!(printed.contains(MARKER), "the container printed: {printed}");
    let evs = events(&c, ns, "early").await;
    assert!(
        evs.iter().any(|e| e.starts_with("Pulled:")),
        "the kubelet pulled on a retry: {evs:?}"
    );

    delete_untyped(&c, &policies).await;
    // The API server drops deleted policies from its admission chain a moment later: the next
    // test (a service that is down, Pods admitted without the Secret) must not meet them. The
    // probe lists a Secret of its own, so that it does not take the ServiceAccount's list.
    wait_for(
        "the policies no longer applied",
        std::time::Duration::from_secs(30),
        || async {
            let own = serde_json::json!({"imagePullSecrets": [{"name": "own"}]});
            let pod = create_pod(&c, ns, "probe", own, true).await.pod;
            pull_secret_names(&pod) == ["own"]
        },
    )
    .await;
    let _ = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(c.clone())
        .delete(ns, &Default::default())
        .await;
    inj.cleanup().await;
    registry.shutdown().await;
}

/// A Deployment of `app`'s image whose container sleeps: Running once pulled.
fn deployment(name: &str, image: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                   "spec": {"terminationGracePeriodSeconds": 0,
                            "containers": [{"name": "app", "image": image,
                                            "imagePullPolicy": "Always",
                                            "command": ["/bin/busybox", "sleep", "3600"]}]}}}
    })
}

/// The Pods of Deployment `app` (by its label), not being deleted.
async fn pods_of(c: &kube::Client, ns: &str, app: &str) -> Vec<k8s_openapi::api::core::v1::Pod> {
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c.clone(), ns)
        .list(&kube::api::ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// The one Pod of Deployment `app`, once there is one.
async fn wait_pod_of(c: &kube::Client, ns: &str, app: &str) -> k8s_openapi::api::core::v1::Pod {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(p) = pods_of(c, ns, app).await.into_iter().next() {
            return p;
        }
        assert!(std::time::Instant::now() < deadline, "no Pod of {ns}/{app}");
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
}

fn metric(text: &str, line: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `remediation.mode: evictStuckPods` on the real node: Pods created while the service is down
/// are admitted without the Secret and cannot pull. Once the service is back and the Secret
/// exists, the Deployment's Pod is evicted and its replacement, admitted with the Secret, runs;
/// a Deployment whose PodDisruptionBudget allows no disruption keeps its Pod; a bare Pod is
/// never evicted and gets an Event saying to recreate it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_stuck_without_the_secret_are_evicted_when_a_controller_recreates_them() {
    if !tools_present() {
        return;
    }
    let _serial = serial();
    let cp = ControlPlane::with_node();
    let c = cp.client().await;
    let work = tempfile::tempdir().unwrap();
    let ns = "nodeev-team";
    let (registry, host, image) = registry_with_app(cp, &c, work.path(), "nodeev").await;
    let entry = format!(
        "  - host: \"{host}\"\n    kubernetes: {{serviceAccount: default, audience: {SERVICE}, \
         expirationSeconds: 600, username: k8s}}\n"
    );
    let extra = "remediation: {mode: evictStuckPods, maxEvictionsPerMinute: 30}\n";
    let mut inj = Injector::start_with("nodeev", &entry, extra).await;
    let webhook = "psi-nodeev";
    // 1. The service goes down (its webhook stays registered, failurePolicy Ignore): the
    // namespace opts in and its workloads are created without the Secret.
    inj.stop().await;
    let team = inj.namespace("team", true).await;
    assert_eq!(team, ns);
    let apps = |path: &str| format!("/apis/apps/v1/namespaces/{ns}/{path}");
    for name in ["app", "held"] {
        let (status, _, text) = post(&c, &apps("deployments"), &deployment(name, &image)).await;
        assert!(status.is_success(), "{status} {text}");
    }
    let pdb = serde_json::json!({"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "held"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "held"}}}});
    let (status, _, text) = post(
        &c,
        &format!("/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets"),
        &pdb,
    )
    .await;
    assert!(status.is_success(), "{status} {text}");
    let mut bare = app_pod("bare", &image, "Always");
    bare["spec"]["containers"][0]["command"] = serde_json::json!(["/bin/busybox", "sleep", "3600"]);
    create(&c, ns, bare).await;
    let stuck_app = wait_pod_of(&c, ns, "app").await;
    let stuck_held = wait_pod_of(&c, ns, "held").await;
    for pod in [&stuck_app, &stuck_held] {
        assert!(
            pull_secret_names(pod).is_empty(),
            "admitted without the Secret"
        );
        let evs = wait_pull_refused(&c, ns, &pod.metadata.name.clone().unwrap()).await;
        assert!(
            evs.iter().any(|e| e.contains("401 Unauthorized")),
            "{evs:?}"
        );
    }
    wait_pull_refused(&c, ns, "bare").await;
    assert!(
        get_secret(&c, ns).await.is_none(),
        "no Secret while the service is down"
    );

    // 2. The service is back (on another port: its webhook points there again).
    inj.run().await;
    let selector = serde_json::json!({"matchLabels": {"pull-secret-injector.io/inject": "enabled", "e2e-run": "nodeev"}});
    inj.register_webhook_for(webhook, selector, &["pods", "serviceaccounts"])
        .await;
    wait_for(
        "the webhook active again",
        std::time::Duration::from_secs(30),
        || async {
            let probe = serde_json::json!({"imagePullSecrets": [{"name": "x"}]});
            let pod = create_pod(&c, ns, "probe", probe, true).await.pod;
            pull_secret_names(&pod).contains(&"pull-secret".to_string())
        },
    )
    .await;
    wait_secret(&c, ns, "made once the service is back", |_| true).await;
    // The Deployment's stuck Pod is evicted; its replacement carries the Secret and runs.
    let app_uid = stuck_app.metadata.uid.clone().unwrap();
    wait_for(
        "app's replacement running with the Secret",
        std::time::Duration::from_secs(180),
        || async {
            pods_of(&c, ns, "app").await.iter().any(|p| {
                p.metadata.uid.as_deref() != Some(&app_uid)
                    && pull_secret_names(p) == ["pull-secret"]
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
        },
    )
    .await;
    let old = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c.clone(), ns)
        .get_opt(&stuck_app.metadata.name.clone().unwrap())
        .await
        .unwrap();
    assert!(
        old.is_none_or(|p| p.metadata.deletion_timestamp.is_some()),
        "the stuck Pod was evicted"
    );
    let evs = events(&c, ns, &stuck_app.metadata.name.clone().unwrap()).await;
    assert!(
        evs.iter()
            .any(|e| e.starts_with("EvictedWithoutPullSecret:")),
        "{evs:?}"
    );
    // The budget allows no disruption: held's Pod stays, its evictions were refused.
    wait_for(
        "an eviction held by the budget",
        std::time::Duration::from_secs(60),
        || async {
            metric(
                &inj.metrics().await,
                "pull_secret_injector_pod_evictions_total{outcome=\"disruption_budget\"} ",
            ) >= 1.0
        },
    )
    .await;
    let held = pods_of(&c, ns, "held").await;
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].metadata.uid, stuck_held.metadata.uid, "held stays");
    // The bare Pod: left alone, told to be recreated.
    let bare = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c.clone(), ns)
        .get("bare")
        .await
        .unwrap();
    assert!(
        bare.metadata.deletion_timestamp.is_none(),
        "a bare Pod is never evicted"
    );
    wait_for(
        "the bare Pod's Event",
        std::time::Duration::from_secs(30),
        || async {
            events(&c, ns, "bare")
                .await
                .iter()
                .any(|e| e.starts_with("RecreatePod:") && e.contains("recreate it yourself"))
        },
    )
    .await;
    let text = inj.metrics().await;
    eprintln!(
        "evictions: {}",
        text.lines()
            .filter(|l| l.starts_with("pull_secret_injector_pod_evictions_total"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    assert_eq!(
        metric(
            &text,
            "pull_secret_injector_pod_evictions_total{outcome=\"failed\"} "
        ),
        0.0
    );
    assert!(
        metric(
            &text,
            "pull_secret_injector_pod_evictions_total{outcome=\"evicted\"} "
        ) >= 1.0
    );
    assert_eq!(
        metric(&text, "pull_secret_injector_recreate_pod_events_total "),
        1.0
    );

    inj.cleanup().await;
    registry.shutdown().await;
}

/// `serviceAccounts: never` (the `pods-only` overlay, docs/gitops.md): the webhook registered
/// for Pods alone patches the Pod, the kubelet pulls with the Secret, and the Pod's
/// ServiceAccount is never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_pods_only_mode_the_pod_pulls_and_its_service_account_is_untouched() {
    use k8s_openapi::api::core::v1::ServiceAccount;
    if !tools_present() {
        return;
    }
    let _serial = serial();
    let cp = ControlPlane::with_node();
    let c = cp.client().await;
    let work = tempfile::tempdir().unwrap();
    let (registry, host, image) = registry_with_app(cp, &c, work.path(), "nodepo").await;

    let entry = format!(
        "  - host: \"{host}\"\n    kubernetes: {{serviceAccount: default, audience: {SERVICE}, \
         expirationSeconds: 600, username: k8s}}\n"
    );
    let mut inj =
        Injector::start_for("nodepo", &entry, "serviceAccounts: never\n", &["pods"]).await;
    let ns = inj.namespace("team", true).await;
    let accounts = kube::Api::<ServiceAccount>::namespaced(c.clone(), &ns);
    let app: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "app"}})).unwrap();
    let app = accounts.create(&Default::default(), &app).await.unwrap();
    wait_secret(&c, &ns, "made by the refresher", |_| true).await;

    let pod = create(&c, &ns, app_pod_as("runs", &image, "Always", "app")).await;
    assert_eq!(
        pull_secret_names(&pod),
        ["pull-secret"],
        "the Pod is patched"
    );
    let printed = wait_succeeded(cp, &c, &ns, "runs").await;
    assert!(printed.contains(MARKER), "the container printed: {printed}");

    for (name, before) in [("app", Some(app)), ("default", None)] {
        let now = accounts.get(name).await.unwrap();
        if let Some(before) = before {
            assert_eq!(
                now.metadata.resource_version, before.metadata.resource_version,
                "{name} never written"
            );
        }
        assert!(
            now.image_pull_secrets.is_none(),
            "{name}: {:?}",
            now.image_pull_secrets
        );
        let managers: Vec<String> = now
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter_map(|m| m.manager)
            .collect();
        assert!(
            !managers.iter().any(|m| m.contains("pull-secret-injector")),
            "{name}: {managers:?}"
        );
    }
    inj.cleanup().await;
    registry.shutdown().await;
}

/// A private registry on the node's address where `{prefix}-team` may pull `team-a/*` and the
/// ServiceAccount `{prefix}-ci/pusher` may push it, with `team-a/app:v1` pushed: the registry,
/// its host and the image.
async fn registry_with_app(
    cp: &ControlPlane,
    c: &kube::Client,
    work: &std::path::Path,
    prefix: &str,
) -> (PrivateRegistry, String, String) {
    let rules = format!(
        "  - {{namespace: {prefix}-team, repositories: [\"team-a/*\"]}}\n  - {{namespace: {prefix}-ci, serviceAccount: pusher, repositories: [\"team-a/*\"], actions: [pull, push]}}\n"
    );
    let infra = format!("{prefix}-infra");
    let registry = PrivateRegistry::start(cp, c, work, &cp.host_ip(), &infra, &rules).await;
    trust_registry(cp, &registry);
    let host = registry.host.clone();
    let image = format!("{host}/team-a/app:v1");
    let ci = format!("{prefix}-ci");
    create_namespace(c, &ci, Default::default()).await;
    let pusher = service_account_token(c, &ci, "pusher", vec![SERVICE.into()]).await;
    registry.push(
        &busybox_image(work, &image),
        "team-a/app:v1",
        &format!("pusher:{pusher}"),
    );
    (registry, host, image)
}
