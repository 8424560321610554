//! The installation in `deploy/kustomize/base`, against the real API server: every object is
//! accepted (server-side dry run), the RBAC grants what the code uses and nothing broader, and the
//! service does its whole job with the deployed ServiceAccount's own token, not an admin's.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{json, Value};
use support::*;

const NS: &str = "pull-secret-injector";
const SA: &str = "pull-secret-injector";

fn yaml_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| <Value as serde::Deserialize>::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// The objects a kustomization renders, for the two features this project's use: `resources`
/// (files and other kustomizations) and JSON 6902 `patches` selected by kind and name. This is
/// what `kubectl apply -k` computes for them.
fn kustomize(dir: &std::path::Path) -> Vec<Value> {
    let k: Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    let mut objects = Vec::new();
    for entry in k["resources"].as_array().expect("resources") {
        let path = dir.join(entry.as_str().unwrap());
        if path.is_dir() {
            objects.extend(kustomize(&path));
        } else {
            objects.extend(yaml_docs(&std::fs::read_to_string(path).unwrap()));
        }
    }
    for p in k["patches"].as_array().into_iter().flatten() {
        let ops: json_patch::Patch = serde_yaml::from_str(p["patch"].as_str().unwrap()).unwrap();
        let target = &p["target"];
        let mut hit = 0;
        for o in objects
            .iter_mut()
            .filter(|o| o["kind"] == target["kind"] && o["metadata"]["name"] == target["name"])
        {
            json_patch::patch(o, &ops)
                .unwrap_or_else(|e| panic!("patch for {target} does not apply: {e}"));
            hit += 1;
        }
        assert_eq!(hit, 1, "patch target {target} must match one object");
    }
    objects
}

/// The objects of the kustomize base.
fn base_objects() -> Vec<Value> {
    kustomize(&repo().join("deploy/kustomize/base"))
}

/// The Helm chart, linted (strict) and rendered offline by Helm's own library.
fn helm_objects(values: &str) -> Vec<Value> {
    let out = std::process::Command::new("python3")
        .arg(repo().join("hack/helm-render"))
        .arg(repo().join("deploy/helm/pull-secret-injector"))
        .arg(NS)
        .arg(values)
        .output()
        .expect("run hack/helm-render");
    assert!(
        out.status.success(),
        "helm lint/render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8(out.stdout).unwrap())
}

/// Objects keyed by kind/namespace/name, with what legitimately differs between the two
/// renderings normalised: Helm's config checksum annotation, and the config file's text (which
/// is compared as parsed YAML).
fn normalised(objects: Vec<Value>) -> std::collections::BTreeMap<String, Value> {
    objects
        .into_iter()
        .map(|mut o| {
            let key = format!(
                "{}/{}/{}",
                o["kind"].as_str().unwrap(),
                o["metadata"]["namespace"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap()
            );
            if let Some(t) = o.pointer_mut("/spec/template/metadata") {
                t.as_object_mut().unwrap().remove("annotations");
            }
            if let Some(c) = o.pointer_mut("/data/config.yaml") {
                let parsed: Value = serde_yaml::from_str(c.as_str().unwrap()).unwrap();
                *c = parsed;
            }
            (key, o)
        })
        .collect()
}

#[test]
fn the_helm_chart_renders_the_same_objects_as_kustomize() {
    for (values, overlay) in [
        ("{}", "base"),
        (r#"{"certManager": {"enabled": true}}"#, "cert-manager"),
        (
            r#"{"pullSecretUpdater": {"enabled": true}}"#,
            "pull-secret-updater",
        ),
        (r#"{"networkPolicy": {"enabled": true}}"#, "network-policy"),
    ] {
        let helm = normalised(helm_objects(values));
        let kustomize = normalised(kustomize(&repo().join("deploy/kustomize").join(overlay)));
        assert_eq!(
            helm.keys().collect::<Vec<_>>(),
            kustomize.keys().collect::<Vec<_>>(),
            "{overlay}: object sets differ"
        );
        for (key, object) in &helm {
            assert_eq!(
                object, &kustomize[key],
                "{overlay}: {key} differs between Helm and kustomize"
            );
        }
    }
}

/// Server-side applies `object`; `None` when this API server does not serve its kind.
async fn apply(client: &kube::Client, object: &Value, dry_run: bool) -> Option<Result<(), String>> {
    let (group, version) = match object["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            object["apiVersion"].as_str().unwrap().to_string(),
        ),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, object["kind"].as_str().unwrap());
    let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await.ok()?;
    let name = object["metadata"]["name"].as_str().unwrap();
    let api: Api<DynamicObject> = match (caps.scope, object["metadata"]["namespace"].as_str()) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            Api::namespaced_with(client.clone(), ns, &resource)
        }
        _ => Api::all_with(client.clone(), &resource),
    };
    let mut params = PatchParams::apply("pull-secret-injector-tests").force();
    params.dry_run = dry_run;
    Some(
        api.patch(name, &params, &Patch::Apply(object))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    )
}

async fn can(
    client: &kube::Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": format!("system:serviceaccount:{NS}:{SA}"),
            "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{NS}"), "system:authenticated"],
            "resourceAttributes": {
                "verb": verb, "group": group,
                "resource": resource.split('/').next().unwrap(),
                "subresource": resource.split('/').nth(1).unwrap_or(""),
                "namespace": namespace.unwrap_or(""), "name": name.unwrap_or("")
            }
        }
    }))
    .unwrap();
    let answer = Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    answer.status.map(|s| s.allowed).unwrap_or(false)
}

