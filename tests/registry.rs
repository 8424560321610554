//! Zero-annotation pulls from a real registry. Debian's `docker-registry` (distribution 2.8)
//! runs with token auth against `pull-secret-injector token-server`, which trusts this
//! cluster's service-account tokens; the webhook writes a namespace's pull Secret; Debian's
//! `skopeo` pulls with exactly that Secret's `.dockerconfigjson`. All on loopback.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use pull_secret_injector::token_server::server::{Clock, TokenServer};
use pull_secret_injector::token_server::TokenServerConfig;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::*;

const SERVICE: &str = "registry.test";

/// The registry and skopeo come from Debian packages (`hack/test` installs them). Outside CI a
/// machine without them skips this test loudly; in CI their absence is a failure.
fn tools_present() -> bool {
    let present = ["docker-registry", "skopeo"].iter().all(|t| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !present {
        assert!(
            std::env::var_os("CI").is_none(),
            "docker-registry and skopeo are required in CI (hack/test installs them)"
        );
        eprintln!("SKIPPED: docker-registry or skopeo is not installed (apt-get install docker-registry skopeo)");
    }
    present
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Registry {
    child: Child,
    log: PathBuf,
    host: String,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// distribution 2.8 with TLS and token auth, its storage in `dir`.
async fn start_registry(dir: &Path, certs: &Certs, realm: &str, signing_cert: &Path) -> Registry {
    let port = free_port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog: {{level: info}}\nstorage: {{filesystem: {{rootdirectory: {storage}}}}}\n\
             http: {{addr: 127.0.0.1:{port}, tls: {{certificate: {cert}, key: {key}}}}}\n\
             auth: {{token: {{realm: \"{realm}\", service: {SERVICE}, issuer: pull-secret-injector, rootcertbundle: {signing}}}}}\n",
            storage = dir.join("storage").display(),
            cert = certs.cert().display(),
            key = certs.key().display(),
            signing = signing_cert.display(),
        ),
    )
    .unwrap();
    let log = dir.join("registry.log");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start docker-registry");
    let host = format!("127.0.0.1:{port}");
    wait_for(
        "the registry listening",
        Duration::from_secs(30),
        || async { std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() },
    )
    .await;
    Registry { child, log, host }
}

/// Runs skopeo with the test CA trusted (for the registry and the token realm alike).
fn skopeo(certs_dir: &Path, args: &[&str]) -> Output {
    let policy = certs_dir.parent().unwrap().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"default": [{"type": "insecureAcceptAnything"}]}"#,
    )
    .unwrap();
    let mut cmd = Command::new("skopeo");
    cmd.arg("--policy")
        .arg(&policy)
        .args(args)
        .env("HOME", certs_dir.parent().unwrap());
    let out = cmd.output().expect("run skopeo");
    eprintln!(
        "skopeo {}: {}\n{}",
        args.iter()
            .filter(|a| a.len() < 80)
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256(bytes: &[u8]) -> String {
    format!(
        "sha256:{}",
        Sha256::digest(bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// A one-layer OCI image layout in `dir` (tag `v1`); returns the layer's digest.
fn build_image(dir: &Path) -> String {
    let content = dir.join("content");
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(
        content.join("hello.txt"),
        "pulled with a short-lived service-account credential\n",
    )
    .unwrap();
    let tar = dir.join("layer.tar");
    let ok = Command::new("tar")
        .arg("--sort=name")
        .arg("--mtime=@0")
        .arg("-cf")
        .arg(&tar)
        .arg("-C")
        .arg(&content)
        .arg("hello.txt")
        .status()
        .unwrap();
    assert!(ok.success());
    let tar_bytes = std::fs::read(&tar).unwrap();
    let gz = Command::new("gzip")
        .args(["-n", "-c"])
        .arg(&tar)
        .output()
        .unwrap();
    assert!(gz.status.success());
    let layer = gz.stdout;
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "config": {}, "rootfs": {"type": "layers", "diff_ids": [sha256(&tar_bytes)]}
    }))
    .unwrap();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(&config), "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha256(&layer), "size": layer.len()}]
    }))
    .unwrap();
    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    for blob in [&config, &layer, &manifest] {
        std::fs::write(blobs.join(sha256(blob).trim_start_matches("sha256:")), blob).unwrap();
    }
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion": "1.0.0"}"#,
    )
    .unwrap();
    let index = json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": sha256(&manifest), "size": manifest.len(),
        "annotations": {"org.opencontainers.image.ref.name": "v1"}
    }]});
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    sha256(&layer)
}

