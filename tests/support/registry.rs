//! A private registry as a cluster would have one: Debian's `docker-registry` (distribution
//! 2.8) with token auth against `pull-secret-injector token-server`, which trusts this
//! cluster's service-account tokens. Images go in with Debian's `skopeo`.

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
use serde_json::json;

use super::{create_namespace, wait_for, Certs, ControlPlane};

/// The `service` both the registry and the token server name.
pub const SERVICE: &str = "registry.test";

/// The registry and skopeo come from Debian packages (`hack/test` installs them). Outside CI a
/// machine without them skips the test loudly; in CI their absence is a failure.
pub fn tools_present() -> bool {
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
        eprintln!(
            "SKIPPED: docker-registry or skopeo is not installed \
             (apt-get install docker-registry skopeo)"
        );
    }
    present
}

pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct PrivateRegistry {
    /// `ip:port`, as image references and the pull Secret's `auths` name it.
    pub host: String,
    pub log: PathBuf,
    pub certs: Certs,
    /// A directory with the CA as `ca.crt`, for skopeo's `--cert-dir`.
    pub cert_dir: PathBuf,
    /// Seconds added to the token server's clock (tokens can be made to look expired).
    pub clock_offset: Arc<AtomicI64>,
    /// The token server's endpoint, `https://ip:port/token`.
    pub realm: String,
    token_server: Option<TokenServer>,
    child: Child,
    dir: PathBuf,
}

impl Drop for PrivateRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PrivateRegistry {
    /// Starts the token server (its `rules` as given, YAML list items) and the registry, both
    /// on `ip`, with their state in `dir`. `infra` is a namespace for the token server's own
    /// ServiceAccount, whose token reads the API server's keys.
    pub async fn start(
        cp: &ControlPlane,
        client: &kube::Client,
        dir: &Path,
        ip: &str,
        infra: &str,
        rules: &str,
    ) -> Self {
        Self::start_at(cp, client, dir, ip, free_port(ip), infra, rules).await
    }

