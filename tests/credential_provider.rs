//! `pull-secret-injector credential-provider`, the kubelet's image credential provider.
//!
//! First the binary as the kubelet runs it (a request on stdin, the answer on stdout, errors
//! on stderr) against a local stand-in of an exchange endpoint. Then a real kubelet: this test
//! binary's control plane starts its node with two providers that run this binary, one passing
//! the Pod's token through to the private registry's token server (`kubernetes`), one
//! exchanging it at an RFC 8693 stand-in (`tokenExchange`) for a credential the token server
//! accepts. No webhook runs and no Secret exists: the Pods pull with their own identity.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{json, Value};
use support::node::*;
use support::registry::*;
use support::standin::{jwt, now, Seen, StandIn};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_pull-secret-injector");
const API_VERSION: &str = "credentialprovider.kubelet.k8s.io/v1";

/// What the plugin did with one request.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs the plugin as the kubelet does: `credential-provider --config FILE`, the request on
/// stdin.
fn run_plugin(config: &Path, request: &str) -> Run {
    run_plugin_with(config, request, &[])
}

/// As `run_plugin`, with `env` set (the provider's `env` in the kubelet's config).
fn run_plugin_with(config: &Path, request: &str, env: &[(&str, &str)]) -> Run {
    let mut child = Command::new(BIN)
        .args(["credential-provider", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn request(image: &str, token: Option<&str>) -> String {
    json!({"apiVersion": API_VERSION, "kind": "CredentialProviderRequest", "image": image,
           "serviceAccountToken": token})
    .to_string()
}

/// A service-account token as the kubelet hands it over (the stand-ins do not verify it).
fn pod_token(audience: &str, sa: &str) -> String {
    jwt(json!({
        "iss": "https://kubernetes.default.svc.cluster.local", "aud": [audience],
        "sub": format!("system:serviceaccount:team-a:{sa}"), "exp": now() + 3600,
        "kubernetes.io": {"namespace": "team-a", "serviceaccount": {"name": sa}},
        "secret": "pod-token-secret",
    }))
}

/// A quay stand-in: robot tokens of an hour for `org+puller`, 401 (echoing the password, as
/// a careless server might) for anything else.
async fn quay_standin() -> StandIn {
    StandIn::start(|seen: &Seen| match seen.basic() {
        Some((user, _)) if user == "org+puller" => (
            200,
            json!({"token": jwt(json!({"exp": now() + 3600, "sub": "robot-token-secret"}))})
                .to_string(),
        ),
        Some((_, password)) => (
            401,
            format!("{{\"error\": \"robot federation refused for {password}\"}}"),
        ),
        None => (401, "{}".into()),
    })
    .await
}

fn write_config(dir: &Path, standin: &StandIn, robot: &str) -> PathBuf {
    let path = dir.join("plugin.yaml");
    std::fs::write(
        &path,
        format!(
            "http: {{caFile: {ca}, retries: 0}}\nregistries:\n  - host: quay.test\n    \
             quay: {{robot: \"{robot}\", audience: quay.test, endpoint: \"{url}\"}}\n  \
             - host: registry.test\n    kubernetes: {{audience: registry.test}}\n",
            ca = standin.certs.ca().display(),
            url = standin.url,
        ),
    )
    .unwrap();
    path
}

// The plugin runs as a child process while this runtime serves the stand-in: two threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugin_answers_the_kubelet_with_an_exchanged_credential() {
    let standin = quay_standin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &standin, "org+puller");
    let token = pod_token("quay.test", "builder");
    let run = run_plugin(&config, &request("quay.test/org/app:v1", Some(&token)));
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stderr, "", "nothing on stderr when all is well");
    let response: Value = serde_json::from_str(&run.stdout).expect("the response is JSON");
    assert_eq!(response["apiVersion"], API_VERSION);
    assert_eq!(response["kind"], "CredentialProviderResponse");
    assert_eq!(response["cacheKeyType"], "Registry");
    let auth = &response["auth"]["quay.test"];
    assert_eq!(auth["username"], "org+puller");
    let robot_token = auth["password"].as_str().unwrap();
    assert_eq!(claims(robot_token)["sub"], "robot-token-secret");
    // An hour's robot token is reused for 40 minutes (give or take the second it took).
    let cache: u64 = response["cacheDuration"]
        .as_str()
        .and_then(|d| d.strip_suffix('s'))
        .and_then(|d| d.parse().ok())
        .expect("cacheDuration in seconds");
    assert!((2390..=2400).contains(&cache), "cacheDuration {cache}s");
    // What Quay received: the Pod's token as the robot's password, nothing else.
    let seen = standin.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/oauth2/federation/robot/token");
    assert_eq!(seen[0].basic(), Some(("org+puller".into(), token)));
}

