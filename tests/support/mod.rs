//! Test harness: one real control plane (etcd, kube-apiserver, kube-controller-manager) for the
//! whole test binary, started by `hack/control-plane` and stopped when the binary exits; and a
//! way to run pull-secret-injector against it, registered through a real
//! MutatingWebhookConfiguration that the API server calls over TLS.
#![allow(dead_code)]

pub mod attack;
pub mod install;
pub mod node;
pub mod proxy;
pub mod registry;
pub mod standin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use pull_secret_injector::config::Config;
use pull_secret_injector::settings::{Environment, Settings};
use pull_secret_injector::Service;
use serde_json::{json, Value};

pub struct ControlPlane {
    pub dir: PathBuf,
}

static CONTROL_PLANE: OnceLock<ControlPlane> = OnceLock::new();
static SERIAL: Mutex<()> = Mutex::new(());

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl ControlPlane {
    /// The control plane for this test binary, started on first use.
    pub fn get() -> &'static ControlPlane {
        Self::start(false, &[])
    }

    /// The control plane with a node beside it (kubelet, containerd, CNI in a network
    /// namespace of its own): for the tests where a real kubelet pulls images.
    pub fn with_node() -> &'static ControlPlane {
        Self::start(true, &[])
    }

    /// As `with_node`, the kubelet started with `kubelet_args` as well (a credential provider).
    /// The first caller's arguments win: the control plane is one per test binary.
    pub fn with_node_args(kubelet_args: &[String]) -> &'static ControlPlane {
        Self::start(true, kubelet_args)
    }

    fn start(node: bool, kubelet_args: &[String]) -> &'static ControlPlane {
        let cp = CONTROL_PLANE.get_or_init(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
            // PSI_TEST_LOG=pull_secret_injector=debug shows the service's log beside a test's.
            if let Ok(filter) = std::env::var("PSI_TEST_LOG") {
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(filter)
                    .with_test_writer()
                    .try_init();
            }
            let dir =
                std::env::temp_dir().join(format!("psi-control-plane-{}", std::process::id()));
            let mut cmd = Command::new(repo().join("hack/control-plane"));
            cmd.arg("up").arg(&dir);
            if node {
                cmd.arg("--node");
                for a in kubelet_args {
                    cmd.arg("--kubelet-arg").arg(a);
                }
            }
            let status = cmd
                .arg("--owner")
                .arg(std::process::id().to_string())
                .status()
                .expect("run hack/control-plane");
            assert!(status.success(), "hack/control-plane up failed");
            ControlPlane { dir }
        });
        assert!(
            !node || cp.dir.join("node.json").exists(),
            "this test binary started its control plane without a node"
        );
        cp
    }

    /// The API server's URL.
    pub fn server(&self) -> String {
        std::fs::read_to_string(self.dir.join("server"))
            .expect("server")
            .trim()
            .to_string()
    }

    /// The address this machine has for the node (the host side of its veth link), or
    /// 127.0.0.1 without a node: servers the node must reach listen here.
    pub fn host_ip(&self) -> String {
        std::fs::read_to_string(self.dir.join("host-ip"))
            .expect("host-ip")
            .trim()
            .to_string()
    }

    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(self.dir.join("kubeconfig")).expect("kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("client config");
        Client::try_from(config).expect("client")
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// Audit events (one JSON object each) that completed, filtered by `keep`.
    pub fn audit(&self, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|e| e["stage"] == "ResponseComplete")
            .filter(|e| keep(e))
            .collect()
    }

    /// TokenRequests the API server answered successfully for ServiceAccounts in `namespace`.
    pub fn token_requests(&self, namespace: &str) -> usize {
        self.audit(|e| {
            e["objectRef"]["subresource"] == "token"
                && e["objectRef"]["namespace"] == namespace
                && e["responseStatus"]["code"]
                    .as_i64()
                    .is_some_and(|c| c < 300)
        })
        .len()
    }

    /// TokenRequests attempted in `namespace`, whatever their outcome.
    pub fn token_attempts(&self, namespace: &str) -> usize {
        self.audit(|e| {
            e["objectRef"]["subresource"] == "token" && e["objectRef"]["namespace"] == namespace
        })
        .len()
    }

    /// Successful creates, updates, patches and deletes of the pull Secret in `namespace`.
    pub fn secret_writes(&self, namespace: &str) -> usize {
        self.audit(|e| {
            e["objectRef"]["resource"] == "secrets"
                && e["objectRef"]["namespace"] == namespace
                && e["objectRef"]["name"] == "pull-secret"
                && e["objectRef"]["subresource"].is_null()
                && e["responseStatus"]["code"]
                    .as_i64()
                    .is_some_and(|c| c < 300)
        })
        .len()
    }

    /// GETs of Secret `namespace/name` by `user`, whatever their outcome. Logged for
    /// [`AUDITED_USER`] only (the audit policy in hack/control-plane logs every request of
    /// that identity, and no other reads).
    pub fn secret_gets(&self, namespace: &str, name: &str, user: &str) -> usize {
        self.audit(|e| {
            e["verb"] == "get"
                && e["user"]["username"] == user
                && e["objectRef"]["resource"] == "secrets"
                && e["objectRef"]["namespace"] == namespace
                && e["objectRef"]["name"] == name
                && e["objectRef"]["subresource"].is_null()
        })
        .len()
    }

    /// Successful TokenRequests for ServiceAccount `namespace/service_account`.
    pub fn token_requests_for(&self, namespace: &str, service_account: &str) -> usize {
        self.audit(|e| is_token_request(e, namespace, service_account))
            .len()
    }

    /// The successful writes (`verbs`) of Secret `namespace/secret` counted between consecutive
    /// successful TokenRequests for ServiceAccount `namespace/service_account`, in the order
    /// the API server completed them: element 0 counts the writes before the first
    /// TokenRequest, element i those after the i-th. A Secret written once per credential
    /// minted reads `[0, 1, 1, ..., 1]` (the last may still be 0: minted, not yet written).
    pub fn writes_per_mint(
        &self,
        namespace: &str,
        secret: &str,
        service_account: &str,
        verbs: &[&str],
    ) -> Vec<usize> {
        let mut events: Vec<(jiff::Timestamp, bool)> = self
            .audit(|e| {
                is_token_request(e, namespace, service_account)
                    || (e["objectRef"]["resource"] == "secrets"
                        && e["objectRef"]["namespace"] == namespace
                        && e["objectRef"]["name"] == secret
                        && e["objectRef"]["subresource"].is_null()
                        && verbs.iter().any(|v| e["verb"] == *v)
                        && succeeded(e))
            })
            .iter()
            .map(|e| {
                let at = e["stageTimestamp"]
                    .as_str()
                    .and_then(|t| t.parse().ok())
                    .expect("audit events carry stageTimestamp");
                (at, e["objectRef"]["subresource"] == "token")
            })
            .collect();
        events.sort_by_key(|(at, _)| *at);
        let mut counts = vec![0];
        for (_, is_mint) in events {
            if is_mint {
                counts.push(0);
            } else if let Some(last) = counts.last_mut() {
                *last += 1;
            }
        }
        counts
    }

    pub fn restart_apiserver(&self, pause_seconds: u32) {
        let status = Command::new(repo().join("hack/control-plane"))
            .args(["restart-apiserver"])
            .arg(&self.dir)
            .arg(pause_seconds.to_string())
            .status()
            .expect("restart apiserver");
        assert!(status.success());
    }

    /// Stops the node's kubelet and starts it again with the same flags (it rereads its
    /// credential provider config only at start); returns once the node is Ready again.
    pub fn restart_kubelet(&self) {
        let status = Command::new(repo().join("hack/control-plane"))
            .args(["restart-kubelet"])
            .arg(&self.dir)
            .status()
            .expect("restart kubelet");
        assert!(status.success());
    }
}