    /// As `start`, the registry on `port` (chosen before the kubelet started, whose
    /// credential provider config names it).
    pub async fn start_at(
        cp: &ControlPlane,
        client: &kube::Client,
        dir: &Path,
        ip: &str,
        port: u16,
        infra: &str,
        rules: &str,
    ) -> Self {
        let certs = Certs::for_ips(&[ip]);
        let cert_dir = dir.join("certs.d");
        std::fs::create_dir_all(&cert_dir).unwrap();
        std::fs::copy(certs.ca(), cert_dir.join("ca.crt")).unwrap();
        let ts = TestTokenServer::start(cp, client, dir, ip, &certs, infra, rules, "").await;
        let (signing_crt, realm, clock_offset) = (ts.signing_crt, ts.realm, ts.clock_offset);
        let token_server = ts.server;

        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog: {{level: info}}\n\
                 storage: {{filesystem: {{rootdirectory: {storage}}}}}\n\
                 http: {{addr: \"{ip}:{port}\", tls: {{certificate: {cert}, key: {key}}}}}\n\
                 auth: {{token: {{realm: \"{realm}\", service: {SERVICE}, \
                 issuer: pull-secret-injector, rootcertbundle: {signing}}}}}\n",
                storage = dir.join("storage").display(),
                cert = certs.cert().display(),
                key = certs.key().display(),
                signing = signing_crt.display(),
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
        let addr = format!("{ip}:{port}");
        wait_for(
            "the registry listening",
            Duration::from_secs(30),
            || async { std::net::TcpStream::connect(&addr).is_ok() },
        )
        .await;
        PrivateRegistry {
            host: addr,
            log,
            certs,
            cert_dir,
            clock_offset,
            realm,
            token_server: Some(token_server),
            child,
            dir: dir.to_path_buf(),
        }
    }

    /// Runs skopeo with the test CA trusted (for the registry and the token realm alike).
    pub fn skopeo(&self, args: &[&str]) -> Output {
        let policy = self.dir.join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default": [{"type": "insecureAcceptAnything"}]}"#,
        )
        .unwrap();
        let out = Command::new("skopeo")
            .arg("--policy")
            .arg(&policy)
            .args(args)
            .env("HOME", &self.dir)
            .output()
            .expect("run skopeo");
        let shown: Vec<&str> = args.iter().filter(|a| a.len() < 80).cloned().collect();
        eprintln!(
            "skopeo {}: {}\n{}",
            shown.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Pushes `source` (a skopeo transport reference) to `repository:tag` as `user:password`.
    pub fn push(&self, source: &str, repository: &str, creds: &str) {
        let out = self.skopeo(&[
            "copy",
            "--dest-cert-dir",
            self.cert_dir.to_str().unwrap(),
            "--dest-creds",
            creds,
            source,
            &format!("docker://{}/{repository}", self.host),
        ]);
        assert!(
            out.status.success(),
            "push failed; registry log:\n{}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    pub async fn shutdown(mut self) {
        if let Some(ts) = self.token_server.take() {
            ts.shutdown().await;
        }
    }
}

/// `pull-secret-injector token-server` as a test runs it, beside the registry or alone.
pub struct TestTokenServer {
    pub server: TokenServer,
    pub addr: std::net::SocketAddr,
    /// `https://ip:port/token`.
    pub realm: String,
    /// The certificate its tokens are signed with, which the registry trusts.
    pub signing_crt: PathBuf,
    /// Seconds added to its clock (tokens can be made to look expired).
    pub clock_offset: Arc<AtomicI64>,
}

impl TestTokenServer {
    /// Starts the token server on `ip` with `certs` and its state in `dir`, trusting this
    /// control plane's tokens; `rules` are YAML list items, `extra` more top-level config.
    /// `infra` is a namespace for its own ServiceAccount, whose token reads the API server's
    /// keys and confirms tokens (TokenReview).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        cp: &ControlPlane,
        client: &kube::Client,
        dir: &Path,
        ip: &str,
        certs: &Certs,
        infra: &str,
        rules: &str,
        extra: &str,
    ) -> Self {
        // The token server's signing certificate, which the registry trusts.
        let signing_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "pull-secret-injector token signing",
        );
        let signing_cert = params.self_signed(&signing_key).unwrap();
        let (signing_crt, signing_pem) = (dir.join("signing.crt"), dir.join("signing.key"));
        std::fs::write(&signing_crt, signing_cert.pem()).unwrap();
        std::fs::write(&signing_pem, signing_key.serialize_pem()).unwrap();

        // The token server fetches the keys from the API server with a token of its own
        // ServiceAccount (discovery is for authenticated clients on this API server).
        create_namespace(client, infra, Default::default()).await;
        let discovery_token = service_account_token(client, infra, "token-server", vec![]).await;
        // And confirms the tokens it is shown (TokenReview), as the shipped install lets it.
        let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_json::from_value(json!({
            "metadata": {"name": format!("{infra}-token-review")},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:auth-delegator"},
            "subjects": [{"kind": "ServiceAccount", "name": "token-server", "namespace": infra}]
        }))
        .unwrap();
        let bindings: Api<k8s_openapi::api::rbac::v1::ClusterRoleBinding> =
            Api::all(client.clone());
        let _ = bindings
            .delete(&format!("{infra}-token-review"), &Default::default())
            .await;
        bindings
            .create(&PostParams::default(), &binding)
            .await
            .unwrap();
        let discovery_file = dir.join("discovery-token");
        std::fs::write(&discovery_file, discovery_token).unwrap();
        let ts_port = free_port(ip);
        let config = TokenServerConfig::from_yaml(&format!(
            r#"
listen: {ip}:{ts_port}
tls: {{certFile: {cert}, keyFile: {key}}}
issuer:
  url: https://kubernetes.default.svc.cluster.local
  jwksUri: {server}/openid/v1/jwks
  caFile: {apiserver_ca}
  tokenFile: {discovery}
  audiences: [{SERVICE}]
service: {SERVICE}
signing: {{certFile: {signing_crt}, keyFile: {signing_key}}}
tokenReview: {{url: "{server}", cacheFor: 1s}}
{extra}
rules:
{rules}"#,
            server = cp.server(),
            cert = certs.cert().display(),
            key = certs.key().display(),
            apiserver_ca = cp.dir.join("pki/apiserver.crt").display(),
            discovery = discovery_file.display(),
            signing_crt = signing_crt.display(),
            signing_key = signing_pem.display(),
        ))
        .unwrap();
        let clock_offset = Arc::new(AtomicI64::new(0));
        let o = clock_offset.clone();
        let clock: Clock = Arc::new(move || {
            jiff::Timestamp::now() + jiff::SignedDuration::from_secs(o.load(Ordering::SeqCst))
        });
        let server = TokenServer::start(config, clock, &Default::default())
            .await
            .expect("token server starts");
        TestTokenServer {
            realm: format!("https://{ip}:{ts_port}/token"),
            addr: server.local_addr,
            server,
            signing_crt,
            clock_offset,
        }
    }
}

/// A token of ServiceAccount `ns/sa` (created if missing) for `audiences`, valid one hour.
pub async fn service_account_token(
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
