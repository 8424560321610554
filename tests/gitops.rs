//! ServiceAccounts managed by GitOps tools, through a real kube-apiserver (docs/gitops.md): a
//! tool stands in as field manager `argocd-controller`, applying its manifests server-side
//! with force as Argo CD and Flux do. `serviceAccounts: apply` keeps the reference through the
//! tool's re-applies; the default `patch` loses it where the manifest declares the list (shown,
//! as the docs say); `never` changes no ServiceAccount while Pods still get the Secret.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};
use support::*;

const TOOL: &str = "argocd-controller";

/// The tool's manifest for ServiceAccount `name`, with `extra` top-level fields.
fn manifest(ns: &str, name: &str, extra: Value) -> Value {
    let mut sa = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}}});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        sa[k] = v;
    }
    sa
}

/// Applies `manifest` server-side as the tool, with force (as Argo CD with ServerSideApply=true
/// and Flux's kustomize-controller do). Returns the stored ServiceAccount.
async fn tool_applies(client: &kube::Client, ns: &str, manifest: &Value) -> ServiceAccount {
    let name = manifest["metadata"]["name"].as_str().unwrap();
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply(TOOL).force(),
            &Patch::Apply(manifest),
        )
        .await
        .expect("the tool's apply")
}

async fn get_sa(client: &kube::Client, ns: &str, name: &str) -> ServiceAccount {
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("read ServiceAccount")
}

fn pulls(sa: &ServiceAccount) -> Vec<String> {
    sa.image_pull_secrets
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .collect()
}

fn refs(sa: &ServiceAccount) -> Vec<String> {
    sa.secrets
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.name)
        .collect()
}

/// The managers holding `imagePullSecrets`, as `manager/operation`.
fn list_owners(sa: &ServiceAccount) -> Vec<String> {
    sa.metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.get("f:imagePullSecrets").is_some())
        })
        .map(|m| {
            format!(
                "{}/{}",
                m.manager.unwrap_or_default(),
                m.operation.unwrap_or_default()
            )
        })
        .collect()
}

/// Every manager named in the ServiceAccount's `managedFields`.
fn managers(sa: &ServiceAccount) -> Vec<String> {
    sa.metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect()
}

async fn wait_sa(
    client: &kube::Client,
    ns: &str,
    name: &str,
    what: &str,
    ok: impl Fn(&ServiceAccount) -> bool,
) -> ServiceAccount {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let sa = get_sa(client, ns, name).await;
        if ok(&sa) {
            return sa;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for ServiceAccount {ns}/{name}: {what}; it is {:?}",
            (pulls(&sa), refs(&sa), managers(&sa))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const SECRET: &str = "pull-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_mode_keeps_the_reference_through_the_tools_reapply() {
    let _serial = serial();
    // As the chart registers it with serviceAccounts: apply: Pods only.
    let mut inj = Injector::start_for(
        "g1",
        &kubernetes_registry("default", 3600),
        "serviceAccounts: apply\n",
        &["pods"],
    )
    .await;
    let c = inj.client.clone();
    let ns = inj.namespace("argo", true).await;

    // A ServiceAccount the tool applies, its manifest without imagePullSecrets.
    let app = manifest(&ns, "app", json!({}));
    let created = tool_applies(&c, &ns, &app).await;
    assert!(pulls(&created).is_empty(), "not patched at admission");
    let sa = wait_sa(&c, &ns, "app", "the Secret applied", |sa| {
        pulls(sa) == [SECRET] && refs(sa) == [SECRET]
    })
    .await;
    assert_eq!(
        list_owners(&sa),
        ["pull-secret-injector/Apply"],
        "imagePullSecrets held by the service's own field manager"
    );

    // The tool applies the same manifest again (a sync): the reference stays, nothing
    // conflicts, and the tool holds none of what the service added.
    let after = tool_applies(&c, &ns, &app).await;
    assert_eq!(pulls(&after), [SECRET], "kept through the tool's apply");
    assert_eq!(refs(&after), [SECRET]);
    assert_eq!(
        after.metadata.resource_version, sa.metadata.resource_version,
        "the tool's apply changed nothing"
    );
    let no_force = Api::<ServiceAccount>::namespaced(c.clone(), &ns)
        .patch("app", &PatchParams::apply(TOOL), &Patch::Apply(&app))
        .await;
    assert!(no_force.is_ok(), "no conflict without force: {no_force:?}");

    // A manifest that declares its own list: the service does not take it (the tool's next
    // apply would take it back), only `secrets`, and the tool's apply still meets no conflict.
    let declared = manifest(
        &ns,
        "declared",
        json!({"imagePullSecrets": [{"name": "mine"}]}),
    );
    tool_applies(&c, &ns, &declared).await;
    let sa = wait_sa(&c, &ns, "declared", "secrets applied", |sa| {
        refs(sa) == [SECRET]
    })
    .await;
    assert_eq!(
        pulls(&sa),
        ["mine"],
        "the declared list is left to its manifest"
    );
    assert_eq!(list_owners(&sa), [format!("{TOOL}/Apply")]);
    let again = Api::<ServiceAccount>::namespaced(c.clone(), &ns)
        .patch(
            "declared",
            &PatchParams::apply(TOOL),
            &Patch::Apply(&declared),
        )
        .await
        .expect("the tool's apply without force meets no conflict");
    assert_eq!(pulls(&again), ["mine"]);

    // The controller-made `default` gets it too, by apply; Pods get it at admission.
    wait_sa(&c, &ns, "default", "the Secret applied to default", |sa| {
        pulls(sa) == [SECRET]
    })
    .await;
    let pod = create_pod(
        &c,
        &ns,
        "web",
        json!({"serviceAccountName": "declared"}),
        false,
    )
    .await
    .pod;
    assert!(
        pull_secret_names(&pod).contains(&SECRET.to_string()),
        "{:?}",
        pull_secret_names(&pod)
    );

    // The tool's manifest loses the list entirely on an admin's edit and the reference with
    // it; the service applies it again.
    Api::<ServiceAccount>::namespaced(c.clone(), &ns)
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"imagePullSecrets": null})),
        )
        .await
        .expect("edit");
    wait_sa(&c, &ns, "app", "the Secret applied again", |sa| {
        pulls(sa) == [SECRET]
    })
    .await;

    // Opting out takes back what the service added, and only that.
    inj.set_opt_in(&ns, false).await;
    let sa = wait_sa(&c, &ns, "app", "detached", |sa| {
        pulls(sa).is_empty() && refs(sa).is_empty()
    })
    .await;
    assert_eq!(sa.metadata.labels.unwrap_or_default()["app"], "app");
    let sa = wait_sa(&c, &ns, "declared", "detached", |sa| refs(sa).is_empty()).await;
    assert_eq!(pulls(&sa), ["mine"]);
    inj.cleanup().await;
}