fn succeeded(e: &Value) -> bool {
    e["responseStatus"]["code"]
        .as_i64()
        .is_some_and(|c| c < 300)
}

fn is_token_request(e: &Value, namespace: &str, service_account: &str) -> bool {
    e["objectRef"]["subresource"] == "token"
        && e["objectRef"]["namespace"] == namespace
        && e["objectRef"]["name"] == service_account
        && succeeded(e)
}

/// Everything the service asks is in the audit log when it runs as this identity (see the
/// audit policy in hack/control-plane).
pub const AUDITED_NS: &str = "psi-audited";
pub const AUDITED_USER: &str = "system:serviceaccount:psi-audited:injector";

/// The service's client (`api_client`, default limits) acting as [`AUDITED_USER`], bound to
/// cluster-admin: what the service is then seen asking is what it asks, not what RBAC lets it.
pub async fn audited_client() -> Client {
    // The service's own client, as `serve` makes it: rate limited, 429s waited out.
    pull_secret_injector::api_client::client(audited_config().await, &Default::default()).unwrap()
}

/// The client configuration of [`audited_client`] (to build a client with a layer added).
pub async fn audited_config() -> kube::Config {
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    let cp = ControlPlane::get();
    let admin = cp.client().await;
    if Api::<Namespace>::all(admin.clone())
        .get_opt(AUDITED_NS)
        .await
        .unwrap()
        .is_none()
    {
        create_namespace(&admin, AUDITED_NS, Default::default()).await;
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "injector"}})).unwrap();
        Api::<ServiceAccount>::namespaced(admin.clone(), AUDITED_NS)
            .create(&PostParams::default(), &sa)
            .await
            .unwrap();
        let binding: ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "psi-audited-injector"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"kind": "ServiceAccount", "name": "injector", "namespace": AUDITED_NS}]
        }))
        .unwrap();
        let _ = Api::<ClusterRoleBinding>::all(admin.clone())
            .create(&PostParams::default(), &binding)
            .await;
    }
    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 3600}}))
            .unwrap();
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), AUDITED_NS)
        .create_token_request("injector", &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let mut config = kube::Config::new(cp.server().parse().unwrap());
    config.accept_invalid_certs = true;
    config.auth_info.token = Some(token.into());
    config
}

