//! The installation in `deploy/kustomize/base`, against the real API server: every object is
//! accepted (server-side dry run), the RBAC grants what the code uses and nothing broader, and the
//! service does its whole job with the deployed ServiceAccount's own token, not an admin's.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
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
    // configMapGenerator, as this project uses it: files below the kustomization, keyed by their
    // name, no name suffix (so that other objects can name the ConfigMap), labels.
    for g in k["configMapGenerator"].as_array().into_iter().flatten() {
        assert_eq!(
            g["options"]["disableNameSuffixHash"], true,
            "generated names are fixed"
        );
        let mut data = serde_json::Map::new();
        for file in g["files"].as_array().expect("files") {
            let file = file.as_str().unwrap();
            let (key, path) = file.split_once('=').unwrap_or((
                std::path::Path::new(file)
                    .file_name()
                    .unwrap()
                    .to_str()
                    .unwrap(),
                file,
            ));
            data.insert(
                key.to_string(),
                Value::String(std::fs::read_to_string(dir.join(path)).unwrap()),
            );
        }
        let mut metadata = json!({"name": g["name"], "namespace": g["namespace"]});
        if let Some(labels) = g["options"].get("labels") {
            metadata["labels"] = labels.clone();
        }
        objects.push(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}),
        );
    }
    for p in k["patches"].as_array().into_iter().flatten() {
        let target = &p["target"];
        let text = p["patch"].as_str().unwrap();
        // A strategic-merge patch `$patch: delete`: the object is left out.
        let strategic: Value = serde_yaml::from_str(text).unwrap();
        if strategic.get("$patch").is_some() {
            assert_eq!(strategic["$patch"], "delete", "only deletions are used");
            let before = objects.len();
            objects.retain(|o| {
                !(o["kind"] == target["kind"] && o["metadata"]["name"] == target["name"])
            });
            assert_eq!(before - objects.len(), 1, "{target} must match one object");
            continue;
        }
        let ops: json_patch::Patch = serde_yaml::from_str(text).unwrap();
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

/// `hack/helm-render` of a chart of `deploy/helm`: stdout on success, stderr on failure.
fn helm_render(chart: &str, args: &[&str], values: &str) -> Result<String, String> {
    let out = std::process::Command::new(repo().join("hack/helm-render"))
        .args(args)
        .arg(repo().join("deploy/helm").join(chart))
        .arg(NS)
        .arg(values)
        .output()
        .expect("run hack/helm-render");
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The Helm chart, linted (strict) and rendered offline by the helm CLI.
fn helm_objects(values: &str) -> Vec<Value> {
    chart_objects("pull-secret-injector", values)
}

fn chart_objects(chart: &str, values: &str) -> Vec<Value> {
    let text = helm_render(chart, &[], values)
        .unwrap_or_else(|e| panic!("helm lint/render of {chart} failed: {e}"));
    yaml_docs(&text)
}

/// Objects keyed by kind/namespace/name, with what legitimately differs between the two
/// renderings normalised: the Pod template's annotations (Helm's config checksum), and the config
/// files' text (compared as parsed YAML).
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
            for key in ["config.yaml", "token-server.yaml"] {
                if let Some(c) = o.pointer_mut(&format!("/data/{key}")) {
                    let parsed: Value = serde_yaml::from_str(c.as_str().unwrap()).unwrap();
                    *c = parsed;
                }
            }
            (key, o)
        })
        .collect()
}

