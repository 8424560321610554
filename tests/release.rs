//! Issue 27, a release that can be verified. Without a cluster: the version is the same
//! everywhere a user reads it (Cargo.toml, both charts, the image tags in `deploy/`, the top
//! CHANGELOG entry). On the real node: `hack/release` builds the image, its SBOM (syft), a
//! cosign signature and SBOM attestation, and the chart as a signed OCI artifact, into the
//! harness's private registry; then the checks a user runs pass for the release and fail for a
//! tampered image, and `helm install oci://...` installs the pushed chart on the node.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use serde_json::{json, Value};
use support::install::*;
use support::node::{app_pod, busybox_image, run_pod, trust_registry, MARKER};
use support::registry::*;
use support::*;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `version = "..."` of the [package] table.
fn cargo_version() -> String {
    let text = read("Cargo.toml");
    let package = text
        .split("\n[")
        .find(|t| t.starts_with("[package]") || t.starts_with("package]"))
        .expect("Cargo.toml has [package]");
    package
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .expect("[package] has a version")
        .trim_matches('"')
        .to_string()
}

/// The version of the first `## ` heading of CHANGELOG.md ("0.2.0 (unreleased)" is 0.2.0).
fn changelog_version() -> String {
    let text = read("CHANGELOG.md");
    let heading = text
        .lines()
        .find_map(|l| l.strip_prefix("## "))
        .expect("CHANGELOG.md has an entry");
    heading.split_whitespace().next().unwrap().to_string()
}

/// Every `image:` in the YAML files under `dir` that names this project's image: its tag.
fn deploy_image_tags(dir: &Path, found: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            deploy_image_tags(&path, found);
            continue;
        }
        if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            let Some(image) = line.trim().strip_prefix("image:") else {
                continue;
            };
            let image = image.trim().trim_matches('"');
            if let Some((name, tag)) = image.rsplit_once(':') {
                if name.rsplit('/').next() == Some("pull-secret-injector") {
                    let at = path.strip_prefix(repo()).unwrap().display().to_string();
                    found.push((at, tag.to_string()));
                }
            }
        }
    }
}

/// What a user reads as "the version" agrees everywhere: the crate, both charts (version and
/// appVersion), their default image tags, every image tag in `deploy/` and the top CHANGELOG
/// entry. A release bumps them together or this fails, naming the one left behind.
#[test]
fn the_version_is_the_same_everywhere() {
    let version = cargo_version();
    let mut seen = vec![("CHANGELOG.md (top entry)".to_string(), changelog_version())];
    for chart in ["pull-secret-injector", "token-server"] {
        let dir = format!("deploy/helm/{chart}");
        let meta = yaml(&format!("{dir}/Chart.yaml"));
        let values = yaml(&format!("{dir}/values.yaml"));
        for (key, value) in [
            ("Chart.yaml version", &meta["version"]),
            ("Chart.yaml appVersion", &meta["appVersion"]),
            ("values.yaml image.tag", &values["image"]["tag"]),
        ] {
            let value = value
                .as_str()
                .unwrap_or_else(|| panic!("{dir} {key} is a string: {value:?}"));
            seen.push((format!("{dir} {key}"), value.to_string()));
        }
    }
    let mut tags = Vec::new();
    deploy_image_tags(&repo().join("deploy"), &mut tags);
    let yaml_files = tags.iter().filter(|(at, _)| at.ends_with(".yaml")).count();
    assert!(
        yaml_files >= 4,
        "the kustomize base (2), token server and credential provider name the image: {tags:?}"
    );
    seen.extend(tags.into_iter().filter(|(_, tag)| !tag.contains("{{")));
    let wrong: Vec<_> = seen.iter().filter(|(_, v)| *v != version).collect();
    assert!(
        wrong.is_empty(),
        "Cargo.toml says {version}; these differ: {wrong:#?}"
    );
}