/// A client that authenticates with a token of the deployed ServiceAccount.
async fn client_as_service_account(admin: &kube::Client) -> kube::Client {
    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .unwrap();
    let answer = Api::<ServiceAccount>::namespaced(admin.clone(), NS)
        .create_token_request(SA, &PostParams::default(), &request)
        .await
        .unwrap();
    let token = answer.status.unwrap().token;
    let server = std::fs::read_to_string(ControlPlane::get().dir.join("server")).unwrap();
    let mut config = kube::Config::new(server.trim().parse().unwrap());
    config.accept_invalid_certs = true;
    config.auth_info.token = Some(token.into());
    kube::Client::try_from(config).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kustomize_base_installs_with_least_privilege_and_works_with_its_own_identity() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let admin = cp.client().await;

    // 1. Every object is valid for the API server; RBAC and the plain objects are applied for
    //    real. (The Deployment and the webhook configuration stay dry runs: no kubelet here, and a
    //    webhook pointing at a Service without endpoints would slow every other test down.)
    let mut not_served = Vec::new();
    for object in base_objects() {
        let kind = object["kind"].as_str().unwrap().to_string();
        let real = !matches!(
            kind.as_str(),
            "Deployment" | "MutatingWebhookConfiguration" | "PodDisruptionBudget"
        );
        match apply(&admin, &object, true).await {
            None => not_served.push(format!("{} {kind}", object["apiVersion"])),
            Some(result) => {
                result.unwrap_or_else(|e| panic!("{kind} refused by the API server: {e}"))
            }
        }
        if real {
            if let Some(result) = apply(&admin, &object, false).await {
                result.unwrap_or_else(|e| panic!("{kind}: {e}"));
            }
        }
    }
    // Every tested release (1.33 and newer) serves every kind the base ships.
    assert!(not_served.is_empty(), "not served: {not_served:?}");

    // 2. Exactly the verbs the code uses are granted.
    let ns = Some("some-team");
    // (verb, API group, resource, namespace, name)
    type Access<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);
    let needed: &[Access] = &[
        ("list", "", "namespaces", None, None),
        ("watch", "", "namespaces", None, None),
        ("get", "", "namespaces", None, Some("some-team")),
        ("get", "", "secrets", ns, Some("pull-secret")),
        ("list", "", "secrets", None, Some("pull-secret")),
        ("watch", "", "secrets", None, Some("pull-secret")),
        ("create", "", "secrets", ns, None),
        ("update", "", "secrets", ns, Some("pull-secret")),
        ("delete", "", "secrets", ns, Some("pull-secret")),
        ("list", "", "serviceaccounts", ns, None),
        ("list", "", "serviceaccounts", None, None),
        ("watch", "", "serviceaccounts", None, None),
        ("patch", "", "serviceaccounts", ns, Some("default")),
        ("create", "", "serviceaccounts/token", ns, Some("default")),
        ("create", "events.k8s.io", "events", ns, None),
        ("create", "coordination.k8s.io", "leases", Some(NS), None),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            Some(NS),
            Some("pull-secret-injector"),
        ),
        (
            "get",
            "",
            "secrets",
            Some(NS),
            Some("pull-secret-injector-tls"),
        ),
        (
            "update",
            "",
            "secrets",
            Some(NS),
            Some("pull-secret-injector-tls"),
        ),
        (
            "get",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            None,
            Some("pull-secret-injector"),
        ),
        (
            "update",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            None,
            Some("pull-secret-injector"),
        ),
    ];
    for &(verb, group, resource, namespace, name) in needed {
        assert!(
            can(&admin, verb, group, resource, namespace, name).await,
            "needs {verb} {group}/{resource} {namespace:?} {name:?}"
        );
    }
    // And nothing broader.
    let refused: &[Access] = &[
        ("get", "", "secrets", ns, Some("database-password")),
        ("list", "", "secrets", ns, None),
        ("list", "", "secrets", None, None),
        ("watch", "", "secrets", None, None),
        ("update", "", "secrets", ns, Some("other")),
        ("delete", "", "secrets", ns, Some("other")),
        ("create", "", "serviceaccounts/token", ns, Some("admin-bot")),
        ("delete", "", "serviceaccounts", ns, Some("default")),
        ("update", "", "namespaces", None, Some("some-team")),
        ("create", "", "pods", ns, None),
        ("get", "", "configmaps", ns, Some("x")),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            Some("kube-system"),
            Some("kube-controller-manager"),
        ),
        (
            "update",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            None,
            Some("someone-else"),
        ),
        (
            "create",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            None,
            None,
        ),
        ("*", "*", "*", ns, None),
    ];
    for &(verb, group, resource, namespace, name) in refused {
        assert!(
            !can(&admin, verb, group, resource, namespace, name).await,
            "must not {verb} {group}/{resource} {namespace:?} {name:?}"
        );
    }

    // 3. The `certs` step, as the ServiceAccount: makes the Secret, sets caBundle, and reuses it.
    let as_sa = client_as_service_account(&admin).await;
    let hooks: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
        Api::all(admin.clone());
    let _ = hooks
        .delete("pull-secret-injector", &DeleteParams::default())
        .await;
    let inert: k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": "pull-secret-injector"},
        "webhooks": [{"name": "inject.pull-secret-injector.io", "admissionReviewVersions": ["v1"], "sideEffects": "NoneOnDryRun",
                      "failurePolicy": "Ignore", "namespaceSelector": {"matchLabels": {"e2e-never": "x"}},
                      "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}],
                      "clientConfig": {"url": "https://127.0.0.1:1/mutate"}}]
    }))
    .unwrap();
    hooks.create(&PostParams::default(), &inert).await.unwrap();
    let out = tempfile::tempdir().unwrap();
    let request = pull_secret_injector::ops::certs::CertsRequest {
        namespace: NS.into(),
        secret: "pull-secret-injector-tls".into(),
        service: "pull-secret-injector".into(),
        webhook: Some("pull-secret-injector".into()),
        out_dir: Some(out.path().to_owned()),
        validity: Duration::from_secs(365 * 86400),
        renew_within: Duration::from_secs(30 * 86400),
    };
    let first = pull_secret_injector::ops::certs::ensure(&as_sa, &request)
        .await
        .expect("certs as the ServiceAccount");
    let stored = Api::<Secret>::namespaced(admin.clone(), NS)
        .get("pull-secret-injector-tls")
        .await
        .unwrap();
    assert_eq!(stored.type_.as_deref(), Some("kubernetes.io/tls"));
    let hook = hooks.get("pull-secret-injector").await.unwrap();
    assert_eq!(
        hook.webhooks.unwrap()[0]
            .client_config
            .ca_bundle
            .as_ref()
            .unwrap()
            .0,
        first.ca_pem.as_bytes()
    );
    assert_eq!(
        std::fs::read_to_string(out.path().join("tls.crt")).unwrap(),
        first.cert_pem
    );
    let second = pull_secret_injector::ops::certs::ensure(&as_sa, &request)
        .await
        .unwrap();
    assert_eq!(
        second.cert_pem, first.cert_pem,
        "a valid certificate is reused, not replaced"
    );
    hooks
        .delete("pull-secret-injector", &DeleteParams::default())
        .await
        .unwrap();

    // 4. The service's whole job with the ServiceAccount's token, leader election included.
    let certs = Certs::new();
    let yaml = config_yaml(
        "t-rbac",
        &certs,
        &kubernetes_registry("default", 3600),
        "leaderElection: {namespace: pull-secret-injector}",
    )
    .replace(
        "ownNamespace: t-rbac-own",
        "ownNamespace: pull-secret-injector",
    );
    let config = pull_secret_injector::config::Config::from_yaml(&yaml).unwrap();
    let service = pull_secret_injector::Service::start(settings(config), as_sa.clone())
        .await
        .unwrap();
    wait_for("ready", Duration::from_secs(30), || async {
        service.is_ready()
    })
    .await;
    let mut inj = Injector::attach("t-rbac", service, certs, admin.clone(), yaml).await;
    let team = inj.namespace("team", true).await;
    let secret = wait_secret(
        &admin,
        &team,
        "made with the ServiceAccount's rights",
        |_| true,
    )
    .await;
    assert_eq!(
        claims(&password(&secret))["sub"],
        format!("system:serviceaccount:{team}:default")
    );
    let pod = create_pod(
        &admin,
        &team,
        "app",
        json!({"imagePullSecrets": [{"name": "mine"}]}),
        false,
    )
    .await;
    assert_eq!(pull_secret_names(&pod.pod), ["mine", "pull-secret"]);
    assert!(pod.warnings.is_empty(), "{:?}", pod.warnings);
    inj.set_opt_in(&team, false).await;
    wait_for(
        "Secret deleted on opt-out",
        Duration::from_secs(30),
        || async { get_secret(&admin, &team).await.is_none() },
    )
    .await;
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(admin.clone(), NS)
        .get("pull-secret-injector")
        .await
        .unwrap();
    assert!(
        lease.spec.unwrap().holder_identity.is_some(),
        "the Lease was taken with the ServiceAccount's rights"
    );
    inj.cleanup().await;
}