async fn service_account_token(
    c: &kube::Client,
    ns: &str,
    sa: &str,
    audiences: Vec<String>,
) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(c.clone(), ns);
    if api.get_opt(sa).await.unwrap().is_none() {
        api.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": sa}})).unwrap(),
        )
        .await
        .unwrap();
    }
    let request: TokenRequest = serde_json::from_value(
        json!({"spec": {"audiences": audiences, "expirationSeconds": 3600}}),
    )
    .unwrap();
    api.create_token_request(sa, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

/// The `.dockerconfigjson` of a namespace's pull Secret, written to a file skopeo reads.
async fn authfile(c: &kube::Client, ns: &str, dir: &Path) -> (PathBuf, String) {
    let secret = get_secret(c, ns).await.expect("the pull Secret");
    let data = &secret.data.as_ref().unwrap()[".dockerconfigjson"].0;
    let path = dir.join(format!("{ns}-auth.json"));
    std::fs::write(&path, data).unwrap();
    (path, password_of(&secret))
}

fn password_of(secret: &k8s_openapi::api::core::v1::Secret) -> String {
    let doc = docker_config(secret);
    let auths = doc["auths"].as_object().unwrap();
    auths.values().next().unwrap()["password"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_pull_with_the_secret_the_webhook_made_and_nothing_else_does() {
    if !tools_present() {
        return;
    }
    let _serial = serial();
    let logs = capture_token_server_logs();
    let cp = ControlPlane::get();
    let c = cp.client().await;
    let work = tempfile::tempdir().unwrap();
    let certs = Certs::new();
    let cert_dir = work.path().join("certs.d");
    std::fs::create_dir_all(&cert_dir).unwrap();
    std::fs::copy(certs.ca(), cert_dir.join("ca.crt")).unwrap();

    // The token server's signing certificate, which the registry trusts.
    let signing_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "pull-secret-injector token signing",
    );
    let signing_cert = params.self_signed(&signing_key).unwrap();
    let (signing_crt, signing_pem) = (
        work.path().join("signing.crt"),
        work.path().join("signing.key"),
    );
    std::fs::write(&signing_crt, signing_cert.pem()).unwrap();
    std::fs::write(&signing_pem, signing_key.serialize_pem()).unwrap();

    // The token server fetches the keys from the API server with a token of its own
    // ServiceAccount (discovery is for authenticated clients on this API server).
    let server = api_server_url(cp);
    create_namespace(&c, "reg-infra", Default::default()).await;
    let discovery_token = service_account_token(&c, "reg-infra", "token-server", vec![]).await;
    let discovery_file = work.path().join("discovery-token");
    std::fs::write(&discovery_file, discovery_token).unwrap();
    let ts_port = free_port();
    let ts_config = TokenServerConfig::from_yaml(&format!(
        r#"
listen: 127.0.0.1:{ts_port}
tls: {{certFile: {cert}, keyFile: {key}}}
issuer:
  url: https://kubernetes.default.svc.cluster.local
  jwksUri: {server}/openid/v1/jwks
  caFile: {apiserver_ca}
  tokenFile: {discovery}
  audiences: [{SERVICE}]
service: {SERVICE}
signing: {{certFile: {signing_crt}, keyFile: {signing_key}}}
rules:
  - {{namespace: reg-team-a, repositories: ["team-a/*", "shared/*"]}}
  - {{namespace: reg-team-b, repositories: ["team-b/*"]}}
  - {{namespace: reg-ci, serviceAccount: pusher, repositories: ["team-a/*"], actions: [pull, push]}}
"#,
        cert = certs.cert().display(),
        key = certs.key().display(),
        apiserver_ca = cp.dir.join("pki/apiserver.crt").display(),
        discovery = discovery_file.display(),
        signing_crt = signing_crt.display(),
        signing_key = signing_pem.display(),
    ))
    .unwrap();
    let offset = Arc::new(AtomicI64::new(0));
    let o = offset.clone();
    let clock: Clock = Arc::new(move || {
        jiff::Timestamp::now() + jiff::SignedDuration::from_secs(o.load(Ordering::SeqCst))
    });
    let token_server = TokenServer::start(ts_config, clock)
        .await
        .expect("token server starts");
    let realm = format!("https://127.0.0.1:{ts_port}/token");
    let registry = start_registry(work.path(), &certs, &realm, &signing_crt).await;
    let host = registry.host.clone();

    // 1. Push team-a/app with an identity the rules allow to push.
    let layer_digest = build_image(work.path());
    create_namespace(&c, "reg-ci", Default::default()).await;
    let pusher = service_account_token(&c, "reg-ci", "pusher", vec![SERVICE.into()]).await;
    let layout = format!("oci:{}:v1", work.path().join("layout").display());
    let out = skopeo(
        &cert_dir,
        &[
            "copy",
            "--dest-cert-dir",
            cert_dir.to_str().unwrap(),
            "--dest-creds",
            &format!("pusher:{pusher}"),
            &layout,
            &format!("docker://{host}/team-a/app:v1"),
        ],
    );
    assert!(
        out.status.success(),
        "push failed; registry log:\n{}",
        std::fs::read_to_string(&registry.log).unwrap_or_default()
    );

    // 2. The webhook, with the `kubernetes` source for this registry; a Pod with no annotation.
    let registry_entry = format!("  - host: \"{host}\"\n    kubernetes: {{serviceAccount: default, audience: {SERVICE}, expirationSeconds: 600, username: k8s}}\n");
    let mut inj =
        Injector::start_with("reg", &registry_entry, "refresh: {renewBefore: 9m55s}\n").await;
    let team_a = inj.namespace("team-a", true).await;
    let team_b = inj.namespace("team-b", true).await;
    let pod = create_pod(
        &c,
        &team_a,
        "app",
        json!({"containers": [{"name": "app", "image": format!("{host}/team-a/app:v1")}]}),
        false,
    )
    .await
    .pod;
    assert!(pull_secret_names(&pod).contains(&"pull-secret".to_string()));
    wait_secret(&c, &team_a, "team-a's Secret", |_| true).await;
    let (auth_a, first_password) = authfile(&c, &team_a, work.path()).await;
    let image = format!("docker://{host}/team-a/app:v1");
    let inspect = |auth: Option<&Path>| {
        let mut args = vec![
            "inspect".to_string(),
            "--cert-dir".into(),
            cert_dir.to_str().unwrap().into(),
        ];
        match auth {
            Some(a) => args.extend(["--authfile".to_string(), a.to_str().unwrap().to_string()]),
            None => args.push("--no-creds".into()),
        }
        args.push(image.clone());
        skopeo(
            &cert_dir,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        )
    };
    let out = inspect(Some(&auth_a));
    assert!(out.status.success(), "team-a's Secret must pull");
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["Layers"][0], layer_digest.as_str());
    // And the image itself comes down.
    let pulled = work.path().join("pulled");
    let out = skopeo(
        &cert_dir,
        &[
            "copy",
            "--src-cert-dir",
            cert_dir.to_str().unwrap(),
            "--authfile",
            auth_a.to_str().unwrap(),
            &image,
            &format!("oci:{}:v1", pulled.display()),
        ],
    );
    assert!(out.status.success(), "copy with team-a's Secret");
    assert!(
        pulled
            .join("blobs/sha256")
            .join(layer_digest.trim_start_matches("sha256:"))
            .exists(),
        "the layer was pulled"
    );

    // 3. Refused: team-b's Secret, no credentials, a token past its expiry.
    wait_secret(&c, &team_b, "team-b's Secret", |_| true).await;
    let (auth_b, _) = authfile(&c, &team_b, work.path()).await;
    let refused = |out: Output, why: &str| {
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            stderr.contains(why),
            "refused for another reason than {why:?}: {stderr}"
        );
    };
    // The token server grants team-b nothing on team-a/*: the registry denies.
    refused(
        inspect(Some(&auth_b)),
        "requested access to the resource is denied",
    );
    refused(inspect(None), "credentials required");
    // The API server mints at least 10-minute tokens: the token server's clock is moved past
    // the stored token's expiry instead of waiting.
    offset.store(3600, Ordering::SeqCst);
    refused(
        inspect(Some(&auth_a)),
        "service-account token refused: expired at",
    );
    offset.store(0, Ordering::SeqCst);

    // After the refresher renews the Secret, the new credential works.
    wait_secret(&c, &team_a, "a renewed credential", |s| {
        password_of(s) != first_password
    })
    .await;
    let (auth_a2, second_password) = authfile(&c, &team_a, work.path()).await;
    assert_ne!(second_password, first_password);
    assert!(
        inspect(Some(&auth_a2)).status.success(),
        "the renewed credential pulls"
    );

    // Every decision was logged, with who and what, and no token.
    let logs = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    assert!(
        logs.contains(&format!("namespace={team_a}"))
            && logs.contains("granted=repository:team-a/app:pull"),
        "{logs}"
    );
    assert!(
        logs.contains(&format!("namespace={team_b}")) && logs.contains("granted=nothing"),
        "{logs}"
    );
    assert!(
        logs.contains("token refused") && logs.contains("reason=\"no credentials\""),
        "{logs}"
    );
    for secret in [&pusher, &first_password, &second_password] {
        assert!(!logs.contains(secret.as_str()), "a token reached the logs");
    }

    inj.cleanup().await;
    token_server.shutdown().await;
    drop(registry);
    for ns in ["reg-infra", "reg-ci"] {
        let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(c.clone())
            .delete(ns, &Default::default())
            .await;
    }
}