/// Tests that run the service take turns: two instances with different selectors would each
/// clean up the other's namespaces, as two differently configured installations would.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A CA and a serving certificate for 127.0.0.1 (and more addresses with `for_ips`), written
/// to a temporary directory.
pub struct Certs {
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
}

impl Certs {
    pub fn new() -> Self {
        Self::for_ips(&[])
    }

    pub fn for_ips(extra: &[&str]) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "pull-secret-injector test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        for ip in extra {
            params
                .subject_alt_names
                .push(SanType::IpAddress(ip.parse().expect("an IP address")));
        }
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "127.0.0.1");
        let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca.pem()).unwrap();
        Certs {
            dir,
            ca_pem: ca.pem(),
        }
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("tls.crt")
    }
    pub fn key(&self) -> PathBuf {
        self.dir.path().join("tls.key")
    }
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }
}

pub const AUDIENCE: &str = "https://registry.example.com";
pub const HOST: &str = "registry.example.com";

/// A running pull-secret-injector, its webhook registered with the API server. Namespaces are
/// opted in with the real opt-in label plus `e2e-run: <id>`, so that each test sees only its own.
pub struct Injector {
    pub id: String,
    pub service: Option<Service>,
    pub certs: Certs,
    pub client: Client,
    pub config_yaml: String,
    namespaces: Vec<String>,
    webhooks: Vec<String>,
}

/// Config for a test instance: `extra` is appended at top level and may override nothing
/// that is set here except through `registry`.
pub fn config_yaml(id: &str, certs: &Certs, registry: &str, extra: &str) -> String {
    format!(
        r#"listen: 127.0.0.1:0
tls: {{certFile: {cert}, keyFile: {key}}}
namespaceSelector:
  matchLabels: {{pull-secret-injector.io/inject: enabled, e2e-run: {id}}}
secretName: pull-secret
ownNamespace: {id}-own
registries:
{registry}
{extra}"#,
        cert = certs.cert().display(),
        key = certs.key().display(),
    )
}

pub fn kubernetes_registry(service_account: &str, expiration: u32) -> String {
    format!(
        "  - host: {HOST}\n    kubernetes: {{serviceAccount: {service_account}, audience: \"{AUDIENCE}\", expirationSeconds: {expiration}, username: oauth2accesstoken}}\n"
    )
}

impl Injector {
    pub async fn start(id: &str) -> Self {
        Self::start_with(id, &kubernetes_registry("default", 3600), "").await
    }

