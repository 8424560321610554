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