/// Issue 23, point 14: stdin is read up to a limit. 24 MiB of `{}` (the input, which
/// took 308 MiB) is refused with a one-line error before anything is parsed; the peak memory
/// is printed when `/usr/bin/time` is there to measure it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_on_stdin_is_refused_with_bounded_memory() {
    let standin = quay_standin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &standin, "org+puller");
    let time = Path::new("/usr/bin/time");
    let mut command = match time.exists() {
        true => {
            let mut c = Command::new(time);
            c.args(["-f", "peak RSS %M KiB", BIN]);
            c
        }
        false => Command::new(BIN),
    };
    let mut child = command
        .args(["credential-provider", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the plugin");
    let mut stdin = child.stdin.take().unwrap();
    // The plugin stops reading at the limit: the rest of the write fails, as it should.
    let writer = std::thread::spawn(move || {
        let chunk = b"{}".repeat(32 * 1024);
        for _ in 0..(24 * 1024 * 1024 / chunk.len()) {
            if stdin.write_all(&chunk).is_err() {
                return;
            }
        }
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("24 MiB of {{}} on stdin: {}", stderr.trim());
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty());
    let line = stderr.lines().next().unwrap_or_default();
    assert_eq!(
        line,
        "pull-secret-injector credential-provider: the request on stdin is larger than 1024 KiB; the kubelet sends one CredentialProviderRequest of a few kilobytes"
    );
}

// The plugin runs as a child process while this runtime serves the stand-in: two threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pass_through_token_is_never_reused() {
    let standin = quay_standin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &standin, "org+puller");
    let token = pod_token("registry.test", "builder");
    let run = run_plugin(&config, &request("registry.test/team-a/app", Some(&token)));
    assert_eq!(run.code, 0, "{}", run.stderr);
    let response: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(response["cacheDuration"], "0s");
    assert_eq!(
        response["auth"]["registry.test"],
        json!({"username": "builder", "password": token})
    );
    assert!(standin.seen().is_empty(), "nothing to exchange");
}

// The plugin runs as a child process while this runtime serves the stand-in: two threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_one_line_on_stderr_without_the_token() {
    let standin = quay_standin().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &standin, "org+stranger");
    let token = pod_token("quay.test", "builder");
    let cases = [
        // The server's refusal: registry, status, its text with the token redacted.
        (
            request("quay.test/org/app:v1", Some(&token)),
            format!(
                "pull-secret-injector credential-provider: registry quay.test: quay: GET {}/oauth2/federation/robot/token answered 401: robot federation refused for <redacted>\n",
                standin.url
            ),
        ),
        (
            request("quay.test/org/app:v1", Some(&pod_token("registry.test", "b"))),
            "pull-secret-injector credential-provider: registry quay.test: the service-account token is for audience [\"registry.test\"], the config expects \"quay.test\"".into(),
        ),
        (
            request("quay.test/org/app:v1", None),
            "pull-secret-injector credential-provider: registry quay.test: the request has no serviceAccountToken, which the quay source needs".into(),
        ),
        (
            request("ghcr.io/org/app:v1", Some(&token)),
            "pull-secret-injector credential-provider: image \"ghcr.io/org/app:v1\" is on registry ghcr.io, which the config does not list (it lists quay.test, registry.test)".into(),
        ),
        (
            request("quay.test/org/app:v1", Some(&token)).replace("/v1\"", "/v1beta1\""),
            "pull-secret-injector credential-provider: the request's apiVersion is \"credentialprovider.kubelet.k8s.io/v1beta1\"".into(),
        ),
        (
            format!("{{\"serviceAccountToken\": \"{token}"),
            "pull-secret-injector credential-provider: the request on stdin is not JSON".into(),
        ),
    ];
    for (input, expected) in cases {
        let run = run_plugin(&config, &input);
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert_eq!(run.stdout, "", "no response with an error");
        assert!(
            run.stderr.starts_with(&expected),
            "expected {expected:?}, got {:?}",
            run.stderr
        );
        assert_eq!(run.stderr.lines().count(), 1, "{:?}", run.stderr);
        assert!(
            !run.stderr.contains(&token) && !run.stderr.contains("pod-token-secret"),
            "{:?}",
            run.stderr
        );
    }
    let run = run_plugin(
        &dir.path().join("missing.yaml"),
        &request("quay.test/a", None),
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .starts_with("pull-secret-injector credential-provider: cannot read config file "),
        "{}",
        run.stderr
    );
}