#[test]
fn the_helm_chart_renders_the_same_objects_as_kustomize() {
    let monitoring = r#"{"metrics": {"serviceMonitor": {"enabled": true},
        "prometheusRule": {"enabled": true}, "dashboard": {"enabled": true}}}"#;
    let service_account_scope = r#"{"config": {"identityScope": "serviceAccount"},
        "rbac": {"serviceAccountScope": true}}"#;
    for (chart, values, overlays) in [
        ("pull-secret-injector", "{}", &["base"][..]),
        (
            "pull-secret-injector",
            r#"{"certManager": {"enabled": true}}"#,
            &["cert-manager"],
        ),
        (
            "pull-secret-injector",
            r#"{"networkPolicy": {"enabled": true}}"#,
            &["network-policy"],
        ),
        (
            "pull-secret-injector",
            r#"{"pullSecretUpdater": {"enabled": true}}"#,
            &["pull-secret-updater"],
        ),
        (
            "pull-secret-injector",
            service_account_scope,
            &["service-account-scope"],
        ),
        ("pull-secret-injector", monitoring, &["base", "monitoring"]),
        (
            "pull-secret-injector",
            r#"{"config": {"admission": {"mode": "policy"}}}"#,
            &["policy"],
        ),
        (
            "pull-secret-injector",
            r#"{"config": {"remediation": {"mode": "evictStuckPods"}}}"#,
            &["evict-stuck-pods"],
        ),
        (
            "pull-secret-injector",
            r#"{"config": {"serviceAccounts": "apply"}}"#,
            &["gitops"],
        ),
        (
            "pull-secret-injector",
            r#"{"config": {"serviceAccounts": "never"}}"#,
            &["pods-only"],
        ),
        ("token-server", "{}", &["token-server"]),
    ] {
        let overlay = overlays.join("+");
        // The kustomizations make the namespace; the charts do when asked (`helm template`).
        let mut values: Value = serde_json::from_str(values).unwrap();
        values["createNamespace"] = json!(true);
        let helm = normalised(chart_objects(chart, &values.to_string()));
        let kustomize = normalised(
            overlays
                .iter()
                .flat_map(|o| kustomize(&repo().join("deploy/kustomize").join(o)))
                .collect(),
        );
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

/// A wrong value fails the chart's lint and render with a message that names it, as `helm lint`,
/// `helm template` and `helm install` print it.
#[test]
fn a_wrong_value_fails_the_chart_with_a_message_naming_it() {
    for (values, expected) in [
        (
            r#"{"webhook": {"failurePolicy": "Never"}}"#,
            &["/webhook/failurePolicy", "'Ignore', 'Fail'"][..],
        ),
        (
            r#"{"webhook": {"timeoutSeconds": 60}}"#,
            &["/webhook/timeoutSeconds", "30"],
        ),
        (r#"{"replicas": 3}"#, &["'replicas' not allowed"]),
        (r#"{"replicaCount": "two"}"#, &["/replicaCount", "integer"]),
        (
            r#"{"config": {"secretName": "Pull_Secret"}}"#,
            &["/config/secretName", "Pull_Secret"],
        ),
        // The chart writes these into the config file itself.
        (
            r#"{"config": {"listen": "0.0.0.0:9443"}}"#,
            &["/config", "'listen' not allowed"],
        ),
        (
            r#"{"config": {"identityScope": "serviceaccount"}}"#,
            &["/config/identityScope", "'namespace', 'serviceAccount'"],
        ),
        (
            r#"{"config": {"registries": []}}"#,
            &["/config/registries", "minItems"],
        ),
        (
            r#"{"metrics": {"prometheusRule": {"enabled": "yes"}}}"#,
            &["/metrics/prometheusRule/enabled", "boolean"],
        ),
        // Not a schema rule: the wider RBAC is asked for explicitly.
        (
            r#"{"config": {"identityScope": "serviceAccount"}}"#,
            &["rbac.serviceAccountScope: true"],
        ),
    ] {
        let err = helm_render("pull-secret-injector", &[], values)
            .expect_err(&format!("{values} must be refused"));
        for e in expected {
            assert!(err.contains(e), "{values}: {e:?} not in: {err}");
        }
    }
    let err = helm_render(
        "token-server",
        &[],
        r#"{"config": {"rules": [{"repositories": ["x"]}]}}"#,
    )
    .expect_err("a rule without a namespace");
    assert!(
        err.contains("/config/rules/0") && err.contains("namespace"),
        "{err}"
    );
    // And the defaults pass.
    helm_render("pull-secret-injector", &[], "{}").unwrap();
    helm_render("token-server", &[], "{}").unwrap();
}

fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

/// Every knob lands where Kubernetes reads it, and the API server accepts the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_knobs_land_where_kubernetes_reads_them() {
    let values = r#"{
        "createNamespace": true,
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms":
            [{"matchExpressions": [{"key": "node-role", "operator": "In", "values": ["infra"]}]}]}}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/team": "platform"},
        "podLabels": {"example.com/tier": "infra"},
        "extraEnv": [{"name": "RUST_LOG", "value": "debug"}],
        "imagePullSecrets": [{"name": "my-registry"}],
        "podSecurityContext": {"runAsNonRoot": true, "runAsUser": 10001, "runAsGroup": 10001,
            "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
        "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}, "runAsNonRoot": true},
        "webhook": {"timeoutSeconds": 3, "failurePolicy": "Fail",
            "objectSelector": {"matchExpressions": [{"key": "example.com/no-inject", "operator": "DoesNotExist"}]}},
        "config": {"excludedNamespaces": ["monitoring"],
            "namespaceSelector": {"matchLabels": {"pull-secret-injector.io/inject": "enabled"},
                "matchExpressions": [{"key": "team", "operator": "Exists"}]}}
    }"#;
    let objects = helm_objects(values);
    let deployment = find(&objects, "Deployment");
    let pod = &deployment["spec"]["template"];
    let spec = &pod["spec"];
    assert_eq!(spec["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert_eq!(spec["tolerations"][0]["key"], "dedicated");
    assert!(
        spec["affinity"].get("podAntiAffinity").is_none(),
        "affinity replaces the default"
    );
    assert_eq!(
        spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            ["nodeSelectorTerms"][0]["matchExpressions"][0]["key"],
        "node-role"
    );
    assert_eq!(
        spec["topologySpreadConstraints"][0],
        json!({"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
               "whenUnsatisfiable": "ScheduleAnyway",
               "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "pull-secret-injector"}}}),
        "the chart selects its own Pods"
    );
    assert_eq!(spec["priorityClassName"], "system-cluster-critical");
    assert_eq!(
        pod["metadata"]["annotations"]["example.com/team"],
        "platform"
    );
    assert!(pod["metadata"]["annotations"]["checksum/config"].is_string());
    assert_eq!(pod["metadata"]["labels"]["example.com/tier"], "infra");
    assert_eq!(
        deployment["spec"]["selector"],
        json!({"matchLabels": {"app.kubernetes.io/name": "pull-secret-injector"}}),
        "podLabels stay out of the selector (it cannot change after install)"
    );
    assert_eq!(spec["imagePullSecrets"], json!([{"name": "my-registry"}]));
    assert_eq!(spec["securityContext"]["fsGroup"], 10001);
    let serve = &spec["containers"][0];
    assert!(serve["env"]
        .as_array()
        .unwrap()
        .contains(&json!({"name": "RUST_LOG", "value": "debug"})));
    for container in [serve, &spec["initContainers"][0]] {
        assert_eq!(container["securityContext"]["runAsNonRoot"], true);
    }
    let hook = &find(&objects, "MutatingWebhookConfiguration")["webhooks"][0];
    assert_eq!(hook["timeoutSeconds"], 3);
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(
        hook["objectSelector"]["matchExpressions"][0]["key"],
        "example.com/no-inject"
    );
    assert_eq!(
        hook["namespaceSelector"]["matchExpressions"],
        json!([{"key": "team", "operator": "Exists"},
               {"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                "values": [NS, "kube-system", "monitoring"]}]),
        "the user's expressions and the exclusions together"
    );
    let config: Value = serde_yaml::from_str(
        find(&objects, "ConfigMap")["data"]["config.yaml"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    pull_secret_injector::config::Config::from_yaml(&serde_yaml::to_string(&config).unwrap())
        .expect("the rendered config is valid");
    let ts = chart_objects(
        "token-server",
        r#"{"nodeSelector": {"kubernetes.io/os": "linux"}, "priorityClassName": "high",
            "extraEnv": [{"name": "RUST_LOG", "value": "debug"}], "podLabels": {"a": "b"}}"#,
    );
    let ts_spec = &find(&ts, "Deployment")["spec"]["template"]["spec"];
    assert_eq!(ts_spec["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(ts_spec["priorityClassName"], "high");
    assert_eq!(ts_spec["containers"][0]["env"][0]["name"], "RUST_LOG");

    // The API server takes them as they are (server-side dry run).
    let admin = ControlPlane::get().client().await;
    apply(&admin, find(&objects, "Namespace"), false)
        .await
        .expect("served")
        .unwrap();
    for object in objects.iter().chain(ts.iter()).filter(|o| {
        matches!(
            o["kind"].as_str(),
            Some("Deployment" | "MutatingWebhookConfiguration")
        )
    }) {
        apply(&admin, object, true)
            .await
            .expect("served")
            .unwrap_or_else(|e| panic!("{} refused: {e}", object["kind"]));
    }
}

/// The chart's NOTES tell how to opt a namespace in and how to check `status`, with the values
/// of this release.
#[test]
fn the_chart_notes_say_how_to_opt_in_and_check_status() {
    let notes = helm_render(
        "pull-secret-injector",
        &["--notes"],
        r#"{"config": {"secretName": "registry-creds",
            "namespaceSelector": {"matchLabels": {"example.com/pulls": "short-lived"}}}}"#,
    )
    .unwrap();
    for needle in [
        "kubectl label namespace <namespace> example.com/pulls=short-lived",
        "Secret registry-creds",
        "pull-secret-injector status --config config.yaml",
        &format!("kubectl -n {NS} rollout status deployment/pull-secret-injector"),
    ] {
        assert!(notes.contains(needle), "{needle:?} not in:\n{notes}");
    }
    let notes = helm_render("token-server", &["--notes"], "{}").unwrap();
    assert!(
        notes.contains("create secret tls token-server-signing"),
        "{notes}"
    );
}

/// Everything the Prometheus rules and the Grafana dashboard query, as the chart renders them:
/// metric families the service exports (`src/metrics.rs`), label names they carry and label
/// values the code sets.
#[test]
fn the_alerts_and_dashboard_query_only_what_the_service_exports() {
    use pull_secret_injector::admission::decide::Outcome;
    // Off by default.
    let default_kinds: Vec<Value> = helm_objects("{}")
        .into_iter()
        .map(|o| o["kind"].clone())
        .collect();
    for kind in ["ServiceMonitor", "PrometheusRule"] {
        assert!(
            !default_kinds.contains(&json!(kind)),
            "{kind} is off by default"
        );
    }
    assert!(!helm_objects("{}")
        .iter()
        .any(|o| o["metadata"]["name"] == "pull-secret-injector-dashboard"));

    let objects = helm_objects(
        r#"{"metrics": {"serviceMonitor": {"enabled": true}, "prometheusRule": {"enabled": true},
            "dashboard": {"enabled": true}}}"#,
    );
    // What the service exports, with every label value the code can set.
    let metrics = pull_secret_injector::metrics::Metrics::default();
    for outcome in [
        Outcome::Unchanged,
        Outcome::Patched,
        Outcome::NotReady,
        Outcome::Conflict,
        Outcome::Invalid,
    ] {
        metrics.admission("Pod", outcome.as_str());
    }
    metrics.mint("kubernetes", true, 0.01);
    metrics.mint("kubernetes", false, 0.01);
    metrics.cache_lookup(true);
    metrics.cache_lookup(false);
    let exposition = metrics.encode();
    let family = |word: &str| {
        ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .fold(word.to_string(), |w, s| {
                w.strip_suffix(s).unwrap_or(&w).to_string()
            })
    };
    let exported: Vec<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    // label=value pairs seen per family.
    let mut labels: std::collections::BTreeMap<String, Vec<(String, String)>> = Default::default();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        if let Some((name, rest)) = line.split_once('{') {
            for pair in rest.split('}').next().unwrap().split(',') {
                let (k, v) = pair.split_once('=').unwrap();
                labels
                    .entry(family(name))
                    .or_default()
                    .push((k.to_string(), v.trim_matches('"').to_string()));
            }
        }
    }

    let rule = find(&objects, "PrometheusRule");
    let mut expressions: Vec<(String, String)> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .map(|r| {
            (
                r["alert"].as_str().unwrap().to_string(),
                r["expr"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let alerts: Vec<&str> = expressions.iter().map(|(a, _)| a.as_str()).collect();
    for needed in [
        "earliest_expiry_seconds",
        "mints_total{outcome=\"error\"}",
        "not_ready",
        "invalid",
        // Renewal capacity (issue 21): the need against the ceiling, and renewals left late.
        "renewals_needed_per_second",
        "renewal_ceiling_per_second",
        "renewal_oldest_overdue_seconds",
    ] {
        assert!(
            expressions.iter().any(|(_, e)| e.contains(needed)),
            "no alert on {needed}: {alerts:?}"
        );
    }
    let dashboard = objects
        .iter()
        .find(|o| o["metadata"]["name"] == "pull-secret-injector-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let board: Value = serde_json::from_str(
        dashboard["data"]["pull-secret-injector.json"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    for panel in board["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            expressions.push((
                format!("dashboard: {}", panel["title"]),
                target["expr"].as_str().unwrap().to_string(),
            ));
        }
    }
    let mut checked = 0;
    for (what, expr) in &expressions {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("pull_secret_injector_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            let name = family(&tail[..end]);
            assert!(
                exported.contains(&name),
                "{what}: {} is not exported: {exported:?}",
                &tail[..end]
            );
            // Its label matchers, if any: {label op "value", ...}.
            if let Some(matchers) = tail[end..].strip_prefix('{') {
                let matchers = &matchers[..matchers.find('}').unwrap()];
                for m in matchers.split(',') {
                    let op_at = m.find(['=', '!']).unwrap();
                    let label = m[..op_at].trim();
                    let value = m[op_at..]
                        .trim_start_matches(['=', '!', '~'])
                        .trim()
                        .trim_matches('"');
                    let seen = labels.get(&name).cloned().unwrap_or_default();
                    for v in value.split('|') {
                        assert!(
                            seen.iter().any(|(k, sv)| k == label && sv == v),
                            "{what}: {name} has no {label}=\"{v}\"; the code sets {seen:?}"
                        );
                    }
                }
            }
            checked += 1;
            rest = &tail[end..];
        }
    }
    assert!(checked >= 14, "only {checked} metric references checked");

    let monitor = find(&objects, "ServiceMonitor");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["scheme"], "https");
    assert_eq!(endpoint["path"], "/metrics");
    let service = find(&objects, "Service");
    assert_eq!(endpoint["port"], service["spec"]["ports"][0]["name"]);
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        service["metadata"]["labels"]
    );
}

/// The dashboard in the chart and in the kustomize overlay are copies of
/// `deploy/grafana/pull-secret-injector.json` (Helm and kustomize read files only below their
/// own directory).
#[test]
fn the_dashboard_copies_agree() {
    let canonical =
        std::fs::read_to_string(repo().join("deploy/grafana/pull-secret-injector.json")).unwrap();
    for copy in [
        "deploy/helm/pull-secret-injector/dashboards/pull-secret-injector.json",
        "deploy/kustomize/monitoring/pull-secret-injector.json",
    ] {
        assert!(
            std::fs::read_to_string(repo().join(copy)).unwrap() == canonical,
            "{copy} differs from deploy/grafana/pull-secret-injector.json: copy it again"
        );
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
    can_as(client, SA, verb, group, resource, namespace, name).await
}

/// What ServiceAccount `sa` of the service's namespace may do (SubjectAccessReview).
async fn can_as(
    client: &kube::Client,
    sa: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {
            "user": format!("system:serviceaccount:{NS}:{sa}"),
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
    client_as(admin, SA).await
}

/// A client that authenticates with a token of ServiceAccount `sa` of the service's namespace.
async fn client_as(admin: &kube::Client, sa: &str) -> kube::Client {
    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .unwrap();
    let answer = Api::<ServiceAccount>::namespaced(admin.clone(), NS)
        .create_token_request(sa, &PostParams::default(), &request)
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
        ("list", "", "pods", None, None),
        ("watch", "", "pods", None, None),
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
            "watch",
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
        ("update", "", "pods", ns, Some("app")),
        ("patch", "", "pods", ns, Some("app")),
        ("delete", "", "pods", ns, Some("app")),
        // Evictions only with remediation.mode evictStuckPods (the evict-stuck-pods overlay).
        ("create", "", "pods/eviction", ns, Some("app")),
        ("list", "policy", "poddisruptionbudgets", ns, None),
        ("get", "", "configmaps", ns, Some("x")),
        (
            "update",
            "coordination.k8s.io",
            "leases",
            Some("kube-system"),
            Some("kube-controller-manager"),
        ),
        ("watch", "coordination.k8s.io", "leases", Some(NS), None),
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
        (
            "delete",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            None,
            Some("pull-secret-injector"),
        ),
        (
            "patch",
            "admissionregistration.k8s.io",
            "mutatingwebhookconfigurations",
            None,
            Some("pull-secret-injector"),
        ),
        // Its own fence, and any other.
        (
            "update",
            "admissionregistration.k8s.io",
            "validatingadmissionpolicies",
            None,
            Some("pull-secret-injector-fence"),
        ),
        (
            "delete",
            "admissionregistration.k8s.io",
            "validatingadmissionpolicybindings",
            None,
            Some("pull-secret-injector-fence"),
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
    //    The self-fencing policy (applied above) is in force from here on: everything below
    //    passes through it.
    let as_sa = client_as_service_account(&admin).await;
    wait_for(
        "the self-fencing policy in force",
        Duration::from_secs(30),
        || async {
            token_request(&as_sa, NS, "some-other-audience", 600)
                .await
                .is_err()
        },
    )
    .await;
    let hooks: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
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
    // The fence lets this identity change the caBundle (as `certs` did above, and here once
    // more) and nothing else: not where the webhook points, not what it is sent, not how its
    // failures count (issue 23: a leaked token repointing the webhook is a cluster takeover).
    let both = format!("{}{}", first.ca_pem, first.ca_pem);
    replace_webhook_as(&admin, &as_sa, |w| {
        w["webhooks"][0]["clientConfig"]["caBundle"] = json!(base64_of(&both))
    })
    .await
    .expect("only caBundle changes");
    type Change<'a> = (&'a str, &'a dyn Fn(&mut Value));
    let changes: &[Change] = &[
        ("url elsewhere", &|w| {
            w["webhooks"][0]["clientConfig"]["url"] = json!("https://attacker.example/mutate")
        }),
        ("a Service instead", &|w| {
            let hook = &mut w["webhooks"][0]["clientConfig"];
            hook.as_object_mut().unwrap().remove("url");
            hook["service"] = json!({"namespace": "attacker", "name": "collector", "port": 443});
        }),
        ("Secrets sent too", &|w| {
            w["webhooks"][0]["rules"][0]["resources"] = json!(["pods", "secrets"])
        }),
        ("every namespace", &|w| {
            w["webhooks"][0]["namespaceSelector"] = json!({})
        }),
        ("an objectSelector", &|w| {
            w["webhooks"][0]["objectSelector"] = json!({"matchLabels": {"a": "b"}})
        }),
        ("failurePolicy Fail", &|w| {
            w["webhooks"][0]["failurePolicy"] = json!("Fail")
        }),
        ("matchConditions", &|w| {
            w["webhooks"][0]["matchConditions"] = json!([{"name": "all", "expression": "true"}])
        }),
        ("timeoutSeconds", &|w| {
            w["webhooks"][0]["timeoutSeconds"] = json!(30)
        }),
        ("sideEffects", &|w| {
            w["webhooks"][0]["sideEffects"] = json!("None")
        }),
        ("reinvocationPolicy", &|w| {
            w["webhooks"][0]["reinvocationPolicy"] = json!("IfNeeded")
        }),
        ("matchPolicy", &|w| {
            w["webhooks"][0]["matchPolicy"] = json!("Exact")
        }),
        ("admissionReviewVersions", &|w| {
            w["webhooks"][0]["admissionReviewVersions"] = json!(["v1", "v1beta1"])
        }),
        ("a webhook added", &|w| {
            let mut second = w["webhooks"][0].clone();
            second["name"] = json!("second.attacker.example");
            w["webhooks"].as_array_mut().unwrap().push(second);
        }),
        ("a webhook renamed", &|w| {
            w["webhooks"][0]["name"] = json!("other.attacker.example")
        }),
        ("a label", &|w| w["metadata"]["labels"] = json!({"a": "b"})),
        ("cert-manager's CA injection", &|w| {
            w["metadata"]["annotations"] =
                json!({"cert-manager.io/inject-ca-from": "attacker/their-ca"})
        }),
        ("a finalizer", &|w| {
            w["metadata"]["finalizers"] = json!(["attacker.example/keep"])
        }),
    ];
    for (what, change) in changes {
        let refused = replace_webhook_as(&admin, &as_sa, change)
            .await
            .expect_err(what);
        assert!(
            refused
                .contains("changes nothing of its webhook configuration but clientConfig.caBundle"),
            "{what}: {refused}"
        );
    }
    assert_eq!(
        hooks
            .get("pull-secret-injector")
            .await
            .unwrap()
            .webhooks
            .unwrap()[0]
            .client_config
            .url
            .as_deref(),
        Some("https://127.0.0.1:1/mutate"),
        "still where the admin pointed it"
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
    let accounts = Api::<ServiceAccount>::namespaced(admin.clone(), &team);
    let default_lists = || async {
        let sa = accounts.get("default").await.unwrap();
        let value = serde_json::to_value(&sa).unwrap();
        let listed = |list: &str| -> Vec<String> {
            value[list]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["name"].as_str().map(String::from))
                .collect()
        };
        (listed("imagePullSecrets"), listed("secrets"))
    };
    wait_for(
        "the existing ServiceAccount attached",
        Duration::from_secs(30),
        || async {
            default_lists().await == (vec!["pull-secret".into()], vec!["pull-secret".into()])
        },
    )
    .await;
    // Opting out: the label is gone first, then the Secret is deleted and the references the
    // service added are taken back, in a namespace the fence no longer counts as opted in.
    inj.set_opt_in(&team, false).await;
    wait_for(
        "Secret deleted on opt-out",
        Duration::from_secs(30),
        || async { get_secret(&admin, &team).await.is_none() },
    )
    .await;
    wait_for(
        "the references taken back on opt-out",
        Duration::from_secs(30),
        || async { default_lists().await == (vec![], vec![]) },
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

    // 5. What the fence refuses the same identity, though RBAC would allow it: each request a
    //    leaked token of it made on 1.37 (issue 23), and more of the same kinds.
    // `opted` carries the opt-in label the fence reads, but not this test's `e2e-run` label: the
    // running service leaves it alone, so nothing it does there races with these requests.
    let opted = "t-rbac-fenced".to_string();
    create_namespace(
        &admin,
        &opted,
        [(
            "pull-secret-injector.io/inject".to_string(),
            "enabled".to_string(),
        )]
        .into(),
    )
    .await;
    let plain = inj.namespace("out", false).await;
    let fenced = |result: Result<(), String>, what: &str, expected: &str| {
        let refused = result.expect_err(what);
        assert!(refused.contains(expected), "{what}: {refused}");
    };
    // TokenRequests: a configured audience, at most the configured lifetime, opted in only.
    token_request(&as_sa, &opted, AUDIENCE, 3600)
        .await
        .expect("the configured audience and lifetime, opted in");
    fenced(
        token_request(&as_sa, &opted, "https://attacker.example", 600).await,
        "another audience",
        "exactly one configured audience",
    );
    fenced(
        token_request(&as_sa, &opted, AUDIENCE, 30 * 86400).await,
        "30 days",
        "at most the configured expirationSeconds",
    );
    fenced(
        token_request(&as_sa, &opted, AUDIENCE, 3601).await,
        "a second longer than configured",
        "at most the configured expirationSeconds",
    );
    for ns in [plain.as_str(), "kube-system", NS] {
        fenced(
            token_request(&as_sa, ns, AUDIENCE, 600).await,
            ns,
            "only in namespaces that opted in",
        );
    }
    // Creating Secrets: its pull Secret, in an opted-in namespace only.
    create_secret_as(&as_sa, &opted, "pull-secret", DOCKER, true)
        .await
        .expect("a pull Secret as the config names it");
    for (ns, name, type_, labelled, expected) in [
        (
            &*opted,
            "pull-secret",
            "Opaque",
            true,
            "only kubernetes.io/dockerconfigjson",
        ),
        (
            &opted,
            "database-password",
            DOCKER,
            true,
            "only Secrets of the configured name",
        ),
        (&opted, "pull-secret", DOCKER, false, "managed-by"),
        (
            &plain,
            "pull-secret",
            DOCKER,
            true,
            "only in namespaces that opted in",
        ),
        (
            "kube-system",
            "pull-secret",
            DOCKER,
            true,
            "only in namespaces that opted in",
        ),
    ] {
        fenced(
            create_secret_as(&as_sa, ns, name, type_, labelled).await,
            &format!("{ns}/{name} {type_} labelled: {labelled}"),
            expected,
        );
    }
    // Someone else's Secret of the configured name is out of reach: not replaced (the label
    // added to pass for one of its own), not deleted; OpenShift's cluster-wide pull Secret
    // included.
    create_namespace(&admin, "openshift-config", Default::default()).await;
    for ns in [plain.as_str(), "openshift-config"] {
        let users = Api::<Secret>::namespaced(admin.clone(), ns);
        let _ = users.delete("pull-secret", &DeleteParams::default()).await;
        let theirs: Secret = serde_json::from_value(json!({
            "metadata": {"name": "pull-secret"}, "type": DOCKER,
            "data": {".dockerconfigjson": base64_of(r#"{"auths":{"registry.example.com":{"auth":"dXNlcjpzZWNyZXQ="}}}"#)},
        }))
        .unwrap();
        users.create(&PostParams::default(), &theirs).await.unwrap();
        let mut taken = users.get("pull-secret").await.unwrap();
        taken.metadata.labels = Some(
            [(
                "app.kubernetes.io/managed-by".to_string(),
                "pull-secret-injector".to_string(),
            )]
            .into(),
        );
        taken.data = Some(
            [(
                ".dockerconfigjson".to_string(),
                k8s_openapi::ByteString(b"{}".to_vec()),
            )]
            .into(),
        );
        fenced(
            Api::<Secret>::namespaced(as_sa.clone(), ns)
                .replace("pull-secret", &PostParams::default(), &taken)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            &format!("replacing {ns}/pull-secret"),
            "changes and deletes only Secrets it manages",
        );
        fenced(
            Api::<Secret>::namespaced(as_sa.clone(), ns)
                .delete("pull-secret", &DeleteParams::default())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            &format!("deleting {ns}/pull-secret"),
            "changes and deletes only Secrets it manages",
        );
        let kept = users.get("pull-secret").await.unwrap();
        assert!(
            kept.metadata.labels.as_ref().is_none_or(|l| l.is_empty()),
            "{ns}"
        );
        assert_eq!(
            docker_config(&kept)["auths"]["registry.example.com"]["auth"],
            "dXNlcjpzZWNyZXQ="
        );
    }
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone());
    let _ = namespaces
        .delete("openshift-config", &DeleteParams::default())
        .await;
    // ServiceAccounts: no cloud identity, no token mounting, no references but its own Secret's,
    // and references added only where the namespace opted in.
    let patch_as = |ns: &str, body: Value| {
        let api = Api::<ServiceAccount>::namespaced(as_sa.clone(), ns);
        async move {
            api.patch("default", &PatchParams::default(), &Patch::Merge(body))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    for ns in [plain.as_str(), &opted] {
        for annotation in [
            "eks.amazonaws.com/role-arn",
            "azure.workload.identity/client-id",
            "iam.gke.io/gcp-service-account",
        ] {
            fenced(
                patch_as(
                    ns,
                    json!({"metadata": {"annotations": {annotation: "attacker"}}}),
                )
                .await,
                &format!("{annotation} in {ns}"),
                "changes only references to its own Secret",
            );
        }
        fenced(
            patch_as(ns, json!({"automountServiceAccountToken": true})).await,
            &format!("automountServiceAccountToken in {ns}"),
            "changes only references to its own Secret",
        );
        fenced(
            patch_as(ns, json!({"metadata": {"labels": {"a": "b"}}})).await,
            &format!("a label in {ns}"),
            "changes only references to its own Secret",
        );
    }
    fenced(
        patch_as(
            &opted,
            json!({"imagePullSecrets": [{"name": "pull-secret"}, {"name": "database-password"}]}),
        )
        .await,
        "another Secret's reference",
        "changes only references to its own Secret",
    );
    for ns in [plain.as_str(), "kube-system"] {
        fenced(
            patch_as(ns, json!({"imagePullSecrets": [{"name": "pull-secret"}]})).await,
            &format!("imagePullSecrets in {ns}"),
            "only in namespaces that opted in",
        );
    }
    // A reference the user wrote is not the service's to take back, opted in or not.
    Api::<ServiceAccount>::namespaced(admin.clone(), &plain)
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"imagePullSecrets": [{"name": "pull-secret"}]})),
        )
        .await
        .unwrap();
    fenced(
        patch_as(&plain, json!({"imagePullSecrets": []})).await,
        "a user's reference taken",
        "takes back only the references its pull-secret-injector.io/injected-into annotation names",
    );
    let _ = namespaces.delete(&opted, &DeleteParams::default()).await;
    inj.cleanup().await;
}

/// Reads the webhook configuration `pull-secret-injector` as the admin, changes it with
/// `change` and replaces it as `client`; the API server's refusal as text.
async fn replace_webhook_as(
    admin: &kube::Client,
    client: &kube::Client,
    change: impl FnOnce(&mut Value),
) -> Result<(), String> {
    let current = Api::<MutatingWebhookConfiguration>::all(admin.clone())
        .get("pull-secret-injector")
        .await
        .unwrap();
    let mut object = serde_json::to_value(&current).unwrap();
    change(&mut object);
    let object: MutatingWebhookConfiguration = serde_json::from_value(object).unwrap();
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .replace("pull-secret-injector", &PostParams::default(), &object)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

const DOCKER: &str = "kubernetes.io/dockerconfigjson";

/// A TokenRequest for `default` in `namespace` as `client`, for one audience and `seconds`; the
/// API server's refusal as text.
async fn token_request(
    client: &kube::Client,
    namespace: &str,
    audience: &str,
    seconds: i64,
) -> Result<(), String> {
    let request: k8s_openapi::api::authentication::v1::TokenRequest = serde_json::from_value(
        json!({"spec": {"audiences": [audience], "expirationSeconds": seconds}}),
    )
    .unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request("default", &PostParams::default(), &request)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Creates (dry run) a Secret as `client`: of `type_`, labelled managed-by this service or not.
async fn create_secret_as(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    type_: &str,
    labelled: bool,
) -> Result<(), String> {
    let labels = if labelled {
        json!({"app.kubernetes.io/managed-by": "pull-secret-injector"})
    } else {
        json!({})
    };
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "type": type_,
        "data": {".dockerconfigjson": "e30="},
    }))
    .unwrap();
    let params = PostParams {
        dry_run: true,
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&params, &secret)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Issue 21, sizing: with `resources` empty the chart sizes the service from the Secrets it will
/// keep and their lifetime, by the README's formula; `resources` set wins.
#[test]
fn the_chart_sizes_the_service_from_the_secrets_it_keeps() {
    let container = |values: Value| {
        let objects = helm_objects(&values.to_string());
        let deployment = find(&objects, "Deployment");
        deployment["spec"]["template"]["spec"]["containers"][0]["resources"].clone()
    };
    // (Secrets, token lifetime) -> requests (cpu m, memory Mi), limits (cpu m, memory Mi):
    // memory 64 Mi + 8 KiB per Secret, CPU 50m + 2.2 ms per renewal per second.
    for (secrets, lifetime, requests, limits) in [
        (1_000, 3_600, (51, 72), (1_000, 256)),
        (100_000, 3_600, (148, 846), (1_000, 1_692)),
        (100_000, 600, (637, 846), (1_274, 1_692)),
        (1_000_000, 3_600, (1_028, 7_877), (2_056, 15_754)),
    ] {
        let values = json!({"sizing": {"secrets": secrets, "tokenLifetimeSeconds": lifetime}});
        let r = container(values);
        let pair = |side: &str| {
            (
                r[side]["cpu"].as_str().unwrap_or_default().to_string(),
                r[side]["memory"].as_str().unwrap_or_default().to_string(),
            )
        };
        assert_eq!(
            (pair("requests"), pair("limits")),
            (
                (format!("{}m", requests.0), format!("{}Mi", requests.1)),
                (format!("{}m", limits.0), format!("{}Mi", limits.1))
            ),
            "{secrets} Secrets of {lifetime} s"
        );
    }
    let mine = json!({"requests": {"cpu": "2", "memory": "3Gi"}});
    assert_eq!(container(json!({"resources": mine})), mine);
}

/// The chart's self-fencing policy allows exactly the audiences (`Config::token_audiences`) and
/// at most the lifetime (`Config::max_token_seconds`) the config it renders requests tokens
/// for, and its RBAC exactly those ServiceAccounts (`Config::token_service_accounts`), for
/// every token source and its defaults; none at all when every source reads a token file (an
/// empty `resourceNames` would grant every name).
#[test]
fn the_fence_and_rbac_allow_exactly_the_token_requests_the_config_makes() {
    let gcp =
        "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/q";
    for registries in [
        json!([{"host": "registry.example.com", "kubernetes": {"audience": "https://registry.example.com"}}]),
        json!([
            {"host": "a.example", "kubernetes": {"audience": "https://a.example", "expirationSeconds": 1800}},
            {"host": "b.example", "kubernetes": {"audience": "https://a.example", "serviceAccount": "puller"}},
            {"host": "cgr.dev", "chainguard": {"identity": "0123abcd"}},
            {"host": "quay.io", "quay": {"robot": "acme+r", "audience": "quay-fed",
                "serviceAccountToken": {"fromNamespace": {"serviceAccount": "quay-puller", "expirationSeconds": 7200}}}},
            {"host": "1.dkr.ecr.eu-west-1.amazonaws.com", "ecr": {"roleArn": "arn:aws:iam::1:role/r", "region": "eu-west-1"}},
            {"host": "acme.azurecr.io", "acr": {"clientId": "c", "tenantId": "t"}},
            {"host": "europe-docker.pkg.dev", "gcp": {"workloadIdentityProvider": gcp}},
            {"host": "x.example", "tokenExchange": {"endpoint": "https://sts.example/token", "username": "u", "subjectTokenAudience": "sts.example"}},
            {"host": "acme.jfrog.io", "artifactory": {"providerName": "k8s", "audience": "jfrog",
                "serviceAccountToken": {"fromNamespace": {"serviceAccount": "jfrog-puller"}}}},
            {"host": "docker.cloudsmith.io", "cloudsmith": {"organization": "acme", "serviceSlug": "s", "audience": "cloudsmith"}},
            {"host": "keeper.example", "artifactKeeper": {"audience": "artifact-keeper",
                "serviceAccountToken": {"fromNamespace": {"expirationSeconds": 5400}}}},
            {"host": "docker.io", "dockerHub": {"connectionId": "0b6bb0a4-9c3f-4f0e-8d1e-2a7c5e9f3d10", "organization": "acme"}},
            {"host": "cri.example.cn-hangzhou.cr.aliyuncs.com", "alibaba": {"region": "cn-hangzhou", "instanceId": "cri-x",
                "roleArn": "acs:ram::1:role/r", "oidcProviderArn": "acs:ram::1:oidc-provider/p"}},
            {"host": "d.example", "declarative": {"url": "https://d.example/token", "audience": "d-aud",
                "token": {"in": "bearer"}, "username": "robot",
                "serviceAccountToken": {"fromNamespace": {"serviceAccount": "d-puller"}}}},
            {"host": "file.example", "quay": {"robot": "acme+f", "audience": "not-requested",
                "serviceAccountToken": {"file": "/var/run/secrets/tokens/quay"}}}
        ]),
        json!([{"host": "file.example", "quay": {"robot": "acme+f", "audience": "q",
            "serviceAccountToken": {"file": "/var/run/secrets/tokens/quay"}}}]),
    ] {
        let values = json!({"config": {"registries": registries}}).to_string();
        let objects = helm_objects(&values);
        let config = find(&objects, "ConfigMap")["data"]["config.yaml"]
            .as_str()
            .unwrap()
            .to_string();
        let config = pull_secret_injector::config::Config::from_yaml(&config)
            .unwrap_or_else(|e| panic!("{e}"));
        let variable = |name: &str| fence_variable(&objects, name);
        // The CEL list literal is a JSON array, the number a JSON number.
        let allowed: Vec<String> = serde_json::from_str(&variable("audiences")).unwrap();
        assert_eq!(allowed, config.token_audiences(), "{registries}");
        let longest: i64 = variable("maxTokenSeconds").parse().unwrap();
        assert_eq!(longest, config.max_token_seconds(), "{registries}");
        let token_rules: Vec<&Value> = find(&objects, "ClusterRole")["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["resources"] == json!(["serviceaccounts/token"]))
            .collect();
        let expected = config.token_service_accounts();
        if expected.is_empty() {
            assert!(token_rules.is_empty(), "{token_rules:?}");
        } else {
            assert_eq!(token_rules.len(), 1);
            assert_eq!(
                token_rules[0]["resourceNames"],
                json!(expected),
                "{registries}"
            );
        }
    }
    // The kustomize base spells the same out for its ConfigMap.
    let base = base_objects();
    let config = find(&base, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let config = pull_secret_injector::config::Config::from_yaml(&config).unwrap();
    let longest: i64 = fence_variable(&base, "maxTokenSeconds").parse().unwrap();
    assert_eq!(longest, config.max_token_seconds());
    let allowed: Vec<String> = serde_json::from_str(&fence_variable(&base, "audiences")).unwrap();
    assert_eq!(allowed, config.token_audiences());
}

/// The CEL of variable `name` of the self-fencing policy among `objects`.
fn fence_variable(objects: &[Value], name: &str) -> String {
    find(objects, "ValidatingAdmissionPolicy")["spec"]["variables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no variable {name}"))["expression"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The shipped credential-provider files agree: each provider of the kubelet's config asks
/// for the audience its registry's source presents in the plugin config (and for the
/// annotations that source reads), every registry has a provider, and the node RBAC grants
/// exactly the providers' audiences (issue 23: it granted one of three, so two providers got
/// no token as shipped). The plugin config is the source of truth; the other two must follow.
#[test]
fn the_node_rbac_grants_the_audiences_the_kubelet_config_asks_for() {
    let dir = repo().join("deploy/credential-provider");
    let plugin = pull_secret_injector::credential_provider::PluginConfig::from_yaml(
        &std::fs::read_to_string(dir.join("pull-secret-injector.yaml")).unwrap(),
    )
    .unwrap();
    let kubelet = &yaml_docs(
        &std::fs::read_to_string(dir.join("kubelet-credential-provider-config.yaml")).unwrap(),
    )[0];
    let mut audiences = std::collections::BTreeSet::new();
    let mut covered = std::collections::BTreeSet::new();
    for provider in kubelet["providers"].as_array().unwrap() {
        let audience = provider["tokenAttributes"]["serviceAccountTokenAudience"]
            .as_str()
            .unwrap();
        audiences.insert(audience.to_string());
        let annotations: Vec<&str> = provider["tokenAttributes"]
            ["requiredServiceAccountAnnotationKeys"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        for image in provider["matchImages"].as_array().unwrap() {
            let registry = plugin
                .registry_for(&format!("{}/app", image.as_str().unwrap()))
                .unwrap_or_else(|e| panic!("{image}: {}", e.line()));
            covered.insert(registry.host.clone());
            assert_eq!(
                registry.source.token_audience(),
                audience,
                "{image}: the provider's audience is not the one its source presents"
            );
            for key in registry.source.annotation_keys() {
                assert!(annotations.contains(&key), "{image}: {key} not passed");
            }
        }
    }
    let hosts: std::collections::BTreeSet<String> =
        plugin.registries.iter().map(|r| r.host.clone()).collect();
    assert_eq!(
        covered, hosts,
        "every registry of the plugin config has a provider"
    );
    let rbac = yaml_docs(&std::fs::read_to_string(dir.join("rbac.yaml")).unwrap());
    let role = find(&rbac, "ClusterRole");
    assert_eq!(role["rules"].as_array().unwrap().len(), 1);
    let granted: std::collections::BTreeSet<String> = role["rules"][0]["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert_eq!(granted, audiences, "the node RBAC's audiences");
}

/// The fence's "opted in" (CEL over the namespace's labels, rendered by the chart from
/// `config.namespaceSelector` and `excludedNamespaces`) is the service's own
/// `NamespacePolicy::eligibility`, for every operator a LabelSelector has: the API server
/// answers a pull Secret's creation as that ServiceAccount in namespaces with and without the
/// labels each operator looks at.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_counts_as_opted_in_exactly_the_namespaces_the_service_serves() {
    let _serial = serial();
    let admin = ControlPlane::get().client().await;
    let sa = "psi-selector";
    let selector = json!({
        "matchLabels": {"tier": "web"},
        "matchExpressions": [
            {"key": "env", "operator": "In", "values": ["prod", "stage"]},
            {"key": "zone", "operator": "NotIn", "values": ["dmz"]},
            {"key": "team", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"},
        ],
    });
    let excluded = "psi-sel-excluded";
    let values = json!({"name": sa, "createNamespace": true, "config": {
        "namespaceSelector": selector, "excludedNamespaces": [excluded]}});
    let fence = apply_fence_and_rbac(&admin, &values.to_string()).await;
    // The service's answer, from the config the chart renders (Helm merges the values into the
    // default selector: its opt-in label stays).
    let config = find(&helm_objects(&values.to_string()), "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let config = pull_secret_injector::config::Config::from_yaml(&config).unwrap();
    let policy = pull_secret_injector::core::namespaces::NamespacePolicy::new(
        config.namespace_selector,
        Some(NS),
        &config.excluded_namespaces,
    );
    let good = [
        ("pull-secret-injector.io/inject", "enabled"),
        ("tier", "web"),
        ("env", "prod"),
        ("team", "a"),
    ];
    let with = |extra: &[(&str, &str)], without: &[&str]| {
        good.iter()
            .chain(extra)
            .filter(|(k, _)| !without.contains(k))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let cases = [
        ("psi-sel-all", with(&[], &[])),
        (
            "psi-sel-stage",
            with(&[("env", "stage"), ("zone", "eu")], &[]),
        ),
        ("psi-sel-empty-team", with(&[("team", "")], &[])),
        ("psi-sel-dmz", with(&[("zone", "dmz")], &[])),
        ("psi-sel-legacy", with(&[("legacy", "yes")], &[])),
        ("psi-sel-no-team", with(&[], &["team"])),
        ("psi-sel-dev", with(&[("env", "dev")], &[])),
        ("psi-sel-no-env", with(&[], &["env"])),
        ("psi-sel-api", with(&[("tier", "api")], &[])),
        (
            "psi-sel-not-in",
            with(&[], &["pull-secret-injector.io/inject"]),
        ),
        ("psi-sel-none", Default::default()),
        (excluded, with(&[], &[])),
    ];
    let as_sa = client_as(&admin, sa).await;
    wait_for("the fence in force", Duration::from_secs(30), || async {
        create_secret_as(&as_sa, "kube-system", "pull-secret", DOCKER, true)
            .await
            .is_err()
    })
    .await;
    let mut served = 0;
    for (name, labels) in &cases {
        create_namespace(&admin, name, labels.clone()).await;
        let expected = policy.eligibility(name, Some(labels))
            == pull_secret_injector::core::namespaces::Eligibility::OptedIn;
        served += usize::from(expected);
        let answer = create_secret_as(&as_sa, name, "pull-secret", DOCKER, true).await;
        match (expected, answer) {
            (true, Ok(())) => {}
            (false, Err(e)) if e.contains("only in namespaces that opted in") => {}
            (expected, answer) => {
                panic!("{name} {labels:?}: served by the service: {expected}, fence: {answer:?}")
            }
        }
    }
    assert_eq!(served, 3, "the cases cover both answers");
    for ns in [NS, "kube-system"] {
        let refused = create_secret_as(&as_sa, ns, "pull-secret", DOCKER, true).await;
        assert!(
            refused.is_err_and(|e| e.contains("only in namespaces that opted in")),
            "{ns}"
        );
    }
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone());
    for (name, _) in &cases {
        let _ = namespaces.delete(name, &DeleteParams::default()).await;
    }
    delete_untyped(&admin, &fence).await;
}

/// remediation.mode evictStuckPods: the chart grants evictions (and nothing else more), and the
/// fence keeps them to namespaces that opted in (not the service's own, not kube-system), with
/// the Pod's own grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_are_granted_with_evict_stuck_pods_and_fenced_to_opted_in_namespaces() {
    let _serial = serial();
    let admin = ControlPlane::get().client().await;
    let sa = "psi-evict";
    let values = json!({"name": sa, "createNamespace": true,
        "config": {"remediation": {"mode": "evictStuckPods"}}});
    let fence = apply_fence_and_rbac(&admin, &values.to_string()).await;
    let (opted, plain) = ("psi-evict-team", "psi-evict-plain");
    let enabled = std::collections::BTreeMap::from([(
        "pull-secret-injector.io/inject".to_string(),
        "enabled".to_string(),
    )]);
    create_namespace(&admin, opted, enabled).await;
    create_namespace(&admin, plain, Default::default()).await;
    // RBAC: evictions anywhere (it cannot say where); still no deleting or changing Pods.
    for ns in [opted, plain] {
        assert!(
            can_as(
                &admin,
                sa,
                "create",
                "",
                "pods/eviction",
                Some(ns),
                Some("p")
            )
            .await
        );
        let pdbs = "poddisruptionbudgets";
        assert!(can_as(&admin, sa, "list", "policy", pdbs, Some(ns), None).await);
        assert!(!can_as(&admin, sa, "update", "policy", pdbs, Some(ns), Some("b")).await);
        for verb in ["delete", "update", "patch"] {
            assert!(!can_as(&admin, sa, verb, "", "pods", Some(ns), Some("p")).await);
        }
    }
    // Unscheduled Pods (no node here) are evicted at once: no budget, nothing running. They
    // meet Pod Security `restricted`, which the chart's namespace (here NS) enforces.
    let pod = |name: &str| -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name},
            "spec": {"securityContext": {"runAsNonRoot": true, "runAsUser": 65534,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "c", "image": "registry.example.com/app",
                                     "securityContext": {"allowPrivilegeEscalation": false,
                                                         "capabilities": {"drop": ["ALL"]}}}]}}))
        .unwrap()
    };
    for ns in [opted, plain, NS, "kube-system"] {
        for name in ["stuck", "hurried"] {
            Api::<Pod>::namespaced(admin.clone(), ns)
                .create(&PostParams::default(), &pod(&format!("{sa}-{name}")))
                .await
                .unwrap();
        }
    }
    let as_sa = client_as(&admin, sa).await;
    let evict = |ns: &'static str, name: &'static str, grace: Option<i64>| {
        let as_sa = as_sa.clone();
        async move {
            let mut body = json!({"apiVersion": "policy/v1", "kind": "Eviction",
                "metadata": {"name": name, "namespace": ns}});
            if let Some(g) = grace {
                body["deleteOptions"] = json!({"gracePeriodSeconds": g});
            }
            let path = format!("/api/v1/namespaces/{ns}/pods/{name}/eviction");
            let (status, _, text) = post(&as_sa, &path, &body).await;
            if status.is_success() {
                Ok(())
            } else {
                Err(format!("{status} {text}"))
            }
        }
    };
    // RBAC and the fence both in force: a Pod that does not exist, refused by the fence.
    wait_for("the fence in force", Duration::from_secs(30), || async {
        evict(plain, "psi-evict-probe", None)
            .await
            .is_err_and(|e| e.contains("only in namespaces that opted in"))
    })
    .await;
    evict(opted, "psi-evict-stuck", None)
        .await
        .expect("evicted where the namespace opted in");
    for ns in [plain, NS, "kube-system"] {
        let e = evict(ns, "psi-evict-stuck", None).await.unwrap_err();
        assert!(
            e.contains("evicts Pods only in namespaces that opted in"),
            "{ns}: {e}"
        );
    }
    let e = evict(opted, "psi-evict-hurried", Some(0))
        .await
        .unwrap_err();
    assert!(e.contains("with their own termination grace period"), "{e}");
    let gone = Api::<Pod>::namespaced(admin.clone(), opted)
        .get_opt("psi-evict-stuck")
        .await
        .unwrap();
    assert!(
        gone.is_none_or(|p| p.metadata.deletion_timestamp.is_some()),
        "the evicted Pod is deleted"
    );
    for ns in [NS, "kube-system"] {
        for name in ["stuck", "hurried"] {
            let _ = Api::<Pod>::namespaced(admin.clone(), ns)
                .delete(&format!("{sa}-{name}"), &DeleteParams::default())
                .await;
        }
    }
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone());
    for ns in [opted, plain] {
        let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    }
    delete_untyped(&admin, &fence).await;
}

/// Applies the chart's Namespace, ServiceAccount, RBAC and self-fencing policy for `values`
/// (for real: the RBAC is what SubjectAccessReviews and real requests are answered by); returns
/// the policy and its binding, to delete when done (they are cluster-wide).
async fn apply_fence_and_rbac(admin: &kube::Client, values: &str) -> Vec<Value> {
    let rendered = helm_objects(values);
    for object in rendered.iter().filter(|o| {
        matches!(
            o["kind"].as_str(),
            Some(
                "Namespace"
                    | "ServiceAccount"
                    | "ClusterRole"
                    | "ClusterRoleBinding"
                    | "Role"
                    | "RoleBinding"
                    | "ValidatingAdmissionPolicy"
                    | "ValidatingAdmissionPolicyBinding"
            )
        )
    }) {
        if let Some(ns) = object["metadata"]["namespace"].as_str() {
            if object["kind"] != "Namespace" && ns != NS {
                create_namespace_if_missing(admin, ns).await;
            }
        }
        apply(admin, object, false)
            .await
            .expect("served")
            .unwrap_or_else(|e| panic!("{}: {e}", object["kind"]));
    }
    rendered
        .into_iter()
        .filter(|o| {
            o["kind"]
                .as_str()
                .is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy"))
        })
        .collect()
}

async fn create_namespace_if_missing(admin: &kube::Client, name: &str) {
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone());
    if namespaces.get_opt(name).await.unwrap().is_none() {
        create_namespace(admin, name, Default::default()).await;
    }
}

/// The fences compare every field the API server knows: every field of a webhook (but
/// `clientConfig.caBundle`) and of its configuration, every field of a ServiceAccount. A field
/// a later Kubernetes adds fails this test until the fence compares it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_compares_every_field_the_api_server_knows() {
    let admin = ControlPlane::get().client().await;
    let schemas = |path: &'static str| {
        let admin = admin.clone();
        async move {
            let request = http::Request::get(path).body(Vec::new()).unwrap();
            let doc: Value = admin.request(request).await.expect(path);
            doc["components"]["schemas"].clone()
        }
    };
    let properties = |schemas: &Value, name: &str| -> Vec<String> {
        schemas[name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("{name} not in the API server's schema"))
            .keys()
            .cloned()
            .collect()
    };
    let base = base_objects();
    let fence = &find(&base, "ValidatingAdmissionPolicy")["spec"]["validations"];
    let validation = |message: &str| -> String {
        fence
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["message"].as_str().unwrap().contains(message))
            .unwrap_or_else(|| panic!("no validation says {message:?}"))["expression"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let admission = schemas("/openapi/v3/apis/admissionregistration.k8s.io/v1").await;
    let webhook_rule = validation("but clientConfig.caBundle");
    assert_eq!(
        properties(
            &admission,
            "io.k8s.api.admissionregistration.v1.MutatingWebhookConfiguration"
        ),
        ["apiVersion", "kind", "metadata", "webhooks"]
    );
    for field in properties(
        &admission,
        "io.k8s.api.admissionregistration.v1.MutatingWebhook",
    ) {
        let compared = match field.as_str() {
            "name" => "o.name == w.name".to_string(),
            "clientConfig" => continue,
            other => format!("w.?{other} == o.?{other}"),
        };
        assert!(webhook_rule.contains(&compared), "{field}: {webhook_rule}");
    }
    for field in properties(
        &admission,
        "io.k8s.api.admissionregistration.v1.WebhookClientConfig",
    ) {
        if field != "caBundle" {
            let compared = format!("w.clientConfig.?{field} == o.clientConfig.?{field}");
            assert!(
                webhook_rule.contains(&compared),
                "clientConfig.{field}: {webhook_rule}"
            );
        }
    }
    let core = schemas("/openapi/v3/api/v1").await;
    assert_eq!(
        properties(&core, "io.k8s.api.core.v1.ServiceAccount"),
        [
            "apiVersion",
            "automountServiceAccountToken",
            "imagePullSecrets",
            "kind",
            "metadata",
            "secrets"
        ],
        "a field the ServiceAccount fence does not compare"
    );
    let account_rule = validation("changes only references to its own Secret");
    for compared in [
        "object.?automountServiceAccountToken == oldObject.?automountServiceAccountToken",
        "variables.newPulls.filter(",
        "variables.newRefs.filter(",
    ] {
        assert!(
            account_rule.contains(compared),
            "{compared}: {account_rule}"
        );
    }
}

/// `pullSecretUpdater.namespaces` keeps the compatibility to those namespaces: the config says
/// so, RBAC grants Secrets there only (Roles, no ClusterRole), and the fence lets the service
/// update only annotated Secrets there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pull_secret_updater_can_be_kept_to_some_namespaces() {
    let _serial = serial();
    let admin = ControlPlane::get().client().await;
    let sa = "psi-updater";
    let (kept, other) = ("psi-upd-kept", "psi-upd-other");
    let values = json!({"name": sa, "createNamespace": true,
        "pullSecretUpdater": {"enabled": true, "namespaces": [kept]}})
    .to_string();
    let rendered = helm_objects(&values);
    let config = find(&rendered, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let config = pull_secret_injector::config::Config::from_yaml(&config).unwrap();
    assert_eq!(config.pull_secret_updater.unwrap().namespaces, [kept]);
    assert!(
        !rendered.iter().any(|o| o["kind"] == "ClusterRole"
            && o["metadata"]["name"] == format!("{sa}-pull-secret-updater")),
        "no cluster-wide Secret access"
    );
    create_namespace_if_missing(&admin, other).await;
    let fence = apply_fence_and_rbac(&admin, &values).await;
    type Access<'a> = (&'a str, &'a str, Option<&'a str>, Option<&'a str>);
    let needed: &[Access] = &[
        ("list", "secrets", Some(kept), None),
        ("watch", "secrets", Some(kept), None),
        ("get", "secrets", Some(kept), Some("cgr")),
        ("update", "secrets", Some(kept), Some("cgr")),
    ];
    for &(verb, resource, namespace, name) in needed {
        assert!(
            can_as(&admin, sa, verb, "", resource, namespace, name).await,
            "needs {verb} {resource} {namespace:?} {name:?}"
        );
    }
    let refused: &[Access] = &[
        ("list", "secrets", None, None),
        ("list", "secrets", Some(other), None),
        ("get", "secrets", Some(other), Some("cgr")),
        ("update", "secrets", Some(other), Some("cgr")),
        ("delete", "secrets", Some(kept), Some("cgr")),
    ];
    for &(verb, resource, namespace, name) in refused {
        assert!(
            !can_as(&admin, sa, verb, "", resource, namespace, name).await,
            "must not {verb} {resource} {namespace:?} {name:?}"
        );
    }
    // As its token: an annotated Secret there is updated, an unannotated one is not.
    let as_sa = client_as(&admin, sa).await;
    let secrets = Api::<Secret>::namespaced(admin.clone(), kept);
    for (name, annotated) in [("cgr", true), ("plain", false)] {
        let _ = secrets.delete(name, &DeleteParams::default()).await;
        let annotations = if annotated {
            json!({"pull-secret-updater.chainguard.dev/identity": "0123abcd"})
        } else {
            json!({})
        };
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations}, "type": DOCKER,
            "data": {".dockerconfigjson": base64_of("{}")}}))
        .unwrap();
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    let fill = |name: &'static str| {
        let admin = secrets.clone();
        let mine = Api::<Secret>::namespaced(as_sa.clone(), kept);
        async move {
            let mut secret = admin.get(name).await.unwrap();
            secret.data = Some(
                [(
                    ".dockerconfigjson".to_string(),
                    k8s_openapi::ByteString(br#"{"auths":{"cgr.dev":{}}}"#.to_vec()),
                )]
                .into(),
            );
            mine.replace(name, &PostParams::default(), &secret)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    wait_for("the fence in force", Duration::from_secs(30), || async {
        fill("plain").await.is_err()
    })
    .await;
    fill("cgr").await.expect("an annotated Secret");
    let refused = fill("plain").await.unwrap_err();
    assert!(
        refused.contains("managed-by=pull-secret-injector"),
        "{refused}"
    );
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone());
    for ns in [kept, other] {
        let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    }
    delete_untyped(&admin, &fence).await;
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
    let values = r#"{"rbac": {"serviceAccountScope": true},
        "config": {"identityScope": "serviceAccount", "secretName": "pull-creds",
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

/// `rbac.serviceAccountScope` grants what `identityScope: serviceAccount` needs (Secrets named
/// `<serviceAccount>-<secretName>`, TokenRequests for any ServiceAccount) and still nothing
/// else; the API server's own authorizer answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_account_scope_rbac_grants_per_service_account_secrets_and_tokens() {
    let _serial = serial();
    let admin = ControlPlane::get().client().await;
    let sa = "psi-sa-scope";
    let values = format!(
        r#"{{"name": "{sa}", "createNamespace": true, "rbac": {{"serviceAccountScope": true}},
            "config": {{"identityScope": "serviceAccount"}}}}"#
    );
    let rendered = helm_objects(&values);
    for object in rendered.iter().filter(|o| {
        matches!(
            o["kind"].as_str(),
            Some(
                "Namespace"
                    | "ServiceAccount"
                    | "ClusterRole"
                    | "ClusterRoleBinding"
                    | "Role"
                    | "RoleBinding"
                    | "ValidatingAdmissionPolicy"
                    | "ValidatingAdmissionPolicyBinding"
            )
        )
    }) {
        apply(&admin, object, false)
            .await
            .expect("served")
            .unwrap_or_else(|e| panic!("{}: {e}", object["kind"]));
    }
    let ns = Some("some-team");
    type Access<'a> = (&'a str, &'a str, &'a str, Option<&'a str>, Option<&'a str>);
    let needed: &[Access] = &[
        ("get", "", "secrets", ns, Some("app-pull-secret")),
        ("list", "", "secrets", None, None),
        ("watch", "", "secrets", None, None),
        ("update", "", "secrets", ns, Some("app-pull-secret")),
        ("delete", "", "secrets", ns, Some("app-pull-secret")),
        ("create", "", "secrets", ns, None),
        ("create", "", "serviceaccounts/token", ns, Some("app")),
        ("patch", "", "serviceaccounts", ns, Some("app")),
    ];
    for &(verb, group, resource, namespace, name) in needed {
        assert!(
            can_as(&admin, sa, verb, group, resource, namespace, name).await,
            "needs {verb} {group}/{resource} {namespace:?} {name:?}"
        );
    }
    let refused: &[Access] = &[
        ("create", "", "pods", ns, None),
        ("get", "", "configmaps", ns, Some("x")),
        ("delete", "", "serviceaccounts", ns, Some("app")),
        ("update", "", "namespaces", None, Some("some-team")),
        ("create", "", "serviceaccounts", ns, None),
        ("*", "*", "*", ns, None),
    ];
    for &(verb, group, resource, namespace, name) in refused {
        assert!(
            !can_as(&admin, sa, verb, group, resource, namespace, name).await,
            "must not {verb} {group}/{resource} {namespace:?} {name:?}"
        );
    }
    // The self-fencing policy of this scope: a Secret named `<sa>-pull-secret` and owned by that
    // ServiceAccount, nothing else, as the ServiceAccount's own token, in a namespace that
    // opted in.
    let as_sa = client_as(&admin, sa).await;
    let team = "psi-sa-team";
    create_namespace_if_missing(&admin, team).await;
    Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone())
        .patch(
            team,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"pull-secret-injector.io/inject": "enabled"}}}),
            ),
        )
        .await
        .unwrap();
    let secret_as = |name: &str, owner: Option<&str>| {
        let owners = owner.map(|o| {
            json!([{"apiVersion": "v1", "kind": "ServiceAccount", "name": o,
                    "uid": "00000000-0000-0000-0000-000000000001"}])
        });
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name, "ownerReferences": owners,
                         "labels": {"app.kubernetes.io/managed-by": "pull-secret-injector"}},
            "type": DOCKER, "data": {".dockerconfigjson": "e30="},
        }))
        .unwrap();
        let api = Api::<Secret>::namespaced(as_sa.clone(), team);
        async move {
            let params = PostParams {
                dry_run: true,
                ..Default::default()
            };
            api.create(&params, &secret)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    wait_for("the fence in force", Duration::from_secs(30), || async {
        secret_as("builder-pull-secret", None).await.is_err()
    })
    .await;
    secret_as("builder-pull-secret", Some("builder"))
        .await
        .expect("its own ServiceAccount's Secret");
    for (name, owner) in [
        ("builder-pull-secret", Some("deployer")),
        ("database-password", Some("builder")),
        ("builder-pull-secret", None),
    ] {
        let refused = secret_as(name, owner).await.expect_err(name);
        assert!(
            refused.contains("only Secrets of the configured name"),
            "{name} {owner:?}: {refused}"
        );
    }
    // RBAC lets this scope read, update and delete every Secret (the names vary); the fence
    // keeps updates and deletions to the Secrets it manages. (Reads cannot be fenced: no
    // admission sees a get, list or watch; docs/security.md.)
    let victim = "psi-sa-victim";
    create_namespace_if_missing(&admin, victim).await;
    for ns in [team, victim] {
        let theirs = Api::<Secret>::namespaced(admin.clone(), ns);
        let _ = theirs
            .delete("database-password", &DeleteParams::default())
            .await;
        let secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": "database-password"}, "stringData": {"password": "hunter2"}}))
        .unwrap();
        theirs
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        let as_theirs = Api::<Secret>::namespaced(as_sa.clone(), ns);
        let refused = as_theirs
            .delete("database-password", &DeleteParams::default())
            .await
            .expect_err("deleting someone else's Secret")
            .to_string();
        assert!(
            refused.contains("changes and deletes only Secrets it manages"),
            "{refused}"
        );
        let mut taken = theirs.get("database-password").await.unwrap();
        taken.metadata.labels = Some(
            [(
                "app.kubernetes.io/managed-by".into(),
                "pull-secret-injector".into(),
            )]
            .into(),
        );
        let refused = as_theirs
            .replace("database-password", &PostParams::default(), &taken)
            .await
            .expect_err("taking someone else's Secret")
            .to_string();
        assert!(
            refused.contains("only kubernetes.io/dockerconfigjson"),
            "{refused}"
        );
        assert!(
            theirs.get_opt("database-password").await.unwrap().is_some(),
            "{ns}"
        );
    }
    // On a ServiceAccount, its own Secret's reference only: `<sa>-pull-secret`.
    let builder: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "builder"}})).unwrap();
    let accounts = Api::<ServiceAccount>::namespaced(admin.clone(), team);
    let _ = accounts.create(&PostParams::default(), &builder).await;
    let attach_as_sa = |secret: &str| {
        let api = Api::<ServiceAccount>::namespaced(as_sa.clone(), team);
        let body = json!({"imagePullSecrets": [{"name": secret}]});
        async move {
            let params = PatchParams {
                dry_run: true,
                ..Default::default()
            };
            api.patch("builder", &params, &Patch::Merge(body))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    };
    attach_as_sa("builder-pull-secret")
        .await
        .expect("its own Secret");
    let refused = attach_as_sa("pull-secret").await.expect_err("another name");
    assert!(
        refused.contains("changes only references to its own Secret"),
        "{refused}"
    );
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin.clone());
    for ns in [team, victim] {
        let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    }
    for object in rendered.iter().filter(|o| {
        o["kind"]
            .as_str()
            .is_some_and(|k| k.starts_with("Validating"))
    }) {
        let gvk = GroupVersionKind::gvk(
            "admissionregistration.k8s.io",
            "v1",
            object["kind"].as_str().unwrap(),
        );
        let (resource, _) = kube::discovery::pinned_kind(&admin, &gvk).await.unwrap();
        let _ = Api::<DynamicObject>::all_with(admin.clone(), &resource)
            .delete(
                object["metadata"]["name"].as_str().unwrap(),
                &DeleteParams::default(),
            )
            .await;
    }

    // Without the value, the chart keeps the narrow rules (the same test as the base's).
    let narrow = helm_objects(&format!(r#"{{"name": "{sa}"}}"#));
    let role = find(&narrow, "ClusterRole");
    let secrets = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"] == json!(["secrets"]) && r["verbs"].as_array().unwrap().len() > 1)
        .unwrap();
    assert_eq!(secrets["resourceNames"], json!(["pull-secret"]));
}

/// The policy overlay (and the chart with `config.admission.mode: policy`): the API server
/// accepts every object, there is no webhook configuration, `certs` sets no `caBundle`, the
/// service's config says `policy`, and no right on webhook configurations is granted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_overlay_ships_admission_policies_and_no_webhook() {
    let _serial = serial();
    let admin = ControlPlane::get().client().await;
    let objects = kustomize(&repo().join("deploy/kustomize/policy"));
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert!(
        !kinds.contains(&"MutatingWebhookConfiguration"),
        "{kinds:?}"
    );
    for kind in [
        "MutatingAdmissionPolicy",
        "MutatingAdmissionPolicyBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        assert!(kinds.contains(&kind), "{kind} missing: {kinds:?}");
    }
    let deployment = find(&objects, "Deployment");
    let args = &deployment["spec"]["template"]["spec"]["initContainers"][0]["args"];
    assert!(
        !args.to_string().contains("--webhook"),
        "certs sets no caBundle: {args}"
    );
    let config = find(&objects, "ConfigMap")["data"]["config.yaml"]
        .as_str()
        .unwrap()
        .to_string();
    let config = pull_secret_injector::config::Config::from_yaml(&config).unwrap();
    assert_eq!(
        config.admission.mode,
        pull_secret_injector::config::AdmissionMode::Policy
    );
    let role = find(&objects, "ClusterRole");
    assert!(
        !role.to_string().contains("mutatingwebhookconfigurations"),
        "{role}"
    );
    for object in &objects {
        let kind = object["kind"].as_str().unwrap();
        // The Namespace for real (the base test's own); the rest as dry runs.
        apply(&admin, object, kind != "Namespace")
            .await
            .unwrap_or_else(|| panic!("{kind} not served"))
            .unwrap_or_else(|e| panic!("{kind} refused by the API server: {e}"));
    }
    // `matchingImages` is the webhook's alone: the chart refuses it in policy mode.
    let err = helm_render(
        "pull-secret-injector",
        &[],
        r#"{"config": {"admission": {"mode": "policy"}, "inject": "matchingImages"}}"#,
    )
    .unwrap_err();
    assert!(
        err.contains("matchingImages needs config.admission.mode: webhook"),
        "{err}"
    );
}
