//! Policy mode (`admission.mode: policy`, Kubernetes 1.36+), through the real API server: the
//! shipped MutatingAdmissionPolicies add the Secret to Pods and ServiceAccounts with no call to
//! the service, in the same namespaces as the webhook and never twice; the service (running with
//! no webhook registered) has each Secret ready before Pods need it: at opt-in, and per new
//! ServiceAccount with `identityScope: serviceAccount`.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use support::*;

/// Waits until the API server applies both policies (it loads them asynchronously, each on
/// its own): a dry-run Pod in `ns` comes back with `pod_secret`, a dry-run ServiceAccount
/// `probe` with `sa_secret`.
async fn wait_policies_active(client: &kube::Client, ns: &str, pod_secret: &str, sa_secret: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let probe: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "probe"}})).unwrap();
    loop {
        let pod = create_pod(client, ns, "probe", json!({}), true).await.pod;
        let sa = accounts
            .create(&dry_run, &probe)
            .await
            .expect("dry-run ServiceAccount");
        if pull_secret_names(&pod).iter().any(|n| n == pod_secret)
            && sa
                .image_pull_secrets
                .unwrap_or_default()
                .iter()
                .any(|r| r.name == sa_secret)
        {
            return;
        }
        assert!(Instant::now() < deadline, "the policies never applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn create_service_account(client: &kube::Client, ns: &str, sa: serde_json::Value) -> Value {
    let sa: ServiceAccount = serde_json::from_value(sa).unwrap();
    let made = Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .expect("create ServiceAccount");
    serde_json::to_value(made).unwrap()
}

use serde_json::Value;

/// Admissions the service answered, from its own counter.
fn admissions_answered(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("pull_secret_injector_admissions_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_adds_the_secret_and_the_service_has_it_ready() {
    let _serial = serial();
    let admin = ControlPlane::get().client().await;
    let policies = shipped_admission_policies(None);
    apply_untyped(&admin, &policies).await;
    let mut inj = Injector::start_without_webhook(
        "pol",
        &kubernetes_registry("default", 3600),
        "admission: {mode: policy}\n",
    )
    .await;
    // Another test's policies had the same names: wait until these are the ones in force.
    let warm = inj.namespace("warm", true).await;
    wait_policies_active(&admin, &warm, "pull-secret", "pull-secret").await;

    // 1. Opt-in makes the Secret: the time from the label to the Secret, five times.
    let mut took = Vec::new();
    for i in 0..5 {
        let ns = inj.namespace(&format!("label-{i}"), false).await;
        let start = Instant::now();
        inj.set_opt_in(&ns, true).await;
        wait_secret(&admin, &ns, "made at opt-in", |_| true).await;
        took.push(start.elapsed());
    }
    took.sort();
    eprintln!(
        "policy mode: label -> Secret exists: {:?} (median {:?})",
        took,
        took[took.len() / 2]
    );
    let team = inj.namespace("team", true).await;
    wait_policies_active(&admin, &team, "pull-secret", "pull-secret").await;
    let secret = wait_secret(&admin, &team, "the opted-in namespace's Secret", |_| true).await;
    assert_eq!(
        secret.type_.as_deref(),
        Some("kubernetes.io/dockerconfigjson")
    );

    // 2. Pods: the list made, appended to, or left alone.
    let none = create_pod(&admin, &team, "none", json!({}), false).await;
    assert_eq!(pull_secret_names(&none.pod), ["pull-secret"]);
    let mine = create_pod(
        &admin,
        &team,
        "mine",
        json!({"imagePullSecrets": [{"name": "mine"}]}),
        false,
    )
    .await;
    assert_eq!(pull_secret_names(&mine.pod), ["mine", "pull-secret"]);
    let already = create_pod(
        &admin,
        &team,
        "already",
        json!({"imagePullSecrets": [{"name": "pull-secret"}, {"name": "x"}]}),
        false,
    )
    .await;
    assert_eq!(pull_secret_names(&already.pod), ["pull-secret", "x"]);

    // 3. ServiceAccounts: both lists and the marker, as the webhook adds them.
    let sa = create_service_account(&admin, &team, json!({"metadata": {"name": "builder"}})).await;
    assert_eq!(
        names(sa["imagePullSecrets"].as_array().cloned()),
        ["pull-secret"]
    );
    assert_eq!(names(sa["secrets"].as_array().cloned()), ["pull-secret"]);
    assert_eq!(
        sa["metadata"]["annotations"]["pull-secret-injector.io/injected-into"],
        "imagePullSecrets,secrets"
    );
    let half = create_service_account(
        &admin,
        &team,
        json!({"metadata": {"name": "half", "annotations": {"a": "b"}},
               "imagePullSecrets": [{"name": "pull-secret"}]}),
    )
    .await;
    assert_eq!(
        names(half["imagePullSecrets"].as_array().cloned()),
        ["pull-secret"]
    );
    assert_eq!(names(half["secrets"].as_array().cloned()), ["pull-secret"]);
    assert_eq!(
        half["metadata"]["annotations"]["pull-secret-injector.io/injected-into"],
        "secrets"
    );

    // 4. Never elsewhere: a namespace without the label, the service's own namespace and
    //    kube-system even when labelled.
    let plain = inj.namespace("plain", false).await;
    let pod = create_pod(&admin, &plain, "p", json!({}), true).await;
    assert!(pull_secret_names(&pod.pod).is_empty());
    let labels = BTreeMap::from([(
        "pull-secret-injector.io/inject".to_string(),
        "enabled".to_string(),
    )]);
    let nss: Api<Namespace> = Api::all(admin.clone());
    if nss.get_opt("pull-secret-injector").await.unwrap().is_none() {
        create_namespace(&admin, "pull-secret-injector", labels.clone()).await;
    }
    for ns in ["pull-secret-injector", "kube-system"] {
        nss.patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": labels}})),
        )
        .await
        .unwrap();
        let pod = create_pod(&admin, ns, "p", json!({}), true).await;
        assert!(pull_secret_names(&pod.pod).is_empty(), "{ns} was patched");
    }
    nss.patch(
        "kube-system",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"pull-secret-injector.io/inject": null}}})),
    )
    .await
    .unwrap();

    // 5. Nothing of this called the service.
    assert_eq!(
        admissions_answered(&inj.metrics().await),
        0,
        "no admission reached the service"
    );

    // 6. Opting out takes back what the policy added to ServiceAccounts, as after the webhook.
    inj.set_opt_in(&team, false).await;
    wait_for(
        "the references removed on opt-out",
        Duration::from_secs(30),
        || async {
            let sa = Api::<ServiceAccount>::namespaced(admin.clone(), &team)
                .get("builder")
                .await
                .unwrap();
            sa.image_pull_secrets.unwrap_or_default().is_empty()
                && sa.secrets.unwrap_or_default().is_empty()
        },
    )
    .await;
    assert!(get_secret(&admin, &team).await.is_none());

    delete_untyped(&admin, &policies).await;
    inj.cleanup().await;
}