/// The sources of "More registries" answer the kubelet with the Pod's token, the exchanges
/// going through the proxy the kubelet's `env` names (read once by the plugin, passed down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sources_answer_the_kubelet_through_a_proxy() {
    use support::standin::registries;
    let Some(proxy) = support::proxy::Proxy::start() else {
        return;
    };
    let exp = now() + 3600;
    let issued = jwt(json!({"sub": "issued-secret", "exp": exp}));
    let answer = issued.clone();
    let verify = |params: &BTreeMap<String, String>, signature: &str| {
        let params: BTreeMap<&str, String> = params
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        pull_secret_injector::sources::alibaba::sign("POST", &params, registries::ALI_SECRET)
            == signature
    };
    let standin = StandIn::start(move |s| {
        let sa = s
            .field("subject_token")
            .or_else(|| s.field("oidc_token"))
            .or_else(|| s.form().get("OIDCToken").cloned())
            .or_else(|| s.bearer().map(str::to_string))
            .unwrap_or_default();
        match s.path.as_str() {
            "/access/api/v1/oidc/token" => registries::artifactory(s, &sa, &answer),
            "/openid/acme/" => registries::cloudsmith(s, &sa, &answer),
            "/api/v1/auth/ci/token" => registries::artifact_keeper(s, &sa, &answer),
            "/oauth/token" => registries::docker_hub(s, &sa, &answer),
            _ => registries::alibaba(s, &sa, &answer, exp, &verify),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plugin.yaml");
    let url = &standin.url;
    std::fs::write(
        &config,
        format!(
            "http: {{caFile: {ca}, retries: 0}}\nregistries:\n\
             - {{host: jfrog.test, artifactory: {{providerName: k8s-cluster, audience: jfrog, endpoint: \"{url}\"}}}}\n\
             - {{host: cloudsmith.test, cloudsmith: {{organization: acme, serviceSlug: puller-x1y2, audience: cloudsmith, endpoint: \"{url}\"}}}}\n\
             - {{host: ak.test, artifactKeeper: {{audience: artifact-keeper, endpoint: \"{url}\", providerId: \"{ak}\"}}}}\n\
             - {{host: docker.test, dockerHub: {{connectionId: {dh}, organization: acme, expiresIn: 600, endpoint: \"{url}\"}}}}\n\
             - {{host: cri.test, alibaba: {{region: cn-hangzhou, instanceId: cri-k8stest123, roleArn: \"{role}\", oidcProviderArn: \"{provider}\", stsEndpoint: \"{url}/sts\", crEndpoint: \"{url}/cr\"}}}}\n\
             - {{host: long-tail.test, declarative: {{url: \"{url}/api/v1/auth/ci/token\", audience: long-tail, token: {{in: bearer}}, fields: {{provider_id: \"{ak}\"}}, answer: {{expiresIn: /expires_in, username: /username}}}}}}\n",
            ca = standin.certs.ca().display(),
            ak = registries::AK_PROVIDER,
            dh = registries::DOCKER_CONNECTION,
            role = registries::ALI_ROLE,
            provider = registries::ALI_PROVIDER,
        ),
    )
    .unwrap();
    // The Pod's ServiceAccount is `default` in team-a: Alibaba's session name names it.
    let cases = [
        ("jfrog.test", "jfrog", "k8s-puller"),
        ("cloudsmith.test", "cloudsmith", "puller-x1y2"),
        ("ak.test", "artifact-keeper", "ci-k8s"),
        ("docker.test", "https://identity.docker.com", "acme"),
        ("cri.test", "sts.aliyuncs.com", "cr_temp_user"),
        ("long-tail.test", "long-tail", "ci-k8s"),
    ];
    let env = [("HTTPS_PROXY", proxy.url.as_str()), ("NO_PROXY", "")];
    for (host, audience, username) in cases {
        let token = pod_token(audience, "default");
        let run = run_plugin_with(
            &config,
            &request(&format!("{host}/app:v1"), Some(&token)),
            &env,
        );
        assert_eq!(run.code, 0, "{host}: {}", run.stderr);
        let response: Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(response["auth"][host]["username"], username, "{host}");
        assert_eq!(
            response["auth"][host]["password"],
            issued.as_str(),
            "{host}"
        );
        let cache: u64 = response["cacheDuration"]
            .as_str()
            .and_then(|d| d.strip_suffix('s'))
            .and_then(|d| d.parse().ok())
            .unwrap();
        assert!(cache > 0, "{host}: an exchanged credential is cached");
    }
    assert!(
        proxy.connects_to(&standin.host()) >= cases.len(),
        "the exchanges did not go through the proxy"
    );
    // A proxy that is not there: one clear line, no token.
    let dead = format!("http://127.0.0.1:{}", free_port("127.0.0.1"));
    let token = pod_token("jfrog", "default");
    let run = run_plugin_with(
        &config,
        &request("jfrog.test/app:v1", Some(&token)),
        &[("HTTPS_PROXY", dead.as_str())],
    );
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.starts_with(
            "pull-secret-injector credential-provider: registry jfrog.test: artifactory: POST "
        ) && !run.stderr.contains(&token),
        "{}",
        run.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecr_takes_the_role_from_the_annotation_the_kubelet_passes() {
    let role = "arn:aws:iam::123456789012:role/team-a-puller";
    let expires_at = now() + 12 * 3600;
    let standin = StandIn::start(move |s: &Seen| match s.path.as_str() {
        "/sts/" if s.field("RoleArn").as_deref() == Some(role) => (
            200,
            "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
             <AccessKeyId>ASIAEXAMPLE</AccessKeyId><SecretAccessKey>aws-secret-key</SecretAccessKey>\
             <SessionToken>aws-session-token</SessionToken></Credentials>\
             </AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
                .into(),
        ),
        "/ecr/" => {
            let token = base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                "AWS:ecr-password",
            );
            (
                200,
                json!({"authorizationData": [{"authorizationToken": token, "expiresAt": expires_at}]})
                    .to_string(),
            )
        }
        _ => (403, "<Error><Code>AccessDenied</Code></Error>".into()),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plugin.yaml");
    std::fs::write(
        &config,
        format!(
            "http: {{caFile: {}}}\nregistries:\n  - host: 123456789012.dkr.ecr.eu-west-1.amazonaws.com\n    \
             ecr: {{region: eu-west-1, stsEndpoint: \"{url}/sts\", ecrEndpoint: \"{url}/ecr\"}}\n",
            standin.certs.ca().display(),
            url = standin.url
        ),
    )
    .unwrap();
    let token = pod_token("sts.amazonaws.com", "builder");
    let input = json!({"apiVersion": API_VERSION, "kind": "CredentialProviderRequest",
        "image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/app:v1", "serviceAccountToken": token,
        "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": role}});
    let run = run_plugin(&config, &input.to_string());
    assert_eq!(run.code, 0, "{}", run.stderr);
    let response: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        response["auth"]["123456789012.dkr.ecr.eu-west-1.amazonaws.com"],
        json!({"username": "AWS", "password": "ecr-password"})
    );
    // ECR's 12 hours: reused for 8.
    let cache: u64 = response["cacheDuration"]
        .as_str()
        .unwrap()
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!((28790..=28800).contains(&cache), "cacheDuration {cache}s");
    let sts = &standin.seen()[0];
    assert_eq!(sts.field("WebIdentityToken"), Some(token.clone()));
    assert_eq!(
        sts.field("RoleSessionName").as_deref(),
        Some("pull-secret-injector-team-a"),
        "the session names the Pod's namespace, read from its token"
    );
    // Without the annotation in the request (the kubelet was not told to pass it).
    let mut bare = input.clone();
    bare.as_object_mut()
        .unwrap()
        .remove("serviceAccountAnnotations");
    let run = run_plugin(&config, &bare.to_string());
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("ServiceAccount team-a/builder has no eks.amazonaws.com/role-arn annotation in the request"),
        "{}",
        run.stderr
    );
    assert_eq!(standin.seen().len(), 2, "no call without a role");
}

fn kubernetes_only_config(dir: &Path) -> PathBuf {
    let path = dir.join("plugin.yaml");
    std::fs::write(
        &path,
        "registries:\n  - host: registry.test\n    kubernetes: {audience: registry.test}\n",
    )
    .unwrap();
    path
}

#[test]
fn the_daemonsets_install_step_puts_a_working_plugin_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let config = kubernetes_only_config(dir.path());
    // The init container's arguments as shipped, with this machine's paths.
    let daemonset: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/credential-provider/daemonset.yaml")).unwrap(),
    )
    .unwrap();
    let providers = dir.path().join("host/credential-providers");
    let args: Vec<String> = daemonset["spec"]["template"]["spec"]["initContainers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace(
                    "/config/pull-secret-injector.yaml",
                    config.to_str().unwrap(),
                )
                .replace("/host/credential-providers", providers.to_str().unwrap())
        })
        .collect();
    let out = Command::new(BIN).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let installed = providers.join("pull-secret-injector");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "installed {}\ninstalled {}.yaml\n",
            installed.display(),
            installed.display()
        )
    );
    // The copy is the plugin, reading the copied config.
    let mut child = Command::new(&installed)
        .args(["credential-provider", "--config"])
        .arg(installed.with_extension("yaml"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let token = pod_token("registry.test", "builder");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(request("registry.test/a/b", Some(&token)).as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let response: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        response["auth"]["registry.test"]["password"],
        token.as_str()
    );

    // A config the plugin could not use is not installed.
    std::fs::write(&config, "registries: []\n").unwrap();
    let other = dir.path().join("other");
    let out = Command::new(BIN)
        .args(["credential-provider", "--config"])
        .arg(&config)
        .arg("--install-to")
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("registries: at least one registry is required"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!other.exists(), "nothing written");
}

// --- Through a real kubelet -------------------------------------------------------------

/// The token audiences of the two providers.
const EXCHANGE_AUDIENCE: &str = "exchange.test";
const DIRECT: &str = "cp-direct";
const EXCHANGE: &str = "cp-exchange";

/// What the kubelet was configured with before it started: its providers run this binary
/// with configs in `dir` that the test writes once the registry runs (the plugin reads its
/// config at every call).
struct NodeSetup {
    dir: PathBuf,
    port: u16,
}

fn node_setup() -> &'static NodeSetup {
    static SETUP: OnceLock<NodeSetup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("psi-credprov-{}", std::process::id()));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        // The kubelet runs `<bin dir>/<provider name>`: this build's binary, twice.
        for name in ["psi-direct", "psi-exchange"] {
            std::os::unix::fs::symlink(BIN, bin.join(name)).unwrap();
        }
        // The registry's port goes into matchImages, so it is chosen now; the host is the
        // node's link address, known once the node runs (matchImages globs it).
        let port = free_port("127.0.0.1");
        let provider = |name: &str, path: &str, audience: &str, cache_type: &str| {
            json!({
                "name": name, "apiVersion": API_VERSION,
                "matchImages": [format!("*.*.*.*:{port}/{path}")],
                "defaultCacheDuration": "0s",
                "args": ["credential-provider", "--config", dir.join(format!("{name}.yaml"))],
                "tokenAttributes": {"serviceAccountTokenAudience": audience,
                                    "cacheType": cache_type, "requireServiceAccount": true},
            })
        };
        let config = json!({
            "apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig",
            "providers": [
                provider("psi-direct", "direct", SERVICE, "Token"),
                provider("psi-exchange", "exchanged", EXCHANGE_AUDIENCE, "ServiceAccount"),
            ],
        });
        let config_file = dir.join("credential-providers.yaml");
        std::fs::write(&config_file, serde_yaml::to_string(&config).unwrap()).unwrap();
        NodeSetup { dir, port }
    })
}

