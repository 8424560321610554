//! Local HTTPS stand-ins for token endpoints that cannot be reached from here (Chainguard, Quay,
//! AWS, Google, Entra, ACR). Each speaks the documented wire format through a handler the test
//! gives; a script of faults (status, hang, garbage) can be queued in front of it. Every request
//! is recorded, so tests check what was sent.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::Certs;

/// One request as the stand-in saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

impl Seen {
    /// `application/x-www-form-urlencoded` or JSON body fields.
    pub fn field(&self, name: &str) -> Option<String> {
        if let Ok(serde_json::Value::Object(m)) = serde_json::from_str(&self.body) {
            return m.get(name).and_then(|v| v.as_str()).map(str::to_string);
        }
        form_urlencoded(&self.body).remove(name)
    }

    /// Every field of a form body (`application/x-www-form-urlencoded`).
    pub fn form(&self) -> BTreeMap<String, String> {
        form_urlencoded(&self.body)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn bearer(&self) -> Option<&str> {
        self.header("authorization")?.strip_prefix("Bearer ")
    }

    /// The user and password of a Basic Authorization header.
    pub fn basic(&self) -> Option<(String, String)> {
        let b64 = self.header("authorization")?.strip_prefix("Basic ")?;
        let raw =
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).ok()?).ok()?;
        let (u, p) = raw.split_once(':')?;
        Some((u.to_string(), p.to_string()))
    }
}

/// A queued fault, used for the next request instead of the handler.
#[derive(Clone, Debug)]
pub enum Fault {
    Status {
        status: u16,
        body: String,
        retry_after: Option<u64>,
    },
    /// Never answers (until the client gives up).
    Hang,
    /// `307 Temporary Redirect` to `location`.
    Redirect(String),
}

type Handler = dyn Fn(&Seen) -> (u16, String) + Send + Sync;

pub struct StandIn {
    pub url: String,
    pub certs: Certs,
    seen: Arc<Mutex<Vec<Seen>>>,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    /// Applied to every request while set (an outage), after the queued faults.
    persistent: Arc<Mutex<Option<Fault>>>,
    app: axum::Router,
    addr: std::net::SocketAddr,
    handle: Mutex<axum_server::Handle<std::net::SocketAddr>>,
}

impl StandIn {
    /// Serves `handler` over HTTPS on loopback with a fresh test CA (`certs.ca()`).
    pub async fn start(
        handler: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
    ) -> StandIn {
        Self::start_on("127.0.0.1", handler).await
    }

    /// As `start`, listening on `ip` (the host side of the node's link, for a plugin the
    /// kubelet runs in the node's network namespace).
    pub async fn start_on(
        ip: &str,
        handler: impl Fn(&Seen) -> (u16, String) + Send + Sync + 'static,
    ) -> StandIn {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let certs = if ip == "127.0.0.1" {
            Certs::new()
        } else {
            Certs::for_ips(&[ip])
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let faults = Arc::new(Mutex::new(VecDeque::new()));
        let persistent = Arc::new(Mutex::new(None));
        let handler: Arc<Handler> = Arc::new(handler);
        let shared = Shared {
            seen: seen.clone(),
            faults: faults.clone(),
            persistent: persistent.clone(),
            handler,
        };
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
                let shared = shared.clone();
                async move { serve(shared, method, uri, headers, body).await }
            },
        );
        let listener = std::net::TcpListener::bind((ip, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        let handle = serve_on(listener, &certs, app.clone());
        StandIn {
            url: format!("https://{addr}"),
            certs,
            seen,
            faults,
            persistent,
            app,
            addr,
            handle: Mutex::new(handle),
        }
    }

    /// Every request gets `fault` until [`recover`](Self::recover).
    pub fn outage(&self, fault: Fault) {
        *self.persistent.lock().unwrap() = Some(fault);
    }

    pub fn recover(&self) {
        *self.persistent.lock().unwrap() = None;
    }

    /// Stops listening: connections are refused.
    pub fn stop(&self) {
        self.handle.lock().unwrap().shutdown();
    }

    /// Listens again on the same address.
    pub async fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match std::net::TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        *self.handle.lock().unwrap() = serve_on(listener, &self.certs, self.app.clone());
    }

    /// `127.0.0.1:PORT`, for sources that build the URL from the registry host.
    pub fn host(&self) -> String {
        self.url.trim_start_matches("https://").to_string()
    }

    pub fn push_fault(&self, fault: Fault) {
        self.faults.lock().unwrap().push_back(fault);
    }

    pub fn fail(&self, status: u16, body: &str) {
        self.push_fault(Fault::Status {
            status,
            body: body.into(),
            retry_after: None,
        });
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        self.seen.lock().unwrap().clear();
        self.faults.lock().unwrap().clear();
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.handle.lock().unwrap().shutdown();
    }
}