/// The token server's manifests are accepted by the API server, and the config they carry is a
/// valid token-server config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_server_manifests_are_valid() {
    let _serial = serial();
    let admin = ControlPlane::get().client().await;
    let mut objects = kustomize(&repo().join("deploy/kustomize/token-server-network-policy"));
    // And the webhook's optional NetworkPolicy.
    objects.extend(yaml_docs(
        &std::fs::read_to_string(repo().join("deploy/kustomize/network-policy/networkpolicy.yaml"))
            .unwrap(),
    ));
    for object in objects {
        let kind = object["kind"].as_str().unwrap().to_string();
        // The namespace for real (the same object as the base's), the rest as dry runs.
        let dry_run = kind != "Namespace";
        apply(&admin, &object, dry_run)
            .await
            .expect("served")
            .unwrap_or_else(|e| panic!("{kind} refused by the API server: {e}"));
        if kind == "ConfigMap" {
            let text = object["data"]["token-server.yaml"]
                .as_str()
                .expect("config");
            pull_secret_injector::token_server::TokenServerConfig::from_yaml(text)
                .unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// The chart's `matchConditions` for `identityScope: serviceAccount` name the Secret from the
/// object (`<serviceAccount>-<secretName>`), and the API server compiles them (it refuses a
/// webhook configuration whose CEL does not compile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_account_scope_match_conditions_compile_on_the_api_server() {
    // Takes turns with the base install, which creates a webhook configuration of this name
    // (with a `url`) for a while: a dry-run apply over it would merge the two.
    let _serial = serial();
    let admin = ControlPlane::get().client().await;
    let values = r#"{"config": {"identityScope": "serviceAccount", "secretName": "pull-creds",
        "namespaceSelector": {"matchLabels": {"pull-secret-injector.io/inject": "enabled"}},
        "registries": [{"host": "registry.example.com", "kubernetes": {"serviceAccount": "default",
        "audience": "https://registry.example.com", "expirationSeconds": 3600}}]}}"#;
    let hook = helm_objects(values)
        .into_iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .expect("the chart renders a webhook configuration");
    let expressions: Vec<&str> = hook["webhooks"][0]["matchConditions"]
        .as_array()
        .expect("matchConditions")
        .iter()
        .filter_map(|c| c["expression"].as_str())
        .collect();
    assert!(
        expressions.iter().any(|e| e.contains(
            "(has(object.spec.serviceAccountName) ? object.spec.serviceAccountName : 'default') + '-pull-creds'"
        )),
        "{expressions:?}"
    );
    assert!(
        expressions
            .iter()
            .any(|e| e.contains("object.metadata.name + '-pull-creds'")),
        "{expressions:?}"
    );
    let result = apply(&admin, &hook, true).await.expect("served");
    result.expect("the API server accepts the webhook configuration");
}
