//! A real node's side of the tests: an image the kubelet can pull, containerd trusting the
//! private registry, Pods created and watched until they run or fail to pull.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, ListParams};
use serde_json::json;

use super::registry::PrivateRegistry;
use super::{post, repo, ControlPlane};

pub const MARKER: &str = "pulled by the kubelet with a short-lived service-account credential";

/// A one-layer image of Debian's static busybox with a file the Pod prints.
pub fn busybox_image(dir: &Path, name: &str) -> String {
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
pub fn trust_registry(cp: &ControlPlane, registry: &PrivateRegistry) {
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

pub fn app_pod(name: &str, image: &str, policy: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 0,
                 "containers": [{"name": "app", "image": image, "imagePullPolicy": policy,
                                 "command": ["/bin/sh", "-c", "cat /hello.txt"]}]}
    })
}

pub async fn create(c: &kube::Client, ns: &str, pod: serde_json::Value) -> Pod {
    let (status, _, text) = post(c, &format!("/api/v1/namespaces/{ns}/pods"), &pod).await;
    assert!(
        status.is_success(),
        "creating a pod in {ns}: {status} {text}"
    );
    serde_json::from_str(&text).unwrap()
}

/// Waits until the Pod has run to completion and returns what its container printed, read
/// from the kubelet's log file for it.
pub async fn wait_succeeded(cp: &ControlPlane, c: &kube::Client, ns: &str, name: &str) -> String {
    match wait_finished(cp, c, ns, name).await {
        Ok(printed) => printed,
        Err(status) => panic!("pod {ns}/{name} failed: {status}"),
    }
}

/// As `wait_succeeded`, a Pod that failed is an `Err` with its status.
pub async fn wait_finished(
    cp: &ControlPlane,
    c: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<String, String> {
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
                return Ok(std::fs::read_to_string(&log)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", log.display())));
            }
            Some("Failed") => return Err(format!("{status:?}")),
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
pub async fn wait_pull_refused(c: &kube::Client, ns: &str, name: &str) -> Vec<String> {
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
pub async fn events(c: &kube::Client, ns: &str, pod: &str) -> Vec<String> {
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

/// `app_pod` running as ServiceAccount `service_account`.
pub fn app_pod_as(
    name: &str,
    image: &str,
    policy: &str,
    service_account: &str,
) -> serde_json::Value {
    let mut pod = app_pod(name, image, policy);
    pod["spec"]["serviceAccountName"] = json!(service_account);
    pod
}

/// A Pod that ran to completion: the name it ran under, the stored Pod, what it printed.
pub struct Ran {
    pub name: String,
    pub pod: Pod,
    pub printed: String,
}

/// Creates the Pod and waits until it has run to completion. Under load this machine's
/// runtime now and then loses a Pod's sandbox before its container starts ("sandbox container
/// ... is not running"); such a Pod is created once more under another name. Any other
/// failure fails the test.
pub async fn run_pod(cp: &ControlPlane, c: &kube::Client, ns: &str, pod: serde_json::Value) -> Ran {
    let name = pod["metadata"]["name"]
        .as_str()
        .expect("a name")
        .to_string();
    let again = format!("{name}-again");
    for attempt in [&name, &again] {
        let mut pod = pod.clone();
        pod["metadata"]["name"] = json!(attempt);
        let created = create(c, ns, pod).await;
        match wait_finished(cp, c, ns, attempt).await {
            Ok(printed) => {
                return Ran {
                    name: attempt.clone(),
                    pod: created,
                    printed,
                }
            }
            Err(status) if *attempt == name && status.contains("is not running") => {
                eprintln!("{ns}/{attempt}: its sandbox died before the container started; once more: {status}");
            }
            Err(status) => panic!("pod {ns}/{attempt} failed: {status}"),
        }
    }
    unreachable!("the second attempt returns or panics")
}