/// A tool `hack/build-kubernetes` builds and caches (cosign, syft, helm): its path, or None
/// when it is not built (outside CI the test is then skipped, loudly; in CI it fails).
fn built_tool(name: &str) -> Option<PathBuf> {
    let out = Command::new(repo().join("hack/build-kubernetes"))
        .args(["path", name])
        .output()
        .expect("hack/build-kubernetes path");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{name} is required in CI: hack/test builds it (hack/build-kubernetes {name})"
    );
    eprintln!("SKIPPED: {name} is not built (hack/build-kubernetes {name})");
    None
}

/// The README block `<!-- readme: run by tests/release.rs (block NAME, ...) -->`.
fn readme_block(name: &str) -> String {
    let text = read("README.md");
    let marker = format!("<!-- readme: run by tests/release.rs (block {name},");
    let start = text
        .find(&marker)
        .unwrap_or_else(|| panic!("README has a block marked {marker:?}"));
    let after = &text[start..];
    let fence = after.find("```sh\n").expect("the block follows its marker") + 6;
    let end = after[fence..].find("\n```").expect("the block ends");
    after[fence..fence + end].to_string()
}

/// A user's machine: cosign and helm on PATH, a registry login (docker config, which cosign and
/// helm both read), the registry's private CA trusted (SSL_CERT_FILE, as Go reads it), and the
/// cluster's kubeconfig. Commands run from `dir`, where cosign.pub and my-values.yaml are.
struct User {
    dir: PathBuf,
    path: String,
    kubeconfig: PathBuf,
}

