//! Zero-annotation pulls from a real registry. Debian's `docker-registry` (distribution 2.8)
//! runs with token auth against `pull-secret-injector token-server`, which trusts this
//! cluster's service-account tokens; the webhook writes a namespace's pull Secret; Debian's
//! `skopeo` pulls with exactly that Secret's `.dockerconfigjson`. All on loopback.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::registry::*;
use support::*;

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
    let rules = r#"  - {namespace: reg-team-a, repositories: ["team-a/*", "shared/*"]}
  - {namespace: reg-team-b, repositories: ["team-b/*"]}
  - {namespace: reg-ci, serviceAccount: pusher, repositories: ["team-a/*"], actions: [pull, push]}
"#;
    let registry =
        PrivateRegistry::start(cp, &c, work.path(), "127.0.0.1", "reg-infra", rules).await;
    let host = registry.host.clone();
    let cert_dir = registry.cert_dir.clone();
    let offset = registry.clock_offset.clone();

    // 1. Push team-a/app with an identity the rules allow to push.
    let layer_digest = build_image(work.path());
    create_namespace(&c, "reg-ci", Default::default()).await;
    let pusher = service_account_token(&c, "reg-ci", "pusher", vec![SERVICE.into()]).await;
    let layout = format!("oci:{}:v1", work.path().join("layout").display());
    registry.push(&layout, "team-a/app:v1", &format!("pusher:{pusher}"));

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
        registry.skopeo(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = inspect(Some(&auth_a));
    assert!(out.status.success(), "team-a's Secret must pull");
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["Layers"][0], layer_digest.as_str());
    // And the image itself comes down.
    let pulled = work.path().join("pulled");
    let out = registry.skopeo(&[
        "copy",
        "--src-cert-dir",
        cert_dir.to_str().unwrap(),
        "--authfile",
        auth_a.to_str().unwrap(),
        &image,
        &format!("oci:{}:v1", pulled.display()),
    ]);
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

    // 4. A token whose ServiceAccount was deleted: its signature and expiry still check out
    // offline, the API server's TokenReview refuses it, and so does the token server (within
    // tokenReview.cacheFor, 1 s here).
    let doomed = service_account_token(&c, &team_a, "doomed", vec![SERVICE.into()]).await;
    let token_url = format!(
        "{}?service={SERVICE}&scope=repository:team-a/app:pull",
        registry.realm
    );
    let ask = || async {
        let r = https_client(&registry.certs)
            .get(&token_url)
            .basic_auth("doomed", Some(&doomed))
            .send()
            .await
            .expect("the token server answers");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    };
    let (status, body) = ask().await;
    assert_eq!(status, 200, "{body}");
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(c.clone(), &team_a)
        .delete("doomed", &Default::default())
        .await
        .unwrap();
    wait_for(
        "the deleted ServiceAccount's token refused",
        Duration::from_secs(30),
        || async {
            let (status, body) = ask().await;
            status == 401 && body.contains("no longer accepts this token")
        },
    )
    .await;

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
        logs.contains(&format!("namespace={team_a:?}"))
            && logs.contains("granted=\"repository:team-a/app:pull\""),
        "{logs}"
    );
    assert!(
        logs.contains(&format!("namespace={team_b:?}")) && logs.contains("granted=\"nothing\""),
        "{logs}"
    );
    assert!(
        logs.contains("token refused") && logs.contains("reason=\"no credentials\""),
        "{logs}"
    );
    for secret in [&pusher, &first_password, &second_password, &doomed] {
        assert!(!logs.contains(secret.as_str()), "a token reached the logs");
    }

    inj.cleanup().await;
    registry.shutdown().await;
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