/// The token server's log lines (this binary's only test installs the global subscriber).
fn capture_token_server_logs() -> Arc<std::sync::Mutex<Vec<u8>>> {
    #[derive(Clone)]
    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Sink(buffer.clone());
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("pull_secret_injector::token_server=info")
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    tracing::subscriber::set_global_default(subscriber).expect("one subscriber per test binary");
    buffer
}

/// The API server's URL, from the control plane's kubeconfig.
fn api_server_url(cp: &ControlPlane) -> String {
    let text = std::fs::read_to_string(cp.kubeconfig()).unwrap();
    let start = text.find("server: \"").unwrap() + "server: \"".len();
    text[start..].split('"').next().unwrap().to_string()
}

/// Keys found through the issuer's discovery document, fetched again for a key id not seen
/// before: against a stand-in issuer serving the API server's own key set (the API server's
/// discovery names an in-cluster URL that is not reachable from here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_come_from_discovery_and_are_refetched_for_an_unknown_key() {
    use pull_secret_injector::token_server::oidc::{IssuerConfig, Verifier, VerifyError};
    use std::sync::Mutex;
    use support::standin::StandIn;

    let _serial = serial();
    let cp = ControlPlane::get();
    let c = cp.client().await;
    let request = http::Request::get("/openid/v1/jwks")
        .body(Vec::new())
        .unwrap();
    let jwks: Value = c.request(request).await.expect("the API server's key set");
    let served = Arc::new(Mutex::new(json!({"keys": []})));
    let s = served.clone();
    let issuer = StandIn::start(move |req| match req.path.as_str() {
        "/.well-known/openid-configuration" => (200, json!({"issuer": "x", "jwks_uri": format!("https://{}/jwks", req.header("host").unwrap_or(""))}).to_string()),
        "/jwks" => (200, s.lock().unwrap().to_string()),
        _ => (404, "{}".into()),
    })
    .await;
    let config = IssuerConfig {
        url: issuer.url.clone(),
        jwks_uri: None,
        ca_file: Some(issuer.certs.ca()),
        token_file: None,
        audiences: vec![SERVICE.into()],
    };
    let verifier = Verifier::new(config, Duration::from_secs(10)).unwrap();
    create_namespace(&c, "reg-keys", Default::default()).await;
    let token = service_account_token(&c, "reg-keys", "default", vec![SERVICE.into()]).await;

    // The key set is empty at first: the token's key is unknown.
    assert_eq!(
        verifier.verify(&token, jiff::Timestamp::now()).await,
        Err(VerifyError::UnknownKey)
    );
    // The issuer publishes the key (a rotation); after the refetch interval it is found: the
    // signature verifies, and what fails is the issuer check (this stand-in is not the
    // tokens' `iss`), which comes only after a verified signature.
    *served.lock().unwrap() = jwks;
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(
        verifier.verify(&token, jiff::Timestamp::now()).await,
        Err(VerifyError::Issuer)
    );
    let paths: Vec<String> = issuer.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        [
            "/.well-known/openid-configuration",
            "/jwks",
            "/.well-known/openid-configuration",
            "/jwks"
        ]
    );
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(c.clone())
        .delete("reg-keys", &Default::default())
        .await;
}