fn serve_on(
    listener: std::net::TcpListener,
    certs: &Certs,
    app: axum::Router,
) -> axum_server::Handle<std::net::SocketAddr> {
    listener.set_nonblocking(true).unwrap();
    let cert = Arc::new(
        pull_secret_injector::tls::ReloadingCert::load(&certs.cert(), &certs.key()).unwrap(),
    );
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(
        pull_secret_injector::tls::server_config(cert).unwrap(),
    ));
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, tls)
        .unwrap()
        .handle(handle.clone());
    tokio::spawn(server.serve(app.into_make_service()));
    handle
}

#[derive(Clone)]
struct Shared {
    seen: Arc<Mutex<Vec<Seen>>>,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    persistent: Arc<Mutex<Option<Fault>>>,
    handler: Arc<Handler>,
}

async fn serve(
    shared: Shared,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Shared {
        seen,
        faults,
        persistent,
        handler,
    } = shared;
    let request = Seen {
        at: Instant::now(),
        method: method.to_string(),
        path: uri.path().to_string(),
        query: form_urlencoded(uri.query().unwrap_or("")),
        headers: headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect(),
        body: String::from_utf8_lossy(&body).to_string(),
    };
    seen.lock().unwrap().push(request.clone());
    let fault = faults
        .lock()
        .unwrap()
        .pop_front()
        .or_else(|| persistent.lock().unwrap().clone());
    match fault {
        Some(Fault::Redirect(location)) => {
            (StatusCode::TEMPORARY_REDIRECT, [("location", location)], "").into_response()
        }
        Some(Fault::Hang) => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Some(Fault::Status {
            status,
            body,
            retry_after,
        }) => {
            let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
            if let Some(s) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", s.to_string().parse().unwrap());
            }
            response
        }
        None => {
            let (status, body) = handler(&request);
            let content_type = if body.starts_with('<') {
                "text/xml"
            } else {
                "application/json"
            };
            (
                StatusCode::from_u16(status).unwrap(),
                [("content-type", content_type)],
                body,
            )
                .into_response()
        }
    }
}