fn control_plane() -> &'static ControlPlane {
    let setup = node_setup();
    ControlPlane::with_node_args(&[
        format!(
            "--image-credential-provider-config={}",
            setup.dir.join("credential-providers.yaml").display()
        ),
        format!(
            "--image-credential-provider-bin-dir={}",
            setup.dir.join("bin").display()
        ),
    ])
}

/// The DaemonSet's own identity (check-rbac.yaml, as shipped); the binding's name.
async fn apply_check_rbac(c: &kube::Client) -> String {
    let text =
        std::fs::read_to_string(repo().join("deploy/credential-provider/check-rbac.yaml")).unwrap();
    let mut binding = String::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let object: Value = serde::Deserialize::deserialize(doc).unwrap();
        let name = object["metadata"]["name"].as_str().unwrap().to_string();
        let path = match object["kind"].as_str().unwrap() {
            "ServiceAccount" => "/api/v1/namespaces/kube-system/serviceaccounts".to_string(),
            "ClusterRole" => "/apis/rbac.authorization.k8s.io/v1/clusterroles".to_string(),
            "ClusterRoleBinding" => {
                binding = name.clone();
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings".to_string()
            }
            other => panic!("check-rbac.yaml: unexpected {other}"),
        };
        let (status, _, text) = post(c, &path, &object).await;
        assert!(
            status.is_success() || status == 409,
            "creating {name}: {status} {text}"
        );
    }
    binding
}

