//! A real node pulls with the Secret the service made. `hack/control-plane up --node` runs a
//! kubelet of the same release, containerd and CNI bridge networking in a network namespace of
//! its own; the private registry (distribution with token auth against `token-server`) listens
//! on the host side of the node's link. The Pods carry no `imagePullSecrets` and no annotation:
//! the webhook adds the reference, the kubelet hands the Secret's credential to containerd,
//! the token server checks it against the API server's keys and its rules.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Pod, Secret};
use kube::api::{Api, ListParams};
use serde_json::json;
use support::registry::*;
use support::*;

const MARKER: &str = "pulled by the kubelet with a short-lived service-account credential";

/// A one-layer image of Debian's static busybox with a file the Pod prints.
fn busybox_image(dir: &Path, name: &str) -> String {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is installed (hack/test installs it)");
    let hello = dir.join("hello.txt");
    std::fs::write(&hello, format!("{MARKER}\n")).unwrap();
    let archive = dir.join("app.tar");
    let out = Command::new(repo().join("hack/oci-image"))
        .arg("--out")
        .arg(&archive)
        .args(["--name", name])
        .arg(format!("--file={busybox}:/bin/busybox:0755"))
        .arg("--symlink=/bin/sh:busybox")
        .arg(format!("--file={}:/hello.txt:0644", hello.display()))
        .args(["--entrypoint", "/bin/sh"])
        .output()
        .expect("run hack/oci-image");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!("oci-archive:{}", archive.display())
}

/// containerd's host configuration for the registry: its CA, read at each pull.
fn trust_registry(cp: &ControlPlane, registry: &PrivateRegistry) {
    let dir = cp.dir.join("node/certs.d").join(&registry.host);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"https://{host}\"\n[host.\"https://{host}\"]\n  \
             capabilities = [\"pull\", \"resolve\"]\n  ca = \"{ca}\"\n",
            host = registry.host,
            ca = registry.certs.ca().display()
        ),
    )
    .unwrap();
}

fn app_pod(name: &str, image: &str, policy: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "app", "image": image, "imagePullPolicy": policy,
                                 "command": ["/bin/sh", "-c", "cat /hello.txt"]}]}
    })
}

async fn create(c: &kube::Client, ns: &str, pod: serde_json::Value) -> Pod {
    let (status, _, text) = post(c, &format!("/api/v1/namespaces/{ns}/pods"), &pod).await;
    assert!(
        status.is_success(),
        "creating a pod in {ns}: {status} {text}"
    );
    serde_json::from_str(&text).unwrap()
}

/// Waits until the Pod has run to completion and returns what its container printed, read
/// from the kubelet's log file for it.
async fn wait_succeeded(cp: &ControlPlane, c: &kube::Client, ns: &str, name: &str) -> String {
    let api: Api<Pod> = Api::namespaced(c.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pod = api.get(name).await.unwrap();
        let status = pod.status.clone().unwrap_or_default();
        match status.phase.as_deref() {
            Some("Succeeded") => {
                let uid = pod.metadata.uid.clone().unwrap();
                let log = cp
                    .dir
                    .join("node/pod-logs")
                    .join(format!("{ns}_{name}_{uid}"))
                    .join("app/0.log");
                return std::fs::read_to_string(&log)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", log.display()));
            }
            Some("Failed") => panic!("pod {ns}/{name} failed: {status:?}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "pod {ns}/{name} did not succeed: {status:?}\nevents: {:?}",
            events(c, ns, name).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until the kubelet reports that the Pod's image cannot be pulled; returns the Pod's
/// Events, which carry the registry's answer.
async fn wait_pull_refused(c: &kube::Client, ns: &str, name: &str) -> Vec<String> {
    let api: Api<Pod> = Api::namespaced(c.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let pod = api.get(name).await.unwrap();
        let status = pod.status.clone().unwrap_or_default();
        let waiting = status
            .container_statuses
            .unwrap_or_default()
            .into_iter()
            .filter_map(|s| s.state.and_then(|s| s.waiting).and_then(|w| w.reason))
            .collect::<Vec<_>>();
        if waiting
            .iter()
            .any(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
        {
            let evs = events(c, ns, name).await;
            if evs.iter().any(|e| e.starts_with("Failed:")) {
                eprintln!("{ns}/{name}: {evs:#?}");
                return evs;
            }
        }
        assert_ne!(
            status.phase.as_deref(),
            Some("Succeeded"),
            "{ns}/{name} ran"
        );
        assert!(
            Instant::now() < deadline,
            "pod {ns}/{name} did not fail to pull: {waiting:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The Pod's Events as `reason: message`, oldest first.
async fn events(c: &kube::Client, ns: &str, pod: &str) -> Vec<String> {
    let api: Api<Event> = Api::namespaced(c.clone(), ns);
    let mut list = api
        .list(&ListParams::default().fields(&format!("involvedObject.name={pod}")))
        .await
        .unwrap()
        .items;
    list.sort_by_key(|e| e.first_timestamp.clone().map(|t| t.0));
    list.into_iter()
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .collect()
}

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
    let pod = create(&c, &team_a, app_pod("app", &image, "Always")).await;
    assert_eq!(pull_secret_names(&pod), ["pull-secret"]);
    let printed = wait_succeeded(cp, &c, &team_a, "app").await;
    assert!(printed.contains(MARKER), "the container printed: {printed}");
    let evs = events(&c, &team_a, "app").await;
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
    create(&c, &team_a, app_pod("app-2", &image, "Always")).await;
    assert!(wait_succeeded(cp, &c, &team_a, "app-2")
        .await
        .contains(MARKER));

    // The node has the image now. With IfNotPresent the kubelet lets a Pod use that copy only
    // if it presents the Secret the image was pulled with (KEP-2535): team-a's Pod does, by
    // name and UID, after a renewal too; the namespace without the Secret must pull, and
    // cannot.
    wait_secret(&c, &team_a, "another renewal", |s| {
        password(s, &host) != password(&renewed, &host)
    })
    .await;
    create(&c, &team_a, app_pod("app-3", &image, "IfNotPresent")).await;
    assert!(wait_succeeded(cp, &c, &team_a, "app-3")
        .await
        .contains(MARKER));
    let evs = events(&c, &team_a, "app-3").await;
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