    pub async fn start_with(id: &str, registry: &str, extra: &str) -> Self {
        Self::start_for(id, registry, extra, &["pods", "serviceaccounts"]).await
    }

    /// As `start_with`, with the webhook registered for `resources` only, from the start: no
    /// admission of another kind reaches this instance.
    pub async fn start_for(id: &str, registry: &str, extra: &str, resources: &[&str]) -> Self {
        let mut me = Self::start_without_webhook(id, registry, extra).await;
        let selector =
            json!({"matchLabels": {"pull-secret-injector.io/inject": "enabled", "e2e-run": id}});
        me.register_webhook_for(&format!("psi-{id}"), selector, resources)
            .await;
        me.wait_webhook_active().await;
        me
    }

    /// As `start_with`, with no webhook registered: in policy mode (or to show what happens
    /// while nothing patches Pods) the service only refreshes.
    pub async fn start_without_webhook(id: &str, registry: &str, extra: &str) -> Self {
        let cp = ControlPlane::get();
        let client = cp.client().await;
        let certs = Certs::new();
        let config_yaml = config_yaml(id, &certs, registry, extra);
        let mut me = Injector {
            id: id.into(),
            service: None,
            certs,
            client,
            config_yaml,
            namespaces: vec![],
            webhooks: vec![],
        };
        me.run().await;
        me
    }

    /// The service run as [`AUDITED_USER`], so that the audit log shows every request it
    /// makes; its webhook registered or not. `client` stays the admin's.
    pub async fn start_audited(id: &str, registry: &str, extra: &str, webhook: bool) -> Self {
        let cp = ControlPlane::get();
        let admin = cp.client().await;
        let certs = Certs::new();
        let config_yaml = config_yaml(id, &certs, registry, extra);
        let config = Config::from_yaml(&config_yaml).expect("test config is valid");
        let service = Service::start(settings(config), audited_client().await)
            .await
            .expect("service starts");
        wait_for("ready", Duration::from_secs(30), || async {
            service.is_ready()
        })
        .await;
        if webhook {
            return Self::attach(id, service, certs, admin, config_yaml).await;
        }
        Injector {
            id: id.into(),
            service: Some(service),
            certs,
            client: admin,
            config_yaml,
            namespaces: vec![],
            webhooks: vec![],
        }
    }

    /// The service's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let addr = self.service.as_ref().expect("running").local_addr;
        let (status, body) = get(&self.certs, &format!("https://{addr}/metrics")).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Wraps a service started by the test itself (with its own client), registering its webhook.
    pub async fn attach(
        id: &str,
        service: Service,
        certs: Certs,
        admin: Client,
        config_yaml: String,
    ) -> Self {
        let mut me = Injector {
            id: id.into(),
            service: Some(service),
            certs,
            client: admin,
            config_yaml,
            namespaces: vec![],
            webhooks: vec![],
        };
        let selector =
            json!({"matchLabels": {"pull-secret-injector.io/inject": "enabled", "e2e-run": id}});
        me.register_webhook(&format!("psi-{id}"), selector).await;
        me.wait_webhook_active().await;
        me
    }