/// The shipped node RBAC, for the test's two audiences.
async fn grant_node_audiences(c: &kube::Client) {
    let text =
        std::fs::read_to_string(repo().join("deploy/credential-provider/rbac.yaml")).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut object: Value = serde::Deserialize::deserialize(doc).unwrap();
        let (path, kind) = match object["kind"].as_str().unwrap() {
            "ClusterRole" => {
                object["rules"][0]["resources"] = json!([SERVICE, EXCHANGE_AUDIENCE]);
                ("clusterroles", "ClusterRole")
            }
            other => ("clusterrolebindings", other),
        };
        let (status, _, text) = post(
            c,
            &format!("/apis/rbac.authorization.k8s.io/v1/{path}"),
            &object,
        )
        .await;
        // Another test of this binary may have granted them already.
        assert!(
            status.is_success() || status == 409,
            "creating the {kind}: {status} {text}"
        );
    }
}

/// An RFC 8693 stand-in on the node's link: it exchanges a Pod's token (audience
/// `exchange.test`) for a credential of that ServiceAccount the registry's token server
/// accepts (a token with the registry's audience, minted beforehand), valid `expires_in`.
async fn exchange_standin(ip: &str, identities: BTreeMap<String, (String, i64)>) -> StandIn {
    StandIn::start_on(ip, move |seen: &Seen| {
        let subject = seen.field("subject_token").unwrap_or_default();
        let claims = token_claims(&subject);
        let audience_ok = claims["aud"]
            .as_array()
            .is_some_and(|a| a.iter().any(|a| a == EXCHANGE_AUDIENCE));
        let sub = claims["sub"].as_str().unwrap_or_default();
        match identities.get(sub) {
            _ if seen.field("grant_type").as_deref()
                != Some("urn:ietf:params:oauth:grant-type:token-exchange")
                || !audience_ok =>
            {
                (400, json!({"error": "invalid_request"}).to_string())
            }
            Some((token, expires_in)) => (
                200,
                json!({"access_token": token, "issued_token_type": "urn:ietf:params:oauth:token-type:jwt",
                       "token_type": "N_A", "expires_in": expires_in})
                .to_string(),
            ),
            None => (
                400,
                json!({"error": "invalid_grant", "error_description": format!("no identity is bound to {sub}")})
                    .to_string(),
            ),
        }
    })
    .await
}

fn token_claims(token: &str) -> Value {
    if token.split('.').count() == 3 {
        claims(token)
    } else {
        Value::Null
    }
}

/// Exchanges the stand-in answered for `namespace/sa`.
fn exchanges(standin: &StandIn, namespace: &str, sa: &str) -> Vec<Seen> {
    let sub = format!("system:serviceaccount:{namespace}:{sa}");
    standin
        .seen()
        .into_iter()
        .filter(|s| token_claims(&s.field("subject_token").unwrap_or_default())["sub"] == sub)
        .collect()
}

async fn create_service_account(c: &kube::Client, ns: &str, name: &str) {
    let api: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(c.clone(), ns);
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
    )
    .await
    .unwrap();
}