/// Issue 23, point 11: the key request carries the token server's own token, so a `jwks_uri`
/// the discovery document names is fetched only from the issuer's own host, over https; keys
/// kept elsewhere are fetched where `issuer.jwksUri` says. Stand-ins only, no control plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_server_sends_its_token_only_to_the_issuers_host_or_the_configured_one() {
    use pull_secret_injector::token_server::oidc::{IssuerConfig, Verifier, VerifyError};
    use std::sync::Mutex;
    use support::standin::StandIn;

    let elsewhere = StandIn::start(|req| match req.path.as_str() {
        "/jwks" => (200, json!({"keys": []}).to_string()),
        _ => (404, "{}".into()),
    })
    .await;
    let named = Arc::new(Mutex::new(String::new()));
    let n = named.clone();
    let issuer = StandIn::start(move |req| match req.path.as_str() {
        "/.well-known/openid-configuration" => (
            200,
            json!({"issuer": "x", "jwks_uri": n.lock().unwrap().clone()}).to_string(),
        ),
        "/jwks" => (200, json!({"keys": []}).to_string()),
        _ => (404, "{}".into()),
    })
    .await;
    // Both trusted: what keeps the token from the other host is the rule, not TLS.
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("ca.pem");
    let mut pem = std::fs::read(issuer.certs.ca()).unwrap();
    pem.extend(std::fs::read(elsewhere.certs.ca()).unwrap());
    std::fs::write(&bundle, pem).unwrap();
    let own_token = "the-token-servers-own-service-account-token";
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, own_token).unwrap();
    let verifier = |jwks_uri: Option<String>| {
        Verifier::new(
            IssuerConfig {
                url: issuer.url.clone(),
                jwks_uri,
                ca_file: Some(bundle.clone()),
                token_file: Some(token_file.clone()),
                audiences: vec![SERVICE.into()],
            },
            Duration::from_secs(10),
        )
        .unwrap()
    };
    let part =
        |s: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s);
    let token = format!(
        "{}.{}.{}",
        part(r#"{"alg":"RS256","kid":"k1"}"#),
        part("{}"),
        part("sig")
    );
    let paths = |s: &StandIn| -> Vec<String> { s.seen().into_iter().map(|s| s.path).collect() };

    for (uri, why) in [
        (format!("{}/jwks", elsewhere.url), "another host"),
        (
            format!("{}/jwks", issuer.url.replacen("https", "http", 1)),
            "plain http",
        ),
    ] {
        *named.lock().unwrap() = uri;
        issuer.clear();
        let e = verifier(None)
            .verify(&token, jiff::Timestamp::now())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, VerifyError::Keys(m) if m.contains("issuer.jwksUri")),
            "{why}: {e}"
        );
        assert_eq!(
            paths(&issuer),
            ["/.well-known/openid-configuration"],
            "{why}"
        );
        assert!(elsewhere.seen().is_empty(), "{why}: nothing sent elsewhere");
    }
    // On the issuer's host, over https: fetched, with the token.
    *named.lock().unwrap() = format!("{}/jwks", issuer.url);
    issuer.clear();
    let e = verifier(None)
        .verify(&token, jiff::Timestamp::now())
        .await
        .unwrap_err();
    assert_eq!(e, VerifyError::UnknownKey, "the (empty) key set was read");
    assert_eq!(
        paths(&issuer),
        ["/.well-known/openid-configuration", "/jwks"]
    );
    assert!(issuer.seen().iter().all(|s| s.bearer() == Some(own_token)));
    // Configured explicitly, another host is asked, and no discovery at all.
    issuer.clear();
    let explicit = verifier(Some(format!("{}/jwks", elsewhere.url)));
    let e = explicit
        .verify(&token, jiff::Timestamp::now())
        .await
        .unwrap_err();
    assert_eq!(e, VerifyError::UnknownKey);
    assert!(issuer.seen().is_empty());
    assert_eq!(paths(&elsewhere), ["/jwks"]);
    assert_eq!(elsewhere.seen()[0].bearer(), Some(own_token));
}

/// Issue 23, point 7, on the token server with the issue's cap (`maxConnections: 64`): one
/// peer's raw TCP sockets, then its idle TLS connections, more than the cap, while a registry
/// client from another address asks for real tokens (verified with the API server's keys and
/// TokenReview), each on a new connection. Every request must get its token; the latencies
/// are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_clients_get_tokens_while_one_peer_attacks_the_connection_limits() {
    use support::attack::{measure, real_client, tls_client, Attack, Launch, ATTACKER};

    let _serial = serial();
    let cp = ControlPlane::get();
    let c = cp.client().await;
    let work = tempfile::tempdir().unwrap();
    let certs = Certs::for_ips(&["127.0.0.1"]);
    let rules = "  - {namespace: reg-attack, repositories: [\"team-a/*\"]}\n";
    let ts = TestTokenServer::start(
        cp,
        &c,
        work.path(),
        "127.0.0.1",
        &certs,
        "reg-attack-infra",
        rules,
        "maxConnections: 64",
    )
    .await;
    create_namespace(&c, "reg-attack", Default::default()).await;
    let token = service_account_token(&c, "reg-attack", "default", vec![SERVICE.into()]).await;
    let ca = std::fs::read(certs.ca()).unwrap();
    let client = real_client(&ca);
    let url = format!(
        "{}?service={SERVICE}&scope=repository:team-a/app:pull",
        ts.realm
    );
    let real_requests = |during: Duration| {
        measure(during, Duration::from_millis(250), || {
            let request = client.get(&url).basic_auth("u", Some(&token));
            async move {
                let response = request.send().await.map_err(|e| format!("{e:?}"))?;
                let status = response.status();
                let body: Value = response.json().await.map_err(|e| e.to_string())?;
                match (status.as_u16(), body["token"].as_str()) {
                    (200, Some(t)) if !t.is_empty() => Ok(()),
                    _ => Err(format!("{status}: {body}")),
                }
            }
        })
    };
    let limit = Duration::from_secs(10); // the token server's readTimeout bounds any request
    let baseline = real_requests(Duration::from_secs(2)).await;
    println!(
        "token server, maxConnections 64, no attack: {}",
        baseline.summary()
    );
    baseline.assert_all_within(limit, "no attack");
    let attacks: [(&str, Launch); 2] = [
        (
            "100 TCP connections with no TLS from one peer",
            Box::new(|| Attack::raw_sockets(ts.addr, &[ATTACKER], 100, 1000)),
        ),
        (
            "100 TLS connections that send nothing from one peer",
            Box::new(|| {
                Attack::idle_tls(ts.addr, &[ATTACKER], tls_client(&ca, b"http/1.1"), 100, 200)
            }),
        ),
    ];
    let mut failures = Vec::new();
    for (name, attack) in attacks {
        let running = attack();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let figures = real_requests(Duration::from_secs(8)).await;
        let attacker = running.stop().await;
        println!("token server, {name}: {}\n  {attacker}", figures.summary());
        if !(figures.failed.is_empty() && figures.max() <= limit) {
            failures.push(name);
        }
    }
    ts.server.shutdown().await;
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(c.clone())
        .delete("reg-attack", &Default::default())
        .await;
    assert!(
        failures.is_empty(),
        "tokens refused or late under: {failures:?}"
    );
}