    /// Starts (or restarts) the service in this process.
    pub async fn run(&mut self) {
        let config = Config::from_yaml(&self.config_yaml).expect("test config is valid");
        let service = Service::start(settings(config), self.client.clone())
            .await
            .expect("service starts");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !service.is_ready() {
            assert!(Instant::now() < deadline, "service did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.service = Some(service);
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.service.take() {
            s.shutdown().await;
        }
    }

    pub fn url(&self) -> String {
        format!(
            "https://{}/mutate",
            self.service.as_ref().expect("running").local_addr
        )
    }

    /// Registers a MutatingWebhookConfiguration pointing at this instance.
    pub async fn register_webhook(&mut self, name: &str, namespace_selector: Value) {
        self.register_webhook_for(name, namespace_selector, &["pods", "serviceaccounts"])
            .await
    }

    /// Registers (or replaces) a MutatingWebhookConfiguration for `resources` only.
    pub async fn register_webhook_for(
        &mut self,
        name: &str,
        namespace_selector: Value,
        resources: &[&str],
    ) {
        // The shipped conditions name the Secret `pull-secret` of the namespace scope; with
        // identityScope serviceAccount the API server calls for every object, as before.
        let conditions = (!self.config_yaml.contains("identityScope: serviceAccount"))
            .then(shipped_match_conditions);
        register_webhook_with(
            &self.client,
            name,
            "inject.pull-secret-injector.io",
            &self.url(),
            &self.certs.ca_pem,
            namespace_selector,
            resources,
            conditions,
        )
        .await;
        self.webhooks.push(name.into());
    }

    /// The API server picks up a new webhook configuration asynchronously: wait until a dry-run
    /// Pod in an opted-in probe namespace comes back patched.
    async fn wait_webhook_active(&mut self) {
        let ns = self.namespace("probe", true).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let pod = create_pod(
                &self.client,
                &ns,
                "probe",
                json!({"imagePullSecrets": [{"name": "x"}]}),
                true,
            )
            .await
            .pod;
            // `pull-secret`, or `<sa>-pull-secret` with identityScope serviceAccount.
            if pull_secret_names(&pod)
                .iter()
                .any(|n| n.ends_with("pull-secret"))
            {
                return;
            }
            assert!(Instant::now() < deadline, "webhook never became active");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Creates namespace `<id>-<suffix>`, opted in or not; deleted when the test ends.
    pub async fn namespace(&mut self, suffix: &str, opted_in: bool) -> String {
        let name = format!("{}-{suffix}", self.id);
        let mut labels = BTreeMap::from([("e2e-run".to_string(), self.id.clone())]);
        if opted_in {
            labels.insert("pull-secret-injector.io/inject".into(), "enabled".into());
        }
        create_namespace(&self.client, &name, labels).await;
        self.namespaces.push(name.clone());
        name
    }

    pub async fn set_opt_in(&self, ns: &str, on: bool) {
        let value = if on { json!("enabled") } else { Value::Null };
        let api: Api<Namespace> = Api::all(self.client.clone());
        api.patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"labels": {"pull-secret-injector.io/inject": value}}}),
            ),
        )
        .await
        .expect("label namespace");
    }

    /// The table `pull-secret-injector status` prints for this instance's config.
    pub fn status_table(&self) -> String {
        let config_file = self.certs.dir.path().join("config.yaml");
        std::fs::write(&config_file, &self.config_yaml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_pull-secret-injector"))
            .args(["status", "--config", path_str(&config_file)])
            .env("KUBECONFIG", ControlPlane::get().kubeconfig())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Stops the service, removes the webhook configurations and deletes the namespaces.
    pub async fn cleanup(mut self) {
        self.stop().await;
        let hooks: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        for w in &self.webhooks {
            let _ = hooks.delete(w, &DeleteParams::default()).await;
        }
        let nss: Api<Namespace> = Api::all(self.client.clone());
        for ns in &self.namespaces {
            let _ = nss.delete(ns, &DeleteParams::default()).await;
        }
    }
}

/// Registers (or replaces) a MutatingWebhookConfiguration calling `url`, trusting `ca_pem`.
pub async fn register_webhook(
    client: &Client,
    name: &str,
    url: &str,
    ca_pem: &str,
    namespace_selector: Value,
    resources: &[&str],
) {
    register_webhook_named(
        client,
        name,
        "inject.pull-secret-injector.io",
        url,
        ca_pem,
        namespace_selector,
        resources,
    )
    .await
}

/// As `register_webhook`, with the webhook itself named `webhook_name` (the name the API
/// server's admission metrics carry).
pub async fn register_webhook_named(
    client: &Client,
    name: &str,
    webhook_name: &str,
    url: &str,
    ca_pem: &str,
    namespace_selector: Value,
    resources: &[&str],
) {
    register_webhook_with(
        client,
        name,
        webhook_name,
        url,
        ca_pem,
        namespace_selector,
        resources,
        None,
    )
    .await
}

/// The `matchConditions` of the shipped webhook configuration (`deploy/kustomize/base`).
pub fn shipped_match_conditions() -> Value {
    let path = repo().join("deploy/kustomize/base/mutatingwebhookconfiguration.yaml");
    let doc: Value = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let conditions = doc["webhooks"][0]["matchConditions"].clone();
    assert!(
        conditions.is_array(),
        "the shipped webhook has matchConditions"
    );
    conditions
}

#[allow(clippy::too_many_arguments)]
pub async fn register_webhook_with(
    client: &Client,
    name: &str,
    webhook_name: &str,
    url: &str,
    ca_pem: &str,
    namespace_selector: Value,
    resources: &[&str],
    match_conditions: Option<Value>,
) {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let webhook: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": webhook_name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "NoneOnDryRun",
            "failurePolicy": "Ignore",
            "reinvocationPolicy": "IfNeeded",
            "timeoutSeconds": 10,
            "namespaceSelector": namespace_selector,
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": resources}],
            "clientConfig": {"url": url, "caBundle": ca},
            "matchConditions": match_conditions.unwrap_or_else(|| json!([])),
        }]
    }))
    .unwrap();
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::default()).await;
    api.create(&PostParams::default(), &webhook)
        .await
        .expect("register webhook");
}