async fn assert_no_secrets(c: &kube::Client, ns: &str) {
    let secrets = Api::<Secret>::namespaced(c.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(
        secrets.items.is_empty(),
        "{ns} has Secrets: {:?}",
        secrets
            .items
            .iter()
            .map(|s| s.metadata.name.clone())
            .collect::<Vec<_>>()
    );
}

fn pod_pull_secrets(pod: &Pod) -> usize {
    pull_secret_names(pod).len()
}

/// Runs the Pod to completion (`run_pod`, which tries once more when the runtime lost its
/// sandbox) and checks that it pulled its image with no pull Secret.
async fn run_to_completion(cp: &ControlPlane, c: &kube::Client, ns: &str, pod: Value) {
    let ran = run_pod(cp, c, ns, pod).await;
    assert_eq!(pod_pull_secrets(&ran.pod), 0, "no imagePullSecrets");
    assert!(
        ran.printed.contains(MARKER),
        "{ns}/{} printed: {}",
        ran.name,
        ran.printed
    );
    let evs = events(c, ns, &ran.name).await;
    assert!(
        evs.iter().any(|e| e.starts_with("Pulled:")),
        "{ns}/{} pulled its image: {evs:?}",
        ran.name
    );
}

/// KEP-4412's service-account tokens for providers are beta, on by default, from 1.34; an
/// older kubelet refuses `tokenAttributes`. `KUBERNETES_VERSION` is what the harness builds.
fn kubelet_has_service_account_tokens() -> bool {
    let version = std::env::var("KUBERNETES_VERSION").unwrap_or_else(|_| "1.37".into());
    let minor = version
        .split('.')
        .nth(1)
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(0);
    if version.starts_with("1.") && minor < 34 {
        eprintln!("SKIPPED: Kubernetes {version}: the kubelet hands plugins service-account tokens from 1.34");
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubelet_pulls_with_the_pods_own_identity_and_no_secret() {
    if !tools_present() || !kubelet_has_service_account_tokens() {
        return;
    }
    let _serial = serial();
    let setup = node_setup();
    let cp = control_plane();
    let c = cp.client().await;
    let ip = cp.host_ip();
    grant_node_audiences(&c).await;
    let work = tempfile::tempdir().unwrap();
    let rules = format!(
        "  - {{namespace: {DIRECT}, serviceAccount: default, repositories: [\"direct/*\"]}}\n  \
         - {{namespace: {EXCHANGE}, serviceAccount: builder, repositories: [\"exchanged/*\"]}}\n  \
         - {{namespace: {EXCHANGE}, serviceAccount: deployer, repositories: [\"exchanged/*\"]}}\n  \
         - {{namespace: cp-ci, serviceAccount: pusher, repositories: [\"*\"], actions: [pull, push]}}\n"
    );
    let registry =
        PrivateRegistry::start_at(cp, &c, work.path(), &ip, setup.port, "cp-infra", &rules).await;
    trust_registry(cp, &registry);
    let host = registry.host.clone();
    let direct_image = format!("{host}/direct/app:v1");
    let exchanged_image = format!("{host}/exchanged/app:v1");
    create_namespace(&c, "cp-ci", Default::default()).await;
    let pusher = service_account_token(&c, "cp-ci", "pusher", vec![SERVICE.into()]).await;
    for (image, repository) in [
        (&direct_image, "direct/app:v1"),
        (&exchanged_image, "exchanged/app:v1"),
    ] {
        registry.push(
            &busybox_image(work.path(), image),
            repository,
            &format!("pusher:{pusher}"),
        );
    }

    // The exchange's identities: builder's credential lasts an hour, deployer's 90 s (reused
    // for 30 s), outsider's is one the token server's rules grant nothing; stranger has none.
    create_namespace(&c, EXCHANGE, Default::default()).await;
    let mut identities = BTreeMap::new();
    for (sa, expires_in) in [("builder", 3600), ("deployer", 90), ("outsider", 3600)] {
        let token = service_account_token(&c, EXCHANGE, sa, vec![SERVICE.into()]).await;
        identities.insert(
            format!("system:serviceaccount:{EXCHANGE}:{sa}"),
            (token, expires_in),
        );
    }
    create_service_account(&c, EXCHANGE, "stranger").await;
    let standin = exchange_standin(&ip, identities).await;
    std::fs::write(
        setup.dir.join("psi-direct.yaml"),
        format!("registries:\n  - host: \"{host}\"\n    kubernetes: {{audience: {SERVICE}}}\n"),
    )
    .unwrap();
    std::fs::write(
        setup.dir.join("psi-exchange.yaml"),
        format!(
            "http: {{caFile: {ca}}}\nregistries:\n  - host: \"{host}\"\n    tokenExchange: \
             {{endpoint: \"{url}/token\", username: exchanged, subjectTokenAudience: {EXCHANGE_AUDIENCE}, \
             audience: {SERVICE}}}\n",
            ca = standin.certs.ca().display(),
            url = standin.url,
        ),
    )
    .unwrap();
    let webhooks = Api::<MutatingWebhookConfiguration>::all(c.clone())
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(webhooks.items.is_empty(), "no webhook in this cluster");
    // The shipped DaemonSet that puts the plugin on nodes is one the API server accepts.
    let daemonset: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/credential-provider/daemonset.yaml")).unwrap(),
    )
    .unwrap();
    let (status, _, text) = post(
        &c,
        "/apis/apps/v1/namespaces/kube-system/daemonsets?dryRun=All",
        &daemonset,
    )
    .await;
    assert!(status.is_success(), "the DaemonSet: {status} {text}");

    // 1. Pass-through: the Pod's own token, bound to it, is the registry password. The
    // namespace has no Secret, before and after.
    create_namespace(&c, DIRECT, Default::default()).await;
    create_service_account(&c, DIRECT, "other").await;
    run_to_completion(cp, &c, DIRECT, app_pod("app", &direct_image, "Always")).await;
    // A ServiceAccount the rules do not name: its token is valid and granted nothing.
    create(
        &c,
        DIRECT,
        app_pod_as("other", &direct_image, "Always", "other"),
    )
    .await;
    let evs = wait_pull_refused(&c, DIRECT, "other").await;
    assert!(
        evs.iter()
            .any(|e| e.contains("insufficient_scope") || e.contains("authorization failed")),
        "the registry's refusal: {evs:?}"
    );
    assert_no_secrets(&c, DIRECT).await;

    // 2. Exchanged: one exchange per ServiceAccount while its credential lasts.
    run_to_completion(
        cp,
        &c,
        EXCHANGE,
        app_pod_as("b1", &exchanged_image, "Always", "builder"),
    )
    .await;
    let first = exchanges(&standin, EXCHANGE, "builder");
    assert_eq!(first.len(), 1, "builder's first pull exchanged once");
    assert_eq!(first[0].field("audience").as_deref(), Some(SERVICE));
    run_to_completion(
        cp,
        &c,
        EXCHANGE,
        app_pod_as("b2", &exchanged_image, "Always", "builder"),
    )
    .await;
    assert_eq!(
        exchanges(&standin, EXCHANGE, "builder").len(),
        1,
        "a second Pod of builder pulled with the kubelet's cached credential"
    );
    run_to_completion(
        cp,
        &c,
        EXCHANGE,
        app_pod_as("d1", &exchanged_image, "Always", "deployer"),
    )
    .await;
    let deployer = exchanges(&standin, EXCHANGE, "deployer");
    assert_eq!(
        deployer.len(),
        1,
        "another ServiceAccount, its own exchange"
    );
    // deployer's 90 s credential was handed out for 30 s; past that, a Pod exchanges again,
    // while builder's hour-long one is still reused.
    let reusable_until = deployer[0].at + Duration::from_secs(32);
    tokio::time::sleep(reusable_until.saturating_duration_since(Instant::now())).await;
    run_to_completion(
        cp,
        &c,
        EXCHANGE,
        app_pod_as("d2", &exchanged_image, "Always", "deployer"),
    )
    .await;
    run_to_completion(
        cp,
        &c,
        EXCHANGE,
        app_pod_as("b3", &exchanged_image, "Always", "builder"),
    )
    .await;
    assert_eq!(exchanges(&standin, EXCHANGE, "deployer").len(), 2);
    assert_eq!(exchanges(&standin, EXCHANGE, "builder").len(), 1);

    // An identity the exchange vouches for but the rules do not grant: refused at the registry.
    create(
        &c,
        EXCHANGE,
        app_pod_as("o1", &exchanged_image, "Always", "outsider"),
    )
    .await;
    let evs = wait_pull_refused(&c, EXCHANGE, "o1").await;
    assert!(
        evs.iter()
            .any(|e| e.contains("insufficient_scope") || e.contains("authorization failed")),
        "the registry's refusal: {evs:?}"
    );
    // One the exchange refuses: the plugin fails, the kubelet pulls without credentials and
    // logs the plugin's line (registry, status, the server's text), with no token in it.
    create(
        &c,
        EXCHANGE,
        app_pod_as("s1", &exchanged_image, "Always", "stranger"),
    )
    .await;
    let evs = wait_pull_refused(&c, EXCHANGE, "s1").await;
    assert!(
        evs.iter().any(|e| e.contains("401 Unauthorized")),
        "no credential, the registry's refusal: {evs:?}"
    );
    let kubelet_log = std::fs::read_to_string(cp.dir.join("node/kubelet.log")).unwrap();
    let expected = format!(
        "pull-secret-injector credential-provider: registry {host}: tokenExchange: POST {}/token answered 400: ",
        standin.url
    );
    let line = kubelet_log
        .lines()
        .find(|l| l.contains(&expected))
        .unwrap_or_else(|| panic!("the kubelet logged the plugin's error {expected:?}"));
    eprintln!("kubelet: {line}");
    assert!(
        line.contains("no identity is bound to system:serviceaccount:cp-exchange:stranger"),
        "{line}"
    );
    assert!(
        !line.contains("eyJ"),
        "no token in the kubelet's log: {line}"
    );
    assert_no_secrets(&c, EXCHANGE).await;

    registry.shutdown().await;
}

/// What `credential-provider merge` and `check` print, and whether they succeeded.
fn run_cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("KUBECONFIG", control_plane().kubeconfig())
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// For operators who provision nodes with a file: this plugin's entry merged into the node's
/// CredentialProviderConfig (the two providers already there kept), the kubelet restarted, and
/// a Pod pulls with its own identity and no Secret. `check` finds nothing wrong on that node;
/// with the node's grant for the audience removed, it names the missing grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merged_config_after_a_kubelet_restart_pulls_and_check_names_a_missing_grant() {
    if !tools_present() || !kubelet_has_service_account_tokens() {
        return;
    }
    let _serial = serial();
    let setup = node_setup();
    let cp = control_plane();
    let c = cp.client().await;
    grant_node_audiences(&c).await;
    let ip = cp.host_ip();
    let work = tempfile::tempdir().unwrap();
    let ns = "cp-merged";
    let rules = format!(
        "  - {{namespace: {ns}, serviceAccount: default, repositories: [\"merged/*\"]}}\n  \
         - {{namespace: cp-merged-ci, serviceAccount: pusher, repositories: [\"*\"], actions: [pull, push]}}\n"
    );
    let registry = PrivateRegistry::start_at(
        cp,
        &c,
        work.path(),
        &ip,
        setup.port,
        "cp-merged-infra",
        &rules,
    )
    .await;
    trust_registry(cp, &registry);
    let host = registry.host.clone();
    let image = format!("{host}/merged/app:v1");
    create_namespace(&c, "cp-merged-ci", Default::default()).await;
    let pusher = service_account_token(&c, "cp-merged-ci", "pusher", vec![SERVICE.into()]).await;
    registry.push(
        &busybox_image(work.path(), &image),
        "merged/app:v1",
        &format!("pusher:{pusher}"),
    );

    // 1. The plugin as the operator installs it: binary and config in the bin dir, its entry
    // merged into the kubelet's file; twice (the second changes nothing).
    let name = "psi-merged";
    let bin = setup.dir.join("bin");
    let _ = std::fs::remove_file(bin.join(name));
    std::os::unix::fs::symlink(BIN, bin.join(name)).unwrap();
    let plugin = bin.join(format!("{name}.yaml"));
    std::fs::write(
        &plugin,
        format!("registries:\n  - host: \"{host}\"\n    kubernetes: {{audience: {SERVICE}}}\n"),
    )
    .unwrap();
    let kubelet_config = setup.dir.join("credential-providers.yaml");
    let (plugin_s, kubelet_s) = (plugin.to_str().unwrap(), kubelet_config.to_str().unwrap());
    // Put back at the end: the merged provider matches every image of the registry's host,
    // which the other test of this binary counts on reaching only its own two providers.
    let original = std::fs::read_to_string(&kubelet_config).unwrap();
    let merge = [
        "credential-provider",
        "merge",
        "--config",
        plugin_s,
        "--kubelet-config",
        kubelet_s,
        "--name",
        name,
        "--write",
    ];
    let (ok, out) = run_cli(&merge);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("merged {name}; restart the kubelet")),
        "{out}"
    );
    let (ok, out) = run_cli(&merge);
    assert!(ok && out.contains("unchanged"), "{out}");
    let merged: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&kubelet_config).unwrap()).unwrap();
    let names: Vec<&str> = merged["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["psi-direct", "psi-exchange", name], "others kept");
    cp.restart_kubelet();

    // 2. A Pod of the namespace pulls with its own token, no Secret anywhere.
    create_namespace(&c, ns, Default::default()).await;
    wait_for(
        "the default ServiceAccount",
        Duration::from_secs(30),
        || async {
            Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(c.clone(), ns)
                .get_opt("default")
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;
    run_to_completion(cp, &c, ns, app_pod("app", &image, "Always")).await;
    assert_no_secrets(&c, ns).await;

    // 3. `check` on this node: all holds, the sample request included.
    let sample = format!("{ns}/default");
    let bin_s = bin.to_str().unwrap();
    let check = [
        "credential-provider",
        "check",
        "--config",
        plugin_s,
        "--kubelet-config",
        kubelet_s,
        "--bin-dir",
        bin_s,
        "--name",
        name,
        "--node-name",
        "psi-node",
        "--sample-service-account",
        &sample,
    ];
    let (ok, out) = run_cli(&check);
    eprintln!("check:\n{out}");
    assert!(ok, "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    assert!(
        out.contains(&format!(
            "node psi-node may request service-account tokens for audience {SERVICE}"
        )),
        "{out}"
    );
    assert!(
        out.contains("the plugin answered a credential (not shown)"),
        "{out}"
    );
    assert!(!out.contains("eyJ"), "no token printed: {out}");

    // 3b. The same check as the DaemonSet's `check` init container runs it at start: its
    // arguments as shipped (this machine's paths for the mounts), NODE_NAME from the downward
    // API, and the identity it is given: its ServiceAccount with check-rbac.yaml and nothing
    // else. Without that binding the check cannot ask, and says so.
    let check_rbac = apply_check_rbac(&c).await;
    let daemonset: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("deploy/credential-provider/daemonset.yaml")).unwrap(),
    )
    .unwrap();
    let pod = &daemonset["spec"]["template"]["spec"];
    let container = pod["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "check")
        .expect("an init container named check");
    assert_eq!(
        container["env"][0],
        json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    );
    let service_account = pod["serviceAccountName"].as_str().unwrap();
    let args: Vec<String> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("/config/pull-secret-injector.yaml", plugin_s)
                .replace("/host/credential-provider-config.yaml", kubelet_s)
                .replace("/host/credential-providers", bin_s)
                .replace("--name=pull-secret-injector", &format!("--name={name}"))
        })
        .collect();
    let token = service_account_token(&c, "kube-system", service_account, vec![]).await;
    let kubeconfig = work.path().join("daemonset-kubeconfig");
    let mut admin: Value =
        serde_yaml::from_str(&std::fs::read_to_string(cp.kubeconfig()).unwrap()).unwrap();
    admin["users"][0]["user"] = json!({ "token": token });
    std::fs::write(&kubeconfig, serde_yaml::to_string(&admin).unwrap()).unwrap();
    let as_daemonset = || {
        let out = Command::new(BIN)
            .args(&args)
            .env("KUBECONFIG", &kubeconfig)
            .env("NODE_NAME", "psi-node")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, out) = as_daemonset();
    eprintln!("the DaemonSet's check:\n{out}");
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "ok: node psi-node may request service-account tokens for audience {SERVICE}"
        )),
        "{out}"
    );
    assert!(!out.contains(&token), "no token printed: {out}");
    c.request_text(
        http::Request::delete(format!(
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{check_rbac}"
        ))
        .body(Vec::new())
        .unwrap(),
    )
    .await
    .unwrap();
    wait_for(
        "the check refused without its binding",
        Duration::from_secs(10),
        || async {
            let (ok, out) = as_daemonset();
            !ok && out.contains("asking the API server") && out.contains("forbidden")
        },
    )
    .await;

    // 4. The node's grant removed: `check` names it and what to do.
    let binding = "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/pull-secret-injector-credential-provider";
    let saved: Value = c
        .request(http::Request::get(binding).body(Vec::new()).unwrap())
        .await
        .unwrap();
    c.request_text(http::Request::delete(binding).body(Vec::new()).unwrap())
        .await
        .unwrap();
    let (ok, out) = run_cli(&check);
    eprintln!("check without the grant:\n{out}");
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!("FAIL: node psi-node may not request service-account tokens for audience {SERVICE} (verb request-serviceaccounts-token-audience)")),
        "{out}"
    );
    assert!(out.contains("grant it to group system:nodes"), "{out}");
    // And a provider without tokenAttributes: named too.
    let mut broken = merged.clone();
    broken["providers"][2]
        .as_object_mut()
        .unwrap()
        .remove("tokenAttributes");
    let broken_file = work.path().join("broken.yaml");
    std::fs::write(&broken_file, serde_yaml::to_string(&broken).unwrap()).unwrap();
    let mut args = check.to_vec();
    args[5] = broken_file.to_str().unwrap();
    let (_, out) = run_cli(&args);
    assert!(
        out.contains("no tokenAttributes, so the kubelet passes no service-account token"),
        "{out}"
    );

    let mut restore = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": saved["metadata"]["name"]}});
    restore["roleRef"] = saved["roleRef"].clone();
    restore["subjects"] = saved["subjects"].clone();
    let (status, _, text) = post(
        &c,
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        &restore,
    )
    .await;
    assert!(status.is_success(), "{status} {text}");
    std::fs::write(&kubelet_config, original).unwrap();
    cp.restart_kubelet();
    registry.shutdown().await;
}