/// What the default mode does to a GitOps-managed ServiceAccount, as docs/gitops.md says: a
/// reference added at admission to a list the manifest declares is the tool's (the list is
/// atomic), and its next apply removes it; added to a manifest without the list, it is no
/// one's and stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patch_mode_loses_the_reference_where_the_manifest_declares_the_list() {
    let _serial = serial();
    let mut inj = Injector::start("g2").await;
    let c = inj.client.clone();
    let ns = inj.namespace("argo", true).await;

    let declared = manifest(
        &ns,
        "declared",
        json!({"imagePullSecrets": [{"name": "mine"}]}),
    );
    let created = tool_applies(&c, &ns, &declared).await;
    assert_eq!(pulls(&created), ["mine", SECRET], "patched at admission");
    assert_eq!(list_owners(&created), [format!("{TOOL}/Apply")]);
    let after = tool_applies(&c, &ns, &declared).await;
    assert_eq!(pulls(&after), ["mine"], "the tool's next apply removed it");

    let bare = manifest(&ns, "bare", json!({}));
    let created = tool_applies(&c, &ns, &bare).await;
    assert_eq!(pulls(&created), [SECRET], "patched at admission");
    let after = tool_applies(&c, &ns, &bare).await;
    assert_eq!(pulls(&after), [SECRET], "not declared: kept");
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_mode_changes_no_service_account_and_pods_still_get_the_secret() {
    let _serial = serial();
    // Registered for ServiceAccounts too, as an install left over from `patch` would be: the
    // service answers their admissions unchanged all the same.
    let mut inj = Injector::start_with(
        "g3",
        &kubernetes_registry("default", 3600),
        "serviceAccounts: never\n",
    )
    .await;
    let c = inj.client.clone();
    let ns = inj.namespace("pods", true).await;
    let app = tool_applies(&c, &ns, &manifest(&ns, "app", json!({}))).await;
    assert!(pulls(&app).is_empty(), "not patched at admission");
    let default = wait_sa(&c, &ns, "default", "made by the controller manager", |_| {
        true
    })
    .await;

    let pod = create_pod(&c, &ns, "web", json!({"serviceAccountName": "app"}), false)
        .await
        .pod;
    assert_eq!(pull_secret_names(&pod), [SECRET], "the Pod is patched");
    let secret = wait_secret(&c, &ns, "written", |s| {
        docker_config(s)["auths"][HOST]["auth"].is_string()
    })
    .await;
    assert_eq!(
        secret.type_.as_deref(),
        Some("kubernetes.io/dockerconfigjson")
    );

    // Time for the refresher to have attached, had it been going to.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for before in [&app, &default] {
        let name = before.metadata.name.as_deref().unwrap();
        let now = get_sa(&c, &ns, name).await;
        assert_eq!(
            now.metadata.resource_version, before.metadata.resource_version,
            "{name} unchanged"
        );
        assert!(pulls(&now).is_empty(), "{name}");
        assert!(
            !managers(&now)
                .iter()
                .any(|m| m.contains("pull-secret-injector")),
            "{name}: {:?}",
            managers(&now)
        );
    }

    // Opting out deletes the Secret and still touches no ServiceAccount.
    inj.set_opt_in(&ns, false).await;
    wait_for("the Secret deleted", Duration::from_secs(30), || async {
        get_secret(&c, &ns).await.is_none()
    })
    .await;
    let now = get_sa(&c, &ns, "app").await;
    assert_eq!(now.metadata.resource_version, app.metadata.resource_version);
    inj.cleanup().await;
}