/// The shipped MutatingAdmissionPolicies and their bindings: the kustomize policy overlay's
/// file, or with `helm_values` the chart rendered with them (`config.admission.mode: policy`).
pub fn shipped_admission_policies(helm_values: Option<&str>) -> Vec<Value> {
    let text = match helm_values {
        None => std::fs::read_to_string(
            repo().join("deploy/kustomize/policy/mutatingadmissionpolicy.yaml"),
        )
        .unwrap(),
        Some(values) => {
            let out = Command::new(repo().join("hack/helm-render"))
                .arg(repo().join("deploy/helm/pull-secret-injector"))
                .arg("pull-secret-injector")
                .arg(values)
                .output()
                .expect("run hack/helm-render");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    };
    let objects: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| <Value as serde::Deserialize>::deserialize(doc).unwrap())
        .filter(|v| {
            v["kind"]
                .as_str()
                .is_some_and(|k| k.starts_with("MutatingAdmissionPolicy"))
        })
        .collect();
    assert_eq!(objects.len(), 4, "two policies, two bindings");
    objects
}

/// Server-side applies cluster-scoped objects of kinds this crate has no types for.
pub async fn apply_untyped(client: &Client, objects: &[Value]) {
    use kube::api::DynamicObject;
    use kube::core::GroupVersionKind;
    for object in objects {
        let (group, version) = object["apiVersion"]
            .as_str()
            .unwrap()
            .split_once('/')
            .unwrap();
        let gvk = GroupVersionKind::gvk(group, version, object["kind"].as_str().unwrap());
        let (resource, _) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("{gvk:?} not served: {e}"));
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        api.patch(
            object["metadata"]["name"].as_str().unwrap(),
            &PatchParams::apply("pull-secret-injector-tests").force(),
            &Patch::Apply(object),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {}: {e}", object["metadata"]["name"]));
    }
}

/// Deletes the objects `apply_untyped` made.
pub async fn delete_untyped(client: &Client, objects: &[Value]) {
    use kube::api::DynamicObject;
    use kube::core::GroupVersionKind;
    for object in objects {
        let (group, version) = object["apiVersion"]
            .as_str()
            .unwrap()
            .split_once('/')
            .unwrap();
        let gvk = GroupVersionKind::gvk(group, version, object["kind"].as_str().unwrap());
        if let Ok((resource, _)) = kube::discovery::pinned_kind(client, &gvk).await {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
            let _ = api
                .delete(
                    object["metadata"]["name"].as_str().unwrap(),
                    &DeleteParams::default(),
                )
                .await;
        }
    }
}

pub async fn create_namespace(client: &Client, name: &str, labels: BTreeMap<String, String>) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap();
    api.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    // The ServiceAccount controller creates `default` shortly after; pods need it. Behind a
    // backlog (the benchmark makes 10,000 namespaces at once and the controller makes about 15
    // ServiceAccounts a second) that can take minutes: then it is made here, as the controller
    // would (an AlreadyExists means the controller came first).
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), name);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = accounts.get_opt("default").await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
    match accounts.create(&PostParams::default(), &sa).await {
        Ok(_) => eprintln!("ServiceAccount {name}/default made by the test (controller behind)"),
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create ServiceAccount {name}/default: {e}"),
    }
}

pub struct Created {
    pub pod: Pod,
    /// The `Warning` headers of the create response: what `kubectl` prints as warnings.
    pub warnings: Vec<String>,
}