/// With `identityScope: serviceAccount` the chart's policies name the Secret from the object,
/// and a new ServiceAccount gets its own Secret from the refresher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_service_account_secrets_are_named_from_the_object_and_made_for_each_new_account() {
    let _serial = serial();
    let admin = ControlPlane::get().client().await;
    let policies = shipped_admission_policies(Some(
        r#"{"rbac": {"serviceAccountScope": true},
            "config": {"identityScope": "serviceAccount", "admission": {"mode": "policy"}}}"#,
    ));
    apply_untyped(&admin, &policies).await;
    let mut inj = Injector::start_without_webhook(
        "polsa",
        &kubernetes_registry("default", 3600),
        "identityScope: serviceAccount\nadmission: {mode: policy}\n",
    )
    .await;
    // The previous test's policies had the same names: until the API server has swapped them,
    // a namespace made now would get its `default` ServiceAccount patched by the old ones.
    let warm = inj.namespace("warm", true).await;
    wait_policies_active(&admin, &warm, "default-pull-secret", "probe-pull-secret").await;
    let team = inj.namespace("team", true).await;
    wait_policies_active(&admin, &team, "default-pull-secret", "probe-pull-secret").await;

    let start = Instant::now();
    let sa = create_service_account(&admin, &team, json!({"metadata": {"name": "builder"}})).await;
    assert_eq!(
        names(sa["imagePullSecrets"].as_array().cloned()),
        ["builder-pull-secret"]
    );
    assert_eq!(
        names(sa["secrets"].as_array().cloned()),
        ["builder-pull-secret"]
    );
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &team);
    wait_for("builder's own Secret", Duration::from_secs(30), || async {
        secrets
            .get_opt("builder-pull-secret")
            .await
            .unwrap()
            .is_some()
    })
    .await;
    eprintln!(
        "policy mode, serviceAccount scope: ServiceAccount created -> its Secret exists: {:?}",
        start.elapsed()
    );
    let secret = secrets.get("builder-pull-secret").await.unwrap();
    let password = docker_config(&secret)["auths"][HOST]["password"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        claims(&password)["sub"],
        format!("system:serviceaccount:{team}:builder")
    );

    let pod = create_pod(
        &admin,
        &team,
        "as-builder",
        json!({"serviceAccountName": "builder", "imagePullSecrets": [{"name": "mine"}]}),
        true,
    )
    .await;
    assert_eq!(pull_secret_names(&pod.pod), ["mine", "builder-pull-secret"]);
    let pod = create_pod(&admin, &team, "as-default", json!({}), true).await;
    assert_eq!(pull_secret_names(&pod.pod), ["default-pull-secret"]);
    assert_eq!(admissions_answered(&inj.metrics().await), 0);

    delete_untyped(&admin, &policies).await;
    inj.cleanup().await;
}
