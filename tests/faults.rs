//! Faults with the real control plane: the API server dies and comes back, the service is
//! stopped while namespaces change. Nothing is missed afterwards.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams};
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_resume_after_the_api_server_restarts() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = Injector::start("t-f1").await;
    let c = inj.client.clone();
    let before = inj.namespace("before", true).await;
    let first = wait_secret(&c, &before, "created", |_| true).await;

    // Killed as a crash would, down for 3 seconds.
    cp.restart_apiserver(3);

    // A namespace opted in right after the restart is handled: the namespace watch resumed.
    let after = inj.namespace("after", true).await;
    wait_secret(&c, &after, "made after the restart", |_| true).await;
    // A deleted Secret comes back: the Secret watch resumed.
    Api::<Secret>::namespaced(c.clone(), &before).delete("pull-secret", &DeleteParams::default()).await.unwrap();
    wait_secret(&c, &before, "recreated after the restart", |s| s.metadata.uid != first.metadata.uid).await;
    // And the API server still reaches the webhook.
    let pod = create_pod(&c, &after, "app", json!({"imagePullSecrets": [{"name": "mine"}]}), false).await;
    assert_eq!(pull_secret_names(&pod.pod), ["mine", "pull-secret"]);
    assert!(pod.warnings.is_empty(), "{:?}", pod.warnings);
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_service_was_down_are_handled_when_it_returns() {
    let _serial = serial();
    let mut inj = Injector::start("t-f2").await;
    let c = inj.client.clone();
    let kept = inj.namespace("kept", true).await;
    let leaving = inj.namespace("leaving", true).await;
    let kept_secret = wait_secret(&c, &kept, "created", |_| true).await;
    wait_secret(&c, &leaving, "created", |_| true).await;

    inj.stop().await;
    let joining = inj.namespace("joining", true).await;
    inj.set_opt_in(&leaving, false).await;
    Api::<Secret>::namespaced(c.clone(), &kept).delete("pull-secret", &DeleteParams::default()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(get_secret(&c, &joining).await.is_none());

    inj.run().await;
    wait_secret(&c, &joining, "made for a namespace labelled while the service was down", |_| true).await;
    wait_secret(&c, &kept, "recreated after being deleted while the service was down", |s| s.metadata.uid != kept_secret.metadata.uid).await;
    wait_for("cleanup of a namespace that opted out while the service was down", Duration::from_secs(30), || async {
        get_secret(&c, &leaving).await.is_none()
    })
    .await;
    inj.cleanup().await;
}

/// Waits until the Secret is intact and then not rewritten for three seconds.
async fn settle(c: &kube::Client, ns: &str, what: &str) -> Secret {
    use pull_secret_injector::pull_secret::{assess, Assessment};
    let first = wait_secret(c, ns, what, |s| matches!(assess(Some(s)), Assessment::Intact(_))).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = get_secret(c, ns).await.expect("still there");
    assert_eq!(later.metadata.resource_version, first.metadata.resource_version, "{what}: the Secret keeps changing");
    later
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_writers_settle_without_lost_updates_or_flapping() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = Injector::start("t-f3").await;
    let c = inj.client.clone();
    // A second replica with the same configuration and no leader election: both refresh, as
    // two replicas would during a split brain.
    let config = pull_secret_injector::config::Config::from_yaml(&inj.config_yaml).unwrap();
    let second = pull_secret_injector::Service::start(config, c.clone()).await.unwrap();
    let ns = inj.namespace("shared", true).await;
    let api: Api<Secret> = Api::namespaced(c.clone(), &ns);
    let settled = settle(&c, &ns, "two writers settle").await;
    assert!(cp.secret_writes(&ns) <= 2, "writes: {}", cp.secret_writes(&ns));
    assert_eq!(claims(&password(&settled))["sub"], format!("system:serviceaccount:{ns}:default"));

    // A user overwrites the data three times in a row; each time it is restored, then it stays.
    for _ in 0..3 {
        let mut edited = api.get("pull-secret").await.unwrap();
        edited.data.as_mut().unwrap().insert(".dockerconfigjson".into(), k8s_openapi::ByteString(br#"{"auths":{"evil.example.com":{}}}"#.to_vec()));
        let _ = api.replace("pull-secret", &kube::api::PostParams::default(), &edited).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let restored = settle(&c, &ns, "restored after the user's edits").await;
    assert!(docker_config(&restored)["auths"].get("evil.example.com").is_none());
    second.shutdown().await;
    inj.cleanup().await;
}