fn form_urlencoded(s: &str) -> BTreeMap<String, String> {
    let decode = |v: &str| {
        let v = v.replace('+', " ");
        let bytes = v.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let Ok(b) = u8::from_str_radix(&v[i + 1..i + 3], 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).to_string()
    };
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// An unsigned JWT with the given claims: what a registry's STS hands back, as far as the
/// service can tell (it reads `exp`, never verifies).
pub fn jwt(claims: serde_json::Value) -> String {
    let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.{}",
        b(r#"{"alg":"RS256","typ":"JWT"}"#),
        b(&claims.to_string()),
        b("signature-of-the-stand-in")
    )
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The registries of "More registries" (`../shared/docs/token-sources.md`), each a handler that
/// answers what the documentation says for a request in the documented shape from `sa` (the
/// service-account token it must carry), and refuses anything else with 400. `issued` is the
/// credential handed out.
pub mod registries {
    use super::Seen;
    use serde_json::json;

    pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
    pub const ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";

    fn refuse(what: &str) -> (u16, String) {
        (
            400,
            json!({"error": "invalid_request", "error_description": what}).to_string(),
        )
    }

    /// JFrog Artifactory: a JSON token exchange at `/access/api/v1/oidc/token` for the OIDC
    /// integration `k8s-cluster`; the mapped user `k8s-puller`, 30 minutes.
    pub fn artifactory(s: &Seen, sa: &str, issued: &str) -> (u16, String) {
        let ok = s.method == "POST"
            && s.path == "/access/api/v1/oidc/token"
            && s.header("content-type") == Some("application/json")
            && s.field("grant_type").as_deref() == Some(TOKEN_EXCHANGE)
            && s.field("subject_token_type").as_deref() == Some(ID_TOKEN)
            && s.field("subject_token").as_deref() == Some(sa)
            && s.field("provider_name").as_deref() == Some("k8s-cluster");
        if !ok {
            return refuse("not an OIDC token exchange for k8s-cluster");
        }
        (200, json!({"access_token": issued, "expires_in": 1800, "scope": "applied-permissions/user",
                     "token_type": "Bearer", "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
                     "username": "k8s-puller"}).to_string())
    }

    /// Cloudsmith: `POST /openid/acme/` with the token and the service `puller-x1y2`; 201 and
    /// the token alone.
    pub fn cloudsmith(s: &Seen, sa: &str, issued: &str) -> (u16, String) {
        let ok = s.method == "POST"
            && s.path == "/openid/acme/"
            && s.header("content-type") == Some("application/json")
            && s.field("oidc_token").as_deref() == Some(sa)
            && s.field("service_slug").as_deref() == Some("puller-x1y2");
        if !ok {
            return refuse("not an OIDC login for acme/puller-x1y2");
        }
        (201, json!({"token": issued}).to_string())
    }

    pub const AK_PROVIDER: &str = "6f1c2a4e-1b7d-4c1e-9a55-0d2f4f9e8b31";

    /// Artifact Keeper: the token as Bearer of `POST /api/v1/auth/ci/token`, the provider's id
    /// in JSON; 15 minutes for the user `ci-k8s`.
    pub fn artifact_keeper(s: &Seen, sa: &str, issued: &str) -> (u16, String) {
        let ok = s.method == "POST"
            && s.path == "/api/v1/auth/ci/token"
            && s.bearer() == Some(sa)
            && s.field("provider_id").as_deref() == Some(AK_PROVIDER);
        if !ok {
            return refuse("not a CI token request");
        }
        (200, json!({"access_token": issued, "token_type": "Bearer", "expires_in": 900, "username": "ci-k8s"}).to_string())
    }

    pub const DOCKER_CONNECTION: &str = "0b6bb0a4-9c3f-4f0e-8d1e-2a7c5e9f3d10";

    /// Docker Hub: a form token exchange at `/oauth/token` for the connection, 600 s asked;
    /// the answer carries the access token alone.
    pub fn docker_hub(s: &Seen, sa: &str, issued: &str) -> (u16, String) {
        let ok = s.method == "POST"
            && s.path == "/oauth/token"
            && s.header("content-type") == Some("application/x-www-form-urlencoded")
            && s.field("grant_type").as_deref() == Some(TOKEN_EXCHANGE)
            && s.field("subject_token_type").as_deref() == Some(ID_TOKEN)
            && s.field("subject_token").as_deref() == Some(sa)
            && s.field("connection_id").as_deref() == Some(DOCKER_CONNECTION)
            && s.field("expires_in").as_deref() == Some("600");
        if !ok {
            return refuse("not a token exchange for the connection");
        }
        (200, json!({"access_token": issued}).to_string())
    }

    pub const ALI_ROLE: &str = "acs:ram::1234567890123456:role/acr-puller";
    pub const ALI_PROVIDER: &str = "acs:ram::1234567890123456:oidc-provider/ack-rrsa-cluster";
    pub const ALI_KEY_ID: &str = "STS.NUgYrLnoC37mZZCNnAbez2bZZ";
    pub const ALI_SECRET: &str = "sts-access-key-secret-9Q2bVqkqWxPz";
    pub const ALI_SECURITY_TOKEN: &str = "CAIS-sts-security-token-value-7hT3";

    /// Alibaba Cloud: STS `AssumeRoleWithOIDC` at `/sts/`, then the registry's
    /// `GetAuthorizationToken` at `/cr/`, whose signature `verify` must accept (it gets the
    /// parameters without `Signature` and the signature sent). The password lasts until `exp`.
    pub fn alibaba(
        s: &Seen,
        sa: &str,
        issued: &str,
        exp: i64,
        verify: &dyn Fn(&std::collections::BTreeMap<String, String>, &str) -> bool,
    ) -> (u16, String) {
        let form = s.form();
        let f = |k: &str| form.get(k).map(String::as_str);
        if s.method == "POST" && s.path == "/sts/" {
            let ok = f("Action") == Some("AssumeRoleWithOIDC")
                && f("Version") == Some("2015-04-01")
                && f("RoleArn") == Some(ALI_ROLE)
                && f("OIDCProviderArn") == Some(ALI_PROVIDER)
                && f("OIDCToken") == Some(sa)
                && f("RoleSessionName") == Some("pull-secret-injector-team-a")
                && f("DurationSeconds") == Some("900");
            if !ok {
                return (
                    400,
                    json!({"Code": "InvalidParameter", "Message": "bad AssumeRoleWithOIDC"})
                        .to_string(),
                );
            }
            return (
                200,
                json!({"RequestId": "3D57EAD2", "Credentials": {
                "AccessKeyId": ALI_KEY_ID, "AccessKeySecret": ALI_SECRET,
                "SecurityToken": ALI_SECURITY_TOKEN, "Expiration": "2030-01-01T00:00:00Z"}})
                .to_string(),
            );
        }
        if s.method == "POST" && s.path == "/cr/" {
            let mut params = form.clone();
            let signature = params.remove("Signature").unwrap_or_default();
            let ok = f("Action") == Some("GetAuthorizationToken")
                && f("Version") == Some("2018-12-01")
                && f("InstanceId") == Some("cri-k8stest123")
                && f("AccessKeyId") == Some(ALI_KEY_ID)
                && f("SecurityToken") == Some(ALI_SECURITY_TOKEN)
                && f("SignatureMethod") == Some("HMAC-SHA1")
                && verify(&params, &signature);
            if !ok {
                return (403, json!({"Code": "SignatureDoesNotMatch", "Message": "the signature does not match"}).to_string());
            }
            return (
                200,
                json!({"AuthorizationToken": issued, "TempUsername": "cr_temp_user",
                                "ExpireTime": exp * 1000, "IsSuccess": true, "Code": "success",
                                "RequestId": "0C1F1A28"})
                .to_string(),
            );
        }
        (404, "{}".into())
    }
}