/// Creates a Pod with `spec` merged into a minimal one, through a raw request so that the
/// response's warnings can be read.
pub async fn create_pod(
    client: &Client,
    ns: &str,
    name: &str,
    spec: Value,
    dry_run: bool,
) -> Created {
    let mut full_spec =
        json!({"containers": [{"name": "app", "image": format!("{HOST}/team/app:1")}]});
    if let (Some(target), Some(extra)) = (full_spec.as_object_mut(), spec.as_object()) {
        target.extend(extra.clone());
    }
    let body =
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": full_spec});
    let query = if dry_run { "?dryRun=All" } else { "" };
    let (status, warnings, text) = post(
        client,
        &format!("/api/v1/namespaces/{ns}/pods{query}"),
        &body,
    )
    .await;
    assert!(
        status.is_success(),
        "creating pod {ns}/{name}: {status} {text}"
    );
    Created {
        pod: serde_json::from_str(&text).expect("pod"),
        warnings,
    }
}

pub async fn post(
    client: &Client,
    path: &str,
    body: &Value,
) -> (http::StatusCode, Vec<String>, String) {
    let request = http::Request::post(path)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap())
        .unwrap();
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .expect("request sent");
    let status = response.status();
    let warnings = response
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap_or_default().to_string())
        .collect();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    (
        status,
        warnings,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

pub fn pull_secret_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.image_pull_secrets.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .collect()
}

pub fn names(refs: Option<Vec<impl Into<Value>>>) -> Vec<String> {
    refs.unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.into()["name"].as_str().map(String::from))
        .collect()
}

pub async fn get_secret(client: &Client, ns: &str) -> Option<Secret> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt("pull-secret")
        .await
        .expect("read secret")
}

pub async fn wait_secret(
    client: &Client,
    ns: &str,
    what: &str,
    ok: impl Fn(&Secret) -> bool,
) -> Secret {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = get_secret(client, ns).await {
            if ok(&s) {
                return s;
            }
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for Secret {ns}/pull-secret: {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `.dockerconfigjson` of a Secret, parsed.
pub fn docker_config(secret: &Secret) -> Value {
    let data = secret.data.as_ref().expect("data");
    serde_json::from_slice(&data[".dockerconfigjson"].0).expect("dockerconfigjson is JSON")
}

/// The password stored for the test registry.
pub fn password(secret: &Secret) -> String {
    docker_config(secret)["auths"][HOST]["password"]
        .as_str()
        .expect("password")
        .to_string()
}

/// The claims of a JWT, without verifying it (the API server's TokenReview verifies).
pub fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("claims are JSON")
}

pub fn annotation(secret: &Secret, key: &str) -> String {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .cloned()
        .unwrap_or_default()
}

/// The settings a test service runs with: the config alone, no downward-API environment.
pub fn settings(config: Config) -> Settings {
    Settings::new(config, &Environment::default()).expect("settings")
}

/// An HTTPS client that trusts the test CA, as the API server does.
pub fn https_client(certs: &Certs) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.ca()).expect("read the CA"))
        .expect("the CA is PEM");
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTPS client")
}

/// GETs `url` from the service; returns (status code, body), or 0 when nothing answered.
pub async fn get(certs: &Certs, url: &str) -> (u16, String) {
    answer(https_client(certs).get(url)).await
}

/// POSTs `body` to the service as JSON; returns (status code, body).
pub async fn post_json(certs: &Certs, url: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
    let request = https_client(certs)
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    answer(request).await
}

async fn answer(request: reqwest::RequestBuilder) -> (u16, String) {
    match request.send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => {
            eprintln!("request failed: {e}");
            (0, String::new())
        }
    }
}

/// Runs `curl` against the service with its CA; returns (status code, body). Only for what
/// reqwest cannot do: offer TLS below 1.2 (rustls has none).
pub fn curl(certs: &Certs, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(certs.ca())
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        eprintln!("curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// A `/proc/<pid>/status` figure (`VmRSS:`, `VmHWM:`), in KiB; NaN if it cannot be read.
pub fn proc_status(pid: u32, field: &str) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Resets a process's peak resident memory (VmHWM) to its current size.
pub fn reset_peak(pid: u32) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
}
