//! Issue 27, upgrades and rollbacks that lose nothing. The previous release (built by
//! `hack/previous-release` from the commit CHANGELOG.md names for it, with that commit's own
//! chart, kustomize base and image) is installed on the real node, namespaces opt in, then it
//! is upgraded to HEAD and rolled back, with Helm (`helm upgrade`, `helm rollback`) and with
//! kustomize (`kubectl apply -k` of HEAD's base, then of the old one again), while Pods are
//! admitted continuously. Across each: no admission unpatched or failed, every Secret kept
//! (same UID: KEP-2535's checks key on it) and never expired, renewed by the version now
//! running, the running version the expected one, and no object left that the now-installed
//! release does not render. Without a cluster: config written for the previous release loads
//! with HEAD's `check-config`, and an unknown key is refused by name.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::{json, Value};
use support::install::*;
use support::node::trust_registry;
use support::registry::*;
use support::*;

const HEAD_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The previous release, from `hack/previous-release`.
struct Previous {
    /// Its source (`git archive` of its commit).
    src: PathBuf,
    /// Its image, an OCI archive (absent when only the source was asked for).
    image: PathBuf,
    /// `version` of its Cargo.toml.
    version: String,
}

/// `hack/previous-release` (`source`: without building the image). It fails, with its own
/// message, when CHANGELOG.md names no commit or the commit is not in this clone.
fn previous_release(source_only: bool) -> Previous {
    let mut cmd = Command::new(repo().join("hack/previous-release"));
    if source_only {
        cmd.arg("source");
    }
    let out = cmd.output().expect("run hack/previous-release");
    assert!(
        out.status.success(),
        "hack/previous-release could not provide the previous release: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let src = dir.join("src");
    let cargo = std::fs::read_to_string(src.join("Cargo.toml")).unwrap();
    let version = cargo
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .expect("its Cargo.toml has a version")
        .trim_matches('"')
        .to_string();
    assert_ne!(
        version, HEAD_VERSION,
        "the previous release is another version"
    );
    Previous {
        src,
        image: dir.join("image.tar"),
        version,
    }
}

/// `check-config` as in the service's Pod (which sets `$POD_NAMESPACE`).
fn check_config(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pull-secret-injector"))
        .env("POD_NAMESPACE", NS)
        .args(["check-config", "--config"])
        .arg(config)
        .output()
        .expect("run pull-secret-injector check-config")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `config.yaml` of the ConfigMap in a rendered YAML stream.
fn config_of(rendered: &str) -> String {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(rendered)
        .filter_map(|d| Value::deserialize(d).ok())
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == NAME)
        .and_then(|o| o["data"]["config.yaml"].as_str().map(str::to_owned))
        .expect("the service's ConfigMap with config.yaml")
}

fn helm_render(chart: &Path, values: &Value) -> String {
    let out = Command::new(repo().join("hack/helm-render"))
        .arg(chart)
        .arg(NS)
        .arg(values.to_string())
        .output()
        .expect("run hack/helm-render");
    assert!(
        out.status.success(),
        "hack/helm-render {}: {}",
        chart.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Config written for the previous release (its example, its kustomize base's and its chart's
/// rendered config) loads with HEAD's `check-config`, as CHANGELOG.md's "Upgrading from" says;
/// a key HEAD does not know is refused with a message naming it.
#[test]
fn config_written_for_the_previous_release_still_loads() {
    let prev = previous_release(true);
    let work = tempfile::tempdir().unwrap();
    let mut configs = vec![(
        "config.example.yaml".to_string(),
        std::fs::read_to_string(prev.src.join("deploy/config.example.yaml")).unwrap(),
    )];
    let base =
        std::fs::read_to_string(prev.src.join("deploy/kustomize/base/configmap.yaml")).unwrap();
    configs.push(("the kustomize base's".into(), config_of(&base)));
    let helm = Command::new(repo().join("hack/build-kubernetes"))
        .args(["path", "helm"])
        .output()
        .unwrap();
    if Path::new(String::from_utf8_lossy(&helm.stdout).trim()).is_file() {
        let chart = prev.src.join("deploy/helm/pull-secret-injector");
        let values = json!({"config": {"registries": registry_config("registry.example.com")}});
        configs.push((
            "the chart's".into(),
            config_of(&helm_render(&chart, &values)),
        ));
    } else {
        assert!(
            std::env::var_os("CI").is_none(),
            "helm is required in CI: hack/test builds it (hack/build-kubernetes helm)"
        );
        eprintln!("SKIPPED the chart's config: helm is not built (hack/build-kubernetes helm)");
    }
    for (what, config) in &configs {
        let file = work.path().join("config.yaml");
        std::fs::write(&file, config).unwrap();
        let out = check_config(&file);
        assert!(
            out.status.success(),
            "{} {what} config does not load with {HEAD_VERSION}: {}",
            prev.version,
            text(&out)
        );
        eprintln!("{} {what} config loads", prev.version);
    }

    // A key this version does not know, at the top and inside a section: refused, by name.
    let example: Value = serde_yaml::from_str(&configs[0].1).unwrap();
    for (path, edit) in [
        ("renewEarly", json!({"renewEarly": true})),
        (
            "refresh.renewJitter",
            json!({"refresh": {"renewJitter": "1m"}}),
        ),
    ] {
        let mut config = example.clone();
        for (k, v) in edit.as_object().unwrap() {
            match (config.get_mut(k), v) {
                (Some(Value::Object(section)), Value::Object(add)) => {
                    section.extend(add.clone());
                }
                _ => {
                    config[k] = v.clone();
                }
            }
        }
        let file = work.path().join("unknown.yaml");
        std::fs::write(&file, serde_yaml::to_string(&config).unwrap()).unwrap();
        let out = check_config(&file);
        let said = text(&out);
        assert!(
            !out.status.success()
                && said.contains(&format!("{path}:"))
                && said.contains("unknown field"),
            "an unknown key {path} is refused, naming it: {said}"
        );
        eprintln!("{path}: {}", said.trim());
    }
}

/// The manifest digest and `--version` of the binary in an image archive made by hack/image
/// (the binary taken out of its layer and run here).
fn image_version(archive: &Path) -> (String, String) {
    let script = r#"
import io, json, os, subprocess, sys, tarfile, tempfile
t = tarfile.open(sys.argv[1])
def blob(d): return t.extractfile("blobs/sha256/" + d.split(":")[1]).read()
digest = json.load(t.extractfile("index.json"))["manifests"][0]["digest"]
binary = None
for layer in json.loads(blob(digest))["layers"]:
    lt = tarfile.open(fileobj=io.BytesIO(blob(layer["digest"])))
    for m in lt.getmembers():
        if m.name.lstrip("./") == "usr/local/bin/pull-secret-injector":
            binary = lt.extractfile(m).read()
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "pull-secret-injector")
    open(path, "wb").write(binary)
    os.chmod(path, 0o755)
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True).stdout
print(digest)
print(version.strip())
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(archive)
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = stdout.lines();
    (
        lines.next().unwrap().to_string(),
        lines.next().unwrap_or_default().to_string(),
    )
}

/// An image as pushed: its tag and manifest digest (its binary's `--version` checked when built).
struct Image {
    tag: String,
    digest: String,
}

/// Both replicas run `image`: the Pods name its tag and the kubelet pulled its digest.
async fn assert_running(c: &kube::Client, image: &Image, what: &str) {
    let pods = service_pods(c).await;
    assert_eq!(pods.len(), 2, "{what}: two replicas");
    for pod in &pods {
        let name = pod.metadata.name.as_deref().unwrap();
        let spec_image = &pod.spec.as_ref().unwrap().containers[0].image;
        assert!(
            spec_image
                .as_deref()
                .is_some_and(|i| i.ends_with(&format!(":{}", image.tag))),
            "{what}: {name} runs {spec_image:?}, not tag {}",
            image.tag
        );
        let status = pod.status.as_ref().unwrap();
        let id = &status.container_statuses.as_ref().unwrap()[0].image_id;
        assert!(
            id.ends_with(&image.digest),
            "{what}: {name} runs {id}, not {} ({})",
            image.digest,
            image.tag
        );
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The `exp` of the registry password (a service-account token) in a pull Secret.
fn expiry(secret: &k8s_openapi::api::core::v1::Secret, host: &str) -> i64 {
    let password = docker_config(secret)["auths"][host]["password"]
        .as_str()
        .expect("the Secret has the registry's password")
        .to_string();
    claims(&password)["exp"]
        .as_i64()
        .expect("the token has exp")
}

/// Each team namespace's pull Secret, sampled every half second until stopped: each sample
/// must find it, with the UID it had before, holding a token not yet expired. Returns how many
/// samples, what was wrong (never a credential), and the latest `exp` seen per namespace.
struct SecretWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<String>, BTreeMap<String, i64>)>,
}

impl SecretWatch {
    fn start(c: &kube::Client, host: &str, uids: &BTreeMap<String, String>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s, host, uids) = (c.clone(), stop.clone(), host.to_string(), uids.clone());
        let task = tokio::spawn(async move {
            let (mut samples, mut wrong, mut latest) = (0, Vec::new(), BTreeMap::new());
            while !s.load(Ordering::SeqCst) {
                samples += 1;
                for (ns, uid) in &uids {
                    let at = now();
                    match get_secret(&c, ns).await {
                        None => wrong.push(format!("{ns}: no Secret at {at}")),
                        Some(secret) => {
                            let got = secret.metadata.uid.clone().unwrap_or_default();
                            if got != *uid {
                                wrong.push(format!("{ns}: UID {got}, was {uid}"));
                            }
                            let exp = expiry(&secret, &host);
                            if exp <= at {
                                wrong.push(format!("{ns}: token expired at {exp}, now {at}"));
                            }
                            latest.insert(ns.clone(), exp);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (samples, wrong, latest)
        });
        Self { stop, task }
    }

    async fn finish(self, what: &str) -> BTreeMap<String, i64> {
        self.stop.store(true, Ordering::SeqCst);
        let (samples, wrong, latest) = self.task.await.unwrap();
        eprintln!(
            "{what}: {samples} samples of each Secret, {} wrong",
            wrong.len()
        );
        assert!(samples > 10, "{what}: only {samples} samples");
        assert!(wrong.is_empty(), "{what}: Secrets lapsed: {wrong:#?}");
        latest
    }
}

/// The team namespaces' Secrets: UID and token expiry.
async fn secrets(c: &kube::Client, host: &str, teams: &[&str]) -> BTreeMap<String, (String, i64)> {
    let mut found = BTreeMap::new();
    for ns in teams {
        let s = wait_secret(c, ns, "the team's Secret", |_| true).await;
        let uid = s.metadata.uid.clone().unwrap();
        found.insert(ns.to_string(), (uid, expiry(&s, host)));
    }
    found
}

/// Everything the test needs to move between releases.
struct Stage<'a> {
    cp: &'a ControlPlane,
    c: &'a kube::Client,
    host: &'a str,
    teams: &'a [&'a str],
}

impl Stage<'_> {
    /// One upgrade or rollback (`act`), with Pods admitted and the Secrets watched throughout;
    /// then `image` runs, the install is exactly `expected` objects, a namespace opted in now
    /// (`late`) gets its Secret, and every team's Secret is renewed by the version now running.
    async fn transition(
        &self,
        what: &str,
        act: &dyn Fn(),
        image: &Image,
        expected: &[String],
        late: &str,
    ) {
        let (c, cp) = (self.c, self.cp);
        let before = secrets(c, self.host, self.teams).await;
        let uids = before
            .iter()
            .map(|(ns, (uid, _))| (ns.clone(), uid.clone()))
            .collect();
        let watch = SecretWatch::start(c, self.host, &uids);
        let admissions = Admissions::start(c, self.teams, Duration::from_millis(250));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let old_pods: Vec<String> = service_pods(c)
            .await
            .into_iter()
            .map(|p| p.metadata.name.unwrap())
            .collect();
        let started = Instant::now();
        act();
        wait_for(
            &format!("{what}: the rollout to start"),
            Duration::from_secs(120),
            || async {
                !service_pods(c)
                    .await
                    .iter()
                    .all(|p| old_pods.contains(p.metadata.name.as_ref().unwrap()))
            },
        )
        .await;
        wait_rolled_out(c, &format!("{what}: rolled out")).await;
        eprintln!("{what}: rolled out in {:?}", started.elapsed());
        let new_pods: Vec<String> = service_pods(c)
            .await
            .into_iter()
            .map(|p| p.metadata.name.unwrap())
            .collect();
        assert!(
            new_pods.iter().all(|p| !old_pods.contains(p)),
            "{what}: every Pod was replaced: {old_pods:?} -> {new_pods:?}"
        );
        // Admissions go on a moment longer against the new Pods alone.
        tokio::time::sleep(Duration::from_secs(3)).await;
        admissions.finish(what).await;
        check_running(cp, c).await;
        assert_running(c, image, what).await;
        assert_eq!(
            installed_objects(cp),
            expected,
            "{what}: the install is what the release now installed renders (nothing orphaned, \
             nothing missing)"
        );
        // The new version's refresher: a namespace opted in now gets its Secret, and each
        // team's Secret is renewed (a later expiry than any seen before the change), the
        // watch still running.
        create_namespace(c, late, restricted()).await;
        label_namespace(c, late, true).await;
        wait_secret(
            c,
            late,
            &format!("{what}: a namespace opted in after"),
            |_| true,
        )
        .await;
        let renewed = Instant::now();
        let changed_at = now();
        for (ns, (_, exp_before)) in &before {
            wait_for(
                &format!("{what}: {ns}'s Secret renewed by {}", image.tag),
                Duration::from_secs(150),
                || async {
                    get_secret(c, ns).await.is_some_and(|s| {
                        let exp = expiry(&s, self.host);
                        // Minted after the change: its lifetime (600 s) ends after
                        // change + 600 s (less a second of rounding).
                        exp > *exp_before && exp >= changed_at + 599
                    })
                },
            )
            .await;
        }
        eprintln!(
            "{what}: every Secret renewed by {} within {:?}",
            image.tag,
            renewed.elapsed()
        );
        watch.finish(what).await;
        let after = secrets(c, self.host, self.teams).await;
        for (ns, (uid, _)) in &before {
            assert_eq!(&after[ns].0, uid, "{what}: {ns}'s Secret kept its UID");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_and_rollbacks_lose_nothing() {
    if !tools_present() {
        return;
    }
    let _serial = serial();
    let started = Instant::now();
    let prev = previous_release(false);
    let cp = ControlPlane::with_node();
    let c = cp.client().await;
    let work = tempfile::tempdir().unwrap();
    let rules = format!(
        r#"  - {{namespace: {NS}, repositories: ["{IMAGE_REPOSITORY}"]}}
  - {{namespace: upgrade-ci, serviceAccount: pusher, repositories: ["{IMAGE_REPOSITORY}"], actions: [pull, push]}}
"#
    );
    let registry =
        PrivateRegistry::start(cp, &c, work.path(), &cp.host_ip(), "upgrade-infra", &rules).await;
    trust_registry(cp, &registry);
    let host = registry.host.clone();
    create_namespace(&c, "upgrade-ci", Default::default()).await;
    let pusher = service_account_token(&c, "upgrade-ci", "pusher", vec![SERVICE.into()]).await;
    let creds = format!("pusher:{pusher}");

    // The previous release's image as hack/previous-release built it, and HEAD's, each under
    // its version's tag; what each binary says it is.
    let (old_digest, old_says) = image_version(&prev.image);
    assert_eq!(old_says, format!("pull-secret-injector {}", prev.version));
    registry.push(
        &format!("oci-archive:{}", prev.image.display()),
        &format!("{IMAGE_REPOSITORY}:{}", prev.version),
        &creds,
    );
    let head_archive = work.path().join("head.tar");
    let head_ref = format!("{host}/{IMAGE_REPOSITORY}:{HEAD_VERSION}");
    let out = Command::new(repo().join("hack/image"))
        .arg("--out")
        .arg(&head_archive)
        .args(["--name", &head_ref])
        .args(["--push", &format!("docker://{head_ref}")])
        .args(["--dest-creds", &creds])
        .arg("--dest-cert-dir")
        .arg(&registry.cert_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "hack/image: {}", text(&out));
    let (head_digest, head_says) = image_version(&head_archive);
    assert_eq!(head_says, format!("pull-secret-injector {HEAD_VERSION}"));
    assert_ne!(old_digest, head_digest);
    let old = Image {
        tag: prev.version.clone(),
        digest: old_digest,
    };
    let head = Image {
        tag: HEAD_VERSION.to_string(),
        digest: head_digest,
    };
    eprintln!(
        "images {} and {} pushed ({:?})",
        old.tag,
        head.tag,
        started.elapsed()
    );
    // Tokens of 600 s renewed when 9m30s remain: each Secret is rewritten about every 30 s,
    // so a refresher that stops across a change shows within the wait for a renewal.
    let renew = |config: &mut Value| {
        config["refresh"] = json!({"renewBefore": "9m30s"});
    };

    // ---- Helm: the previous release's chart, then `helm upgrade` to HEAD's chart and image,
    // then `helm rollback` to revision 1.
    let mut labels = restricted();
    labels.insert(
        "pull-secret-injector.io/inject".to_string(),
        "disabled".to_string(),
    );
    namespace_with_image_pull_secret(&c, &host, labels).await;
    let values = |tag: &str| {
        let mut config = json!({"registries": registry_config(&host)});
        renew(&mut config);
        json!({
            "image": {"repository": format!("{host}/{IMAGE_REPOSITORY}"), "tag": tag},
            "imagePullSecrets": [{"name": "registry-creds"}],
            "config": config
        })
    };
    let old_chart = prev.src.join("deploy/helm/pull-secret-injector");
    let head_chart = repo().join("deploy/helm/pull-secret-injector");
    let old_values = values(&old.tag);
    let head_values = values(&head.tag);
    helm_release(
        cp,
        &[
            "install",
            old_chart.to_str().unwrap(),
            NS,
            NAME,
            &old_values.to_string(),
        ],
    );
    wait_rolled_out(&c, "the previous release Ready (Helm)").await;
    check_running(cp, &c).await;
    assert_running(&c, &old, "installed with Helm").await;
    let old_objects = rendered_objects(&helm_render(&old_chart, &old_values));
    let head_objects = rendered_objects(&helm_render(&head_chart, &head_values));
    assert!(old_objects.len() >= 10, "rendered: {old_objects:?}");
    assert_eq!(installed_objects(cp), old_objects);
    let teams = ["helm-a", "helm-b", "helm-c"];
    for team in teams {
        create_namespace(&c, team, restricted()).await;
        label_namespace(&c, team, true).await;
    }
    let stage = Stage {
        cp,
        c: &c,
        host: &host,
        teams: &teams,
    };
    secrets(&c, &host, &teams).await;
    stage
        .transition(
            "helm upgrade",
            &|| {
                helm_release(
                    cp,
                    &[
                        "upgrade",
                        head_chart.to_str().unwrap(),
                        NS,
                        NAME,
                        &head_values.to_string(),
                    ],
                );
            },
            &head,
            &head_objects,
            "helm-after-upgrade",
        )
        .await;
    stage
        .transition(
            "helm rollback",
            &|| {
                helm_release(cp, &["rollback", NS, NAME, "1"]);
            },
            &old,
            &old_objects,
            "helm-after-rollback",
        )
        .await;
    helm_release(cp, &["uninstall", NS, NAME]);
    wait_for(
        "the Helm release's Pods gone",
        Duration::from_secs(120),
        || async {
            Api::<Pod>::namespaced(c.clone(), NS)
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .is_empty()
        },
    )
    .await;
    assert_eq!(installed_objects(cp), Vec::<String>::new());
    eprintln!("Helm done ({:?})", started.elapsed());

    // ---- kustomize: `kubectl apply -k` of an overlay of the previous release's base, then of
    // HEAD's (same overlay), then of the previous one again.
    let old_overlay = kustomize_overlay(
        &format!("upgrade-old-{}", std::process::id()),
        &prev.src.join("deploy/kustomize/base"),
        &host,
        &old.tag,
        &renew,
    );
    let head_overlay = kustomize_overlay(
        &format!("upgrade-head-{}", std::process::id()),
        &repo().join("deploy/kustomize/base"),
        &host,
        &head.tag,
        &renew,
    );
    let old_overlay_arg = old_overlay.to_str().unwrap();
    let head_overlay_arg = head_overlay.to_str().unwrap();
    let old_objects = rendered_objects(&kubectl(cp, &["kustomize", old_overlay_arg]));
    let head_objects = rendered_objects(&kubectl(cp, &["kustomize", head_overlay_arg]));
    kubectl(cp, &["apply", "-k", old_overlay_arg]);
    wait_rolled_out(&c, "the previous release Ready (kustomize)").await;
    check_running(cp, &c).await;
    assert_running(&c, &old, "installed with kustomize").await;
    assert_eq!(installed_objects(cp), old_objects);
    let teams = ["kustomize-a", "kustomize-b", "kustomize-c"];
    for team in teams {
        create_namespace(&c, team, restricted()).await;
        label_namespace(&c, team, true).await;
    }
    let stage = Stage {
        teams: &teams,
        ..stage
    };
    secrets(&c, &host, &teams).await;
    stage
        .transition(
            "kustomize upgrade",
            &|| {
                kubectl(cp, &["apply", "-k", head_overlay_arg]);
            },
            &head,
            &head_objects,
            "kustomize-after-upgrade",
        )
        .await;
    stage
        .transition(
            "kustomize rollback",
            &|| {
                kubectl(cp, &["apply", "-k", old_overlay_arg]);
            },
            &old,
            &old_objects,
            "kustomize-after-rollback",
        )
        .await;
    let _ = std::fs::remove_dir_all(&old_overlay);
    let _ = std::fs::remove_dir_all(&head_overlay);
    eprintln!("upgrades and rollbacks done in {:?}", started.elapsed());
    registry.shutdown().await;
}