impl User {
    fn new(dir: &Path, cp: &ControlPlane, host: &str, ca: &Path, login: &str) -> Self {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for tool in ["cosign", "helm"] {
            let path = built_tool(tool).unwrap();
            std::os::unix::fs::symlink(path, bin.join(tool)).unwrap();
        }
        let docker = dir.join(".docker");
        std::fs::create_dir_all(&docker).unwrap();
        let auth = base64_encode(login);
        std::fs::write(
            docker.join("config.json"),
            json!({"auths": {host: {"auth": auth}}}).to_string(),
        )
        .unwrap();
        let mut bundle = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap();
        bundle.push_str(&std::fs::read_to_string(ca).unwrap());
        std::fs::write(dir.join("ca-bundle.pem"), bundle).unwrap();
        User {
            dir: dir.to_path_buf(),
            path: format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
            kubeconfig: cp.kubeconfig(),
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.current_dir(&self.dir)
            .env("PATH", &self.path)
            .env("HOME", &self.dir)
            .env("DOCKER_CONFIG", self.dir.join(".docker"))
            .env("HELM_REGISTRY_CONFIG", self.dir.join(".docker/config.json"))
            .env("SSL_CERT_FILE", self.dir.join("ca-bundle.pem"))
            .env("KUBECONFIG", &self.kubeconfig)
            .env_remove("COSIGN_PASSWORD");
        cmd
    }

    /// `bash -euo pipefail -c SCRIPT`.
    fn bash(&self, script: &str) -> Output {
        self.command("bash")
            .args(["-euo", "pipefail", "-c", script])
            .output()
            .unwrap()
    }

    fn cosign(&self, args: &[&str]) -> Output {
        self.command("cosign").args(args).output().unwrap()
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The in-toto statements `cosign verify-attestation` printed (one JSON envelope a line).
fn statements(envelopes: &str) -> Vec<Value> {
    use base64::Engine;
    envelopes
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let envelope: Value = serde_json::from_str(l).unwrap();
            let payload = base64::engine::general_purpose::STANDARD
                .decode(envelope["payload"].as_str().unwrap())
                .unwrap();
            serde_json::from_slice(&payload).unwrap()
        })
        .collect()
}

/// The registry the release goes to: Debian's distribution 2.8 again, on the node's side of
/// the bridge with the same TLS certificate, but with a login (htpasswd, bcrypt) instead of
/// token auth. go-containerregistry (cosign) refuses a bearer realm at a private IP literal
/// other than the registry's own host:port, which is where the harness's token server is.
struct ReleaseRegistry {
    host: String,
    child: std::process::Child,
}

impl Drop for ReleaseRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ReleaseRegistry {
    async fn start(dir: &Path, ip: &str, tls: &Certs, user: &str, password: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let htpasswd = dir.join("htpasswd");
        let out = Command::new("htpasswd")
            .args(["-B", "-b", "-c"])
            .arg(&htpasswd)
            .args([user, password])
            .output()
            .expect("htpasswd (apache2-utils; hack/test installs it)");
        assert!(out.status.success(), "{}", text(&out));
        let port = free_port(ip);
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: info}}\n\
                 storage: {{filesystem: {{rootdirectory: {storage}}}}}\n\
                 http: {{addr: \"{ip}:{port}\", tls: {{certificate: {cert}, key: {key}}}}}\n\
                 auth: {{htpasswd: {{realm: release, path: {htpasswd}}}}}\n",
                storage = dir.join("storage").display(),
                cert = tls.cert().display(),
                key = tls.key().display(),
                htpasswd = htpasswd.display(),
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.join("registry.log")).unwrap())
            .spawn()
            .expect("start docker-registry");
        let host = format!("{ip}:{port}");
        wait_for(
            "the release registry listening",
            std::time::Duration::from_secs(30),
            || async { std::net::TcpStream::connect(&host).is_ok() },
        )
        .await;
        ReleaseRegistry { host, child }
    }

    /// containerd's host configuration for it: the CA.
    fn trust(&self, cp: &ControlPlane, ca: &Path) {
        let dir = cp.dir.join("node/certs.d").join(&self.host);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"https://{host}\"\n[host.\"https://{host}\"]\n  \
                 capabilities = [\"pull\", \"resolve\"]\n  ca = \"{ca}\"\n",
                host = self.host,
                ca = ca.display()
            ),
        )
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_verifies_and_its_chart_installs_on_the_node() {
    if !tools_present()
        || ["cosign", "syft", "helm"]
            .iter()
            .any(|t| built_tool(t).is_none())
    {
        return;
    }
    let _serial = serial();
    let cp = ControlPlane::with_node();
    let c = cp.client().await;
    let work = tempfile::tempdir().unwrap();
    let rules = format!(
        r#"  - {{namespace: {NS}, repositories: ["{IMAGE_REPOSITORY}"]}}
  - {{namespace: release-ci, serviceAccount: releaser, repositories: ["pull-secret-injector/*", "release-team/*"], actions: [pull, push]}}
  - {{namespace: release-team, repositories: ["release-team/*"]}}
"#
    );
    let registry =
        PrivateRegistry::start(cp, &c, work.path(), &cp.host_ip(), "release-infra", &rules).await;
    trust_registry(cp, &registry);
    let host = registry.host.clone();
    for ns in ["release-ci"] {
        if Api::<Namespace>::all(c.clone())
            .get_opt(ns)
            .await
            .unwrap()
            .is_none()
        {
            create_namespace(&c, ns, Default::default()).await;
        }
    }
    let releaser = service_account_token(&c, "release-ci", "releaser", vec![SERVICE.into()]).await;
    let release_password = format!("release-{}", std::process::id());
    let release_registry = ReleaseRegistry::start(
        &work.path().join("release-registry"),
        &cp.host_ip(),
        &registry.certs,
        "releaser",
        &release_password,
    )
    .await;
    release_registry.trust(cp, &registry.certs.ca());
    let release_host = release_registry.host.clone();

    // The signing key pair, protected by a password.
    let keys = work.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let password = "a release key password";
    let cosign = built_tool("cosign").unwrap();
    let out = Command::new(&cosign)
        .args(["generate-key-pair", "--output-key-prefix"])
        .arg(keys.join("cosign"))
        .env("COSIGN_PASSWORD", password)
        .output()
        .unwrap();
    assert!(out.status.success(), "generate-key-pair: {}", text(&out));

    // ---- hack/release into the private registry.
    let registry_path = format!("{release_host}/pull-secret-injector");
    let version = cargo_version();
    let release_dir = work.path().join("release");
    let started = std::time::Instant::now();
    let out = Command::new(repo().join("hack/release"))
        .args(["--registry", &registry_path])
        .arg("--key")
        .arg(keys.join("cosign.key"))
        .arg("--ca-file")
        .arg(registry.certs.ca())
        .arg("--out")
        .arg(&release_dir)
        .env("COSIGN_PASSWORD", password)
        .env("REGISTRY_USERNAME", "releaser")
        .env("REGISTRY_PASSWORD", &release_password)
        .output()
        .unwrap();
    let log = text(&out);
    assert!(out.status.success(), "hack/release failed:\n{log}");
    eprintln!("hack/release in {:?}:\n{log}", started.elapsed());
    for secret in [password, release_password.as_str()] {
        assert!(!log.contains(secret), "hack/release printed a secret");
    }
    let key_pem = std::fs::read_to_string(keys.join("cosign.key")).unwrap();
    let key_body = key_pem.lines().nth(1).unwrap();
    assert!(!log.contains(key_body), "hack/release printed the key");
    let pushed = std::fs::read_to_string(release_dir.join("digests.txt")).unwrap();
    let image_ref = pushed.lines().next().unwrap().to_string();
    let image_digest = image_ref
        .rsplit_once("@sha256:")
        .map(|(_, d)| d.to_string())
        .unwrap_or_else(|| panic!("digests.txt starts with the image by digest: {pushed}"));
    assert_eq!(
        image_ref,
        format!("{registry_path}/pull-secret-injector@sha256:{image_digest}")
    );

    // ---- What a user runs: the README block, with this registry and values for this node.
    let user_dir = work.path().join("user");
    std::fs::create_dir_all(&user_dir).unwrap();
    let login = format!("releaser:{release_password}");
    let user = User::new(&user_dir, cp, &release_host, &registry.certs.ca(), &login);
    std::fs::copy(keys.join("cosign.pub"), user_dir.join("cosign.pub")).unwrap();
    // The node pulls the image with the Secret in the service's namespace; the service's config
    // names this registry.
    namespace_with_image_pull_secret(&c, &host, restricted()).await;
    let auth = base64_encode(&login);
    let creds = json!({"auths": {release_host.clone(): {"username": "releaser", "password": release_password, "auth": auth}}});
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "registry-creds"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": creds.to_string()}
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), NS)
        .replace("registry-creds", &Default::default(), &secret)
        .await
        .unwrap();
    let values = json!({
        "imagePullSecrets": [{"name": "registry-creds"}],
        "config": {"registries": registry_config(&host)}
    });
    std::fs::write(user_dir.join("my-values.yaml"), values.to_string()).unwrap();
    let block = readme_block("verify-release").replace("<your-registry>", &registry_path);
    let out = user.bash(&block);
    assert!(
        out.status.success(),
        "the README's verify-release block failed:\n{block}\n{}",
        text(&out)
    );
    eprintln!("README block verify-release:\n{}", text(&out));
    // The attestation it printed is syft's SPDX SBOM of exactly the pushed digest.
    let attested = statements(&std::fs::read_to_string(user_dir.join("attestation.json")).unwrap());
    assert!(
        !attested.is_empty(),
        "verify-attestation printed the attestation"
    );
    for statement in &attested {
        assert_eq!(statement["predicateType"], "https://spdx.dev/Document");
        assert_eq!(
            statement["subject"][0]["digest"]["sha256"].as_str(),
            Some(image_digest.as_str())
        );
        let sbom = &statement["predicate"];
        assert!(
            sbom["spdxVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("SPDX-")),
            "{sbom:.300}"
        );
        assert!(
            sbom["name"]
                .as_str()
                .is_some_and(|n| n.contains("pull-secret-injector")),
            "the SBOM names the image: {:.300}",
            sbom["name"]
        );
    }

    // ---- The chart installed from the registry runs on the node.
    wait_rolled_out(&c, "both replicas Ready (helm install oci://)").await;
    check_running(cp, &c).await;
    let team = "release-team";
    create_namespace(&c, team, Default::default()).await;
    let app_image = format!("{host}/release-team/app:v1");
    registry.push(
        &busybox_image(work.path(), &app_image),
        "release-team/app:v1",
        &format!("releaser:{releaser}"),
    );
    label_namespace(&c, team, true).await;
    wait_secret(&c, team, "the Secret the released service made", |_| true).await;
    let ran = run_pod(cp, &c, team, app_pod("app", &app_image, "Always")).await;
    assert_eq!(pull_secret_names(&ran.pod), ["pull-secret"]);
    assert!(ran.printed.contains(MARKER), "printed: {}", ran.printed);

    // ---- Tampering: another image pushed under the release's tag, and a digest no one signed.
    let tag = format!("{registry_path}/pull-secret-injector:{version}");
    let image_repository = format!("{IMAGE_REPOSITORY}:{version}");
    let pushed = registry.skopeo(&[
        "copy",
        "--dest-cert-dir",
        registry.cert_dir.to_str().unwrap(),
        "--dest-creds",
        &login,
        &busybox_image(work.path(), &tag),
        &format!("docker://{release_host}/{image_repository}"),
    ]);
    assert!(pushed.status.success(), "{}", text(&pushed));
    let inspect = registry.skopeo(&[
        "inspect",
        "--cert-dir",
        registry.cert_dir.to_str().unwrap(),
        "--creds",
        &login,
        "--format",
        "{{.Digest}}",
        &format!("docker://{tag}"),
    ]);
    assert!(inspect.status.success());
    let tampered_digest = String::from_utf8_lossy(&inspect.stdout).trim().to_string();
    assert_ne!(tampered_digest, format!("sha256:{image_digest}"));
    let unsigned = format!("{registry_path}/pull-secret-injector@{tampered_digest}");
    for reference in [&tag, &unsigned] {
        let verify = user.cosign(&[
            "verify",
            "--key",
            "cosign.pub",
            "--insecure-ignore-tlog",
            reference,
        ]);
        assert!(
            !verify.status.success(),
            "cosign verify passed for a tampered {reference}: {}",
            text(&verify)
        );
        eprintln!("cosign verify {reference} (tampered): {}", text(&verify));
        let attest = user.cosign(&[
            "verify-attestation",
            "--key",
            "cosign.pub",
            "--insecure-ignore-tlog",
            "--type",
            "spdxjson",
            reference,
        ]);
        assert!(
            !attest.status.success(),
            "cosign verify-attestation passed for a tampered {reference}: {}",
            text(&attest)
        );
    }
    // The signed digest itself still verifies: what failed is the tag's new content.
    let verify = user.cosign(&[
        "verify",
        "--key",
        "cosign.pub",
        "--insecure-ignore-tlog",
        &image_ref,
    ]);
    assert!(verify.status.success(), "{}", text(&verify));
    // And a signature by another key does not count.
    let other = work.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let out = Command::new(&cosign)
        .args(["generate-key-pair", "--output-key-prefix"])
        .arg(other.join("cosign"))
        .env("COSIGN_PASSWORD", "")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let verify = user.cosign(&[
        "verify",
        "--key",
        other.join("cosign.pub").to_str().unwrap(),
        "--insecure-ignore-tlog",
        &image_ref,
    ]);
    assert!(
        !verify.status.success(),
        "a signature checked against another key passed: {}",
        text(&verify)
    );

    helm_release(cp, &["uninstall", NS, NAME]);
    registry.shutdown().await;
}
