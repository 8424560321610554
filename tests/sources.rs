//! Every exchanging token source against a local HTTPS stand-in of its endpoint, speaking the
//! documented wire format (`docs/token-sources.md`): what is sent, the credential and expiry
//! read back, and each error class (4xx with a body, 5xx, timeout, malformed JSON, 429), with a
//! trace-level log capture that must never contain a token.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use jiff::Timestamp;
use pull_secret_injector::config::Config;
use pull_secret_injector::core::credential::Credential;
use pull_secret_injector::http::{HttpClient, ProxyEnv};
use pull_secret_injector::sources::{sigv4, MintContext, MintError};
use serde_json::json;
use support::standin::{jwt, now, registries, Fault, Seen, StandIn};

/// The service-account token the sources exchange (read from a file, so no API server is
/// needed here; tests/webhook.rs runs a source with a TokenRequest token end to end).
fn sa_token(exp: i64) -> String {
    jwt(
        json!({"iss": "https://kubernetes.default.svc.cluster.local", "sub": "system:serviceaccount:team-a:default", "exp": exp, "sa-marker": "sa-token-secret"}),
    )
}

/// Everything printed at trace level while the test runs.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

struct Case {
    standin: StandIn,
    /// The registry entry's host.
    host: String,
    /// The source's YAML, `{endpoint}` replaced by the stand-in's URL.
    source: String,
    _token_file: tempfile::NamedTempFile,
    sa_token: String,
    logs: Logs,
    _guard: tracing::subscriber::DefaultGuard,
}

impl Case {
    async fn new(
        source: &str,
        handler: impl Fn(&Seen, &str) -> (u16, String) + Send + Sync + 'static,
    ) -> Case {
        Self::with_sa_exp(source, now() + 3600, handler).await
    }

    async fn with_sa_exp(
        source: &str,
        sa_exp: i64,
        handler: impl Fn(&Seen, &str) -> (u16, String) + Send + Sync + 'static,
    ) -> Case {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let guard = tracing::subscriber::set_default(subscriber);
        let sa = sa_token(sa_exp);
        let expected = sa.clone();
        let standin = StandIn::start(move |seen| handler(seen, &expected)).await;
        let token_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(token_file.path(), &sa).unwrap();
        let source = source
            .replace("{endpoint}", &standin.url)
            .replace("{tokenFile}", token_file.path().to_str().unwrap());
        Case {
            host: standin.host(),
            standin,
            source,
            _token_file: token_file,
            sa_token: sa,
            logs,
            _guard: guard,
        }
    }

    async fn mint(&self) -> Result<Credential, MintError> {
        self.mint_with(&ProxyEnv::default(), true).await
    }

    /// Through `proxy`; trusting the stand-in's CA (`http.caFile`) or only the system's roots.
    async fn mint_with(&self, proxy: &ProxyEnv, trust_ca: bool) -> Result<Credential, MintError> {
        let ca = match trust_ca {
            true => format!(", caFile: {}", self.standin.certs.ca().display()),
            false => String::new(),
        };
        let yaml = format!(
            "tls: {{certFile: /x, keyFile: /y}}\nhttp: {{timeout: 1s, retries: 2{ca}}}\nregistries:\n- host: \"{}\"\n  {}\n",
            self.host,
            self.source
        );
        let config = Config::from_yaml(&yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let http = HttpClient::new(&config.http, proxy)
            .unwrap()
            .with_backoff(Duration::from_millis(20));
        // Sources reading their token from a file never call the API server.
        let kube =
            kube::Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().unwrap()))
                .unwrap();
        let cx = MintContext {
            kube: &kube,
            http: &http,
            namespace: "team-a",
            service_account: None,
        };
        config.registries[0].source.mint(cx, &self.host).await
    }

    /// The error text and all logs so far hold none of `secrets` and not the SA token.
    fn assert_no_secret(&self, error: &str, secrets: &[&str]) {
        let logs = self.logs.text();
        for s in secrets
            .iter()
            .chain([&self.sa_token.as_str(), &"sa-token-secret"])
        {
            assert!(!error.contains(s), "error text holds a secret: {error}");
            assert!(!logs.contains(s), "logs hold a secret {s:?}:\n{logs}");
        }
    }

    /// Runs every error class against the first endpoint the source calls (`first_path`),
    /// then checks that nothing secret was printed. `issued` are the tokens the stand-in hands out.
    async fn error_classes(&self, first_path: &str, issued: &[&str]) {
        let sa = self.sa_token.clone();
        let first = |seen: &[Seen]| seen.iter().filter(|s| s.path == first_path).count();

        // 4xx with a body that even echoes the token: final at once, reported with status and text.
        self.standin.clear();
        self.standin.fail(
            403,
            &format!(
                r#"{{"error":"access_denied","error_description":"subject not allowed for {sa}"}}"#
            ),
        );
        let e = self.mint().await.unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, MintError::Refused { status: 403, .. }), "{e:?}");
        assert!(
            text.contains("403")
                && text.contains("access_denied: subject not allowed for <redacted>"),
            "{text}"
        );
        assert!(text.contains(first_path), "names the endpoint: {text}");
        assert_eq!(first(&self.standin.seen()), 1, "a 403 is not retried");
        self.assert_no_secret(&text, issued);

        // A 5xx is retried, and the retry succeeds.
        self.standin.clear();
        self.standin.fail(503, "upstream unavailable");
        self.mint().await.expect("a 503 then success mints");
        assert_eq!(first(&self.standin.seen()), 2);

        // 5xx on every attempt: the last status is reported after 1 + 2 retries.
        self.standin.clear();
        for _ in 0..3 {
            self.standin
                .fail(500, "<html><body>internal error</body></html>");
        }
        let e = self.mint().await.unwrap_err();
        assert!(matches!(e, MintError::Refused { status: 500, .. }), "{e:?}");
        assert!(e.to_string().contains("internal error"), "{e}");
        assert_eq!(first(&self.standin.seen()), 3);

        // A hang is cut by the timeout and retried.
        self.standin.clear();
        self.standin.push_fault(Fault::Hang);
        self.mint().await.expect("a timeout then success mints");
        assert_eq!(first(&self.standin.seen()), 2);

        // Hangs on every attempt: a transport error that says so.
        self.standin.clear();
        for _ in 0..3 {
            self.standin.push_fault(Fault::Hang);
        }
        let e = self.mint().await.unwrap_err();
        assert!(matches!(e, MintError::Transport { .. }), "{e:?}");
        assert!(e.to_string().contains("no answer within 1s"), "{e}");

        // Malformed JSON on 200: unusable, not retried (the endpoint answered, wrongly).
        self.standin.clear();
        self.standin
            .fail(200, &format!("{{\"token\": \"{sa}\" garbage"));
        let e = self.mint().await.unwrap_err();
        assert!(matches!(e, MintError::Unusable { .. }), "{e:?}");
        assert_eq!(first(&self.standin.seen()), 1);
        self.assert_no_secret(&e.to_string(), issued);

        // 429 with Retry-After: 1 is honoured, then the retry succeeds.
        self.standin.clear();
        self.standin.push_fault(Fault::Status {
            status: 429,
            body: r#"{"error":"slow_down"}"#.into(),
            retry_after: Some(1),
        });
        self.mint().await.expect("a 429 then success mints");
        let seen: Vec<Seen> = self
            .standin
            .seen()
            .into_iter()
            .filter(|s| s.path == first_path)
            .collect();
        assert_eq!(seen.len(), 2);
        let waited = seen[1].at.duration_since(seen[0].at);
        assert!(
            waited >= Duration::from_millis(950),
            "retried after {waited:?}, before Retry-After: 1"
        );

        self.assert_no_secret("", issued);
        // The capture works: the retries above were logged.
        assert!(
            self.logs.text().contains("token endpoint failed; retrying"),
            "no logs captured"
        );
    }
}

fn assert_expiry(c: &Credential, exp: i64) {
    assert_eq!(
        c.expires_at,
        Timestamp::from_second(exp).unwrap(),
        "the expiry is the source's, not assumed"
    );
}

#[tokio::test]
async fn chainguard() {
    let exp = now() + 3600;
    let issued = jwt(json!({"iss": "https://issuer.enforce.dev", "aud": "cgr.dev", "exp": exp}));
    let answer = issued.clone();
    let case = Case::new(
        "chainguard: {identity: 0123abcd/89ef, issuer: \"{endpoint}\", serviceAccountToken: {file: \"{tokenFile}\"}}",
        move |s, sa| {
            let ok = s.method == "POST"
                && s.path == "/sts/exchange"
                && s.query.get("aud").map(String::as_str) == Some("cgr.dev")
                && s.query.get("identity").map(String::as_str) == Some("0123abcd/89ef")
                && s.bearer() == Some(sa);
            if ok {
                (200, json!({"token": answer}).to_string())
            } else {
                (401, r#"{"error":"unauthenticated"}"#.into())
            }
        },
    )
    .await;
    let c = case.mint().await.expect("mint");
    assert_eq!(c.username, "_token");
    assert_eq!(c.password.expose(), issued);
    assert_expiry(&c, exp);
    case.error_classes("/sts/exchange", &[&issued]).await;
}

#[tokio::test]
async fn quay() {
    let exp = now() + 3600;
    let issued = jwt(json!({"sub": "acme+puller", "exp": exp}));
    let answer = issued.clone();
    // No endpoint: Quay is reached at the registry entry's own host.
    let case = Case::new("quay: {robot: acme+puller, audience: quay-federation, serviceAccountToken: {file: \"{tokenFile}\"}}", move |s, sa| {
        if s.method == "GET" && s.path == "/oauth2/federation/robot/token" && s.basic() == Some(("acme+puller".into(), sa.into())) {
            (200, json!({"token": answer}).to_string())
        } else {
            (401, r#"{"error":"invalid robot"}"#.into())
        }
    })
    .await;
    let c = case.mint().await.expect("mint");
    assert_eq!(c.username, "acme+puller");
    assert_eq!(c.password.expose(), issued);
    assert_expiry(&c, exp);
    case.error_classes("/oauth2/federation/robot/token", &[&issued])
        .await;
}

#[tokio::test]
async fn token_exchange() {
    let opaque = "opaque-access-token-0123456789abcdefghijklmnopqrstuvwxyz";
    let case = Case::new(
        "tokenExchange: {endpoint: \"{endpoint}/oauth/token\", username: robot, subjectTokenAudience: my-sts, audience: registry.example, scope: \"repo:pull\", serviceAccountToken: {file: \"{tokenFile}\"}}",
        move |s, sa| {
            let ok = s.method == "POST"
                && s.path == "/oauth/token"
                && s.header("content-type") == Some("application/x-www-form-urlencoded")
                && s.field("grant_type").as_deref() == Some("urn:ietf:params:oauth:grant-type:token-exchange")
                && s.field("subject_token").as_deref() == Some(sa)
                && s.field("subject_token_type").as_deref() == Some("urn:ietf:params:oauth:token-type:jwt")
                && s.field("audience").as_deref() == Some("registry.example")
                && s.field("scope").as_deref() == Some("repo:pull")
                && s.field("resource").is_none();
            if ok {
                (200, json!({"access_token": opaque, "issued_token_type": "urn:ietf:params:oauth:token-type:access_token", "token_type": "Bearer", "expires_in": 1800}).to_string())
            } else {
                (400, r#"{"error":"invalid_request"}"#.into())
            }
        },
    )
    .await;
    let before = Timestamp::now();
    let c = case.mint().await.expect("mint");
    assert_eq!(c.username, "robot");
    assert_eq!(c.password.expose(), opaque);
    let lifetime = c.expires_at.duration_since(before).as_secs();
    assert!(
        (1795..=1801).contains(&lifetime),
        "expires_in 1800 read as {lifetime}s"
    );
    case.error_classes("/oauth/token", &[opaque]).await;
}

#[tokio::test]
async fn token_exchange_without_expires_in_reads_the_jwt_or_refuses() {
    let exp = now() + 900;
    let issued = jwt(json!({"exp": exp}));
    let answer = Arc::new(Mutex::new(
        json!({"access_token": issued, "token_type": "Bearer"}),
    ));
    let a = answer.clone();
    let case = Case::new(
        "tokenExchange: {endpoint: \"{endpoint}/token\", username: u, subjectTokenAudience: a, serviceAccountToken: {file: \"{tokenFile}\"}}",
        move |_, _| (200, a.lock().unwrap().to_string()),
    )
    .await;
    assert_expiry(&case.mint().await.expect("mint"), exp);
    *answer.lock().unwrap() = json!({"access_token": "opaque-no-lifetime", "token_type": "Bearer"});
    let e = case.mint().await.unwrap_err();
    assert!(e.to_string().contains("lifetime is unknown"), "{e}");
    // Already expired: refused rather than written.
    *answer.lock().unwrap() = json!({"access_token": "x", "expires_in": -5});
    let e = case.mint().await.unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
}

const PROVIDER: &str =
    "projects/123456/locations/global/workloadIdentityPools/cluster/providers/k8s";

fn gcp_handler(
    impersonated_exp: Timestamp,
) -> impl Fn(&Seen, &str) -> (u16, String) + Send + Sync + 'static {
    move |s, sa| {
        if s.path == "/v1/token" {
            let ok = s.field("grantType").as_deref()
                == Some("urn:ietf:params:oauth:grant-type:token-exchange")
                && s.field("audience").as_deref()
                    == Some(&format!("//iam.googleapis.com/{PROVIDER}"))
                && s.field("subjectToken").as_deref() == Some(sa)
                && s.field("subjectTokenType").as_deref()
                    == Some("urn:ietf:params:oauth:token-type:jwt")
                && s.field("requestedTokenType").as_deref()
                    == Some("urn:ietf:params:oauth:token-type:access_token")
                && s.header("authorization").is_none();
            if ok {
                return (200, json!({"access_token": "ya29.federated-token-value", "expires_in": 3600, "token_type": "Bearer"}).to_string());
            }
            return (
                400,
                json!({"error": "invalid_grant", "error_description": "bad exchange"}).to_string(),
            );
        }
        if s.path == "/v1/projects/-/serviceAccounts/puller@proj.iam.gserviceaccount.com:generateAccessToken" {
            if s.bearer() == Some("ya29.federated-token-value") {
                return (200, json!({"accessToken": "ya29.impersonated-token-value", "expireTime": impersonated_exp.to_string()}).to_string());
            }
            return (401, json!({"error": {"code": 401, "message": "bad bearer", "status": "UNAUTHENTICATED"}}).to_string());
        }
        (404, "{}".into())
    }
}

#[tokio::test]
async fn gcp_with_impersonation() {
    let exp = Timestamp::from_second(now() + 3000).unwrap();
    let case = Case::new(
        &format!("gcp: {{workloadIdentityProvider: {PROVIDER}, serviceAccountEmail: puller@proj.iam.gserviceaccount.com, stsEndpoint: \"{{endpoint}}\", iamCredentialsEndpoint: \"{{endpoint}}\", serviceAccountToken: {{file: \"{{tokenFile}}\"}}}}"),
        gcp_handler(exp),
    )
    .await;
    let c = case.mint().await.expect("mint");
    assert_eq!(c.username, "oauth2accesstoken");
    assert_eq!(c.password.expose(), "ya29.impersonated-token-value");
    assert_eq!(c.expires_at, exp);
    let seen = case.standin.seen();
    assert_eq!(seen.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(), ["/v1/token", "/v1/projects/-/serviceAccounts/puller@proj.iam.gserviceaccount.com:generateAccessToken"]);
    assert!(
        seen[1].body.contains("\"lifetime\":\"3600s\""),
        "{}",
        seen[1].body
    );
    case.error_classes(
        "/v1/token",
        &[
            "ya29.federated-token-value",
            "ya29.impersonated-token-value",
        ],
    )
    .await;

    // The second step failing is reported with Google's error text, and the federated token
    // it carried is not printed.
    case.standin.clear();
    let e = {
        // Let the STS answer, then fail generateAccessToken.
        let c2 = Case::new(
            &format!("gcp: {{workloadIdentityProvider: {PROVIDER}, serviceAccountEmail: nobody@proj.iam.gserviceaccount.com, stsEndpoint: \"{{endpoint}}\", iamCredentialsEndpoint: \"{{endpoint}}\", serviceAccountToken: {{file: \"{{tokenFile}}\"}}}}"),
            gcp_handler(exp),
        )
        .await;
        let e = c2.mint().await.unwrap_err();
        c2.assert_no_secret(&e.to_string(), &["ya29.federated-token-value"]);
        e
    };
    assert!(matches!(e, MintError::Refused { status: 404, .. }), "{e:?}");
}

#[tokio::test]
async fn gcp_federated_token_does_not_outlive_the_service_account_token() {
    // The SA token expires in 20 minutes; STS says 3600 s: the credential lasts 20 minutes.
    let sa_exp = now() + 1200;
    let case = Case::with_sa_exp(
        &format!("gcp: {{workloadIdentityProvider: \"//iam.googleapis.com/{PROVIDER}\", stsEndpoint: \"{{endpoint}}\", serviceAccountToken: {{file: \"{{tokenFile}}\"}}}}"),
        sa_exp,
        gcp_handler(Timestamp::now()),
    )
    .await;
    let c = case.mint().await.expect("mint");
    assert_eq!(c.password.expose(), "ya29.federated-token-value");
    assert_expiry(&c, sa_exp);
}

#[tokio::test]
async fn acr() {
    let exp = now() + 3 * 3600;
    let refresh = jwt(json!({"aud": "myregistry.azurecr.io", "exp": exp}));
    let answer = refresh.clone();
    let case = Case::new(
        "acr: {tenantId: tenant-1, clientId: client-1, authorityHost: \"{endpoint}\", registryEndpoint: \"{endpoint}\", serviceAccountToken: {file: \"{tokenFile}\"}}",
        move |s, sa| match s.path.as_str() {
            "/tenant-1/oauth2/v2.0/token" => {
                let ok = s.field("client_id").as_deref() == Some("client-1")
                    && s.field("grant_type").as_deref() == Some("client_credentials")
                    && s.field("scope").as_deref() == Some("https://containerregistry.azure.net/.default")
                    && s.field("client_assertion_type").as_deref() == Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
                    && s.field("client_assertion").as_deref() == Some(sa);
                if ok {
                    (200, json!({"token_type": "Bearer", "expires_in": 3599, "access_token": "entra-access-token-value"}).to_string())
                } else {
                    (400, json!({"error": "invalid_client", "error_description": "AADSTS700213: No matching federated identity record found"}).to_string())
                }
            }
            "/oauth2/exchange" => {
                let ok = s.field("grant_type").as_deref() == Some("access_token")
                    && s.field("access_token").as_deref() == Some("entra-access-token-value")
                    && s.field("tenant").as_deref() == Some("tenant-1")
                    && s.field("service").is_some();
                if ok {
                    (200, json!({"refresh_token": answer}).to_string())
                } else {
                    (401, json!({"errors": [{"code": "UNAUTHORIZED"}]}).to_string())
                }
            }
            _ => (404, "{}".into()),
        },
    )
    .await;
    let c = case.mint().await.expect("mint");
    assert_eq!(c.username, "00000000-0000-0000-0000-000000000000");
    assert_eq!(c.password.expose(), refresh);
    assert_expiry(&c, exp);
    let seen = case.standin.seen();
    assert_eq!(
        seen[1].field("service").as_deref(),
        Some(case.host.as_str()),
        "service is the registry host"
    );
    case.error_classes(
        "/tenant-1/oauth2/v2.0/token",
        &["entra-access-token-value", &refresh],
    )
    .await;
}

/// Checks a GetAuthorizationToken request's SigV4 signature by signing what arrived again:
/// proves the signed headers, host (with port) and body are the ones sent on the wire.
fn signature_matches(s: &Seen, secret: &str) -> bool {
    let Some(date) = s.header("x-amz-date") else {
        return false;
    };
    let Ok(at) = jiff::civil::DateTime::strptime("%Y%m%dT%H%M%SZ", date)
        .and_then(|d| d.to_zoned(jiff::tz::TimeZone::UTC))
    else {
        return false;
    };
    let keys = sigv4::AwsKeys {
        access_key_id: "ASIAEXAMPLE",
        secret_access_key: secret,
        session_token: s.header("x-amz-security-token"),
    };
    let headers = [
        ("content-type", s.header("content-type").unwrap_or("")),
        ("x-amz-target", s.header("x-amz-target").unwrap_or("")),
    ];
    let request = sigv4::SignableRequest {
        method: &s.method,
        host: s.header("host").unwrap_or(""),
        path: &s.path,
        query: &[],
        headers: &headers,
        body: s.body.as_bytes(),
    };
    let expected = sigv4::sign(&request, &keys, "eu-west-1", "ecr", at.timestamp());
    expected
        .iter()
        .any(|(k, v)| k == "authorization" && Some(v.as_str()) == s.header("authorization"))
}

#[tokio::test]
async fn ecr() {
    let exp = now() + 12 * 3600;
    let password = "ecr-password-value-0123456789";
    let case = Case::new(
        "ecr: {region: eu-west-1, roleArn: \"arn:aws:iam::123456789012:role/puller\", stsEndpoint: \"{endpoint}/sts\", ecrEndpoint: \"{endpoint}/ecr\", serviceAccountToken: {file: \"{tokenFile}\"}}",
        move |s, sa| match s.path.as_str() {
            "/sts/" => {
                let ok = s.field("Action").as_deref() == Some("AssumeRoleWithWebIdentity")
                    && s.field("RoleArn").as_deref() == Some("arn:aws:iam::123456789012:role/puller")
                    && s.field("RoleSessionName").as_deref() == Some("pull-secret-injector-team-a")
                    && s.field("WebIdentityToken").as_deref() == Some(sa)
                    && s.field("DurationSeconds").as_deref() == Some("900");
                if ok {
                    (200, "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleWithWebIdentityResult><Credentials><AccessKeyId>ASIAEXAMPLE</AccessKeyId><SecretAccessKey>aws-secret-key-value</SecretAccessKey><SessionToken>aws-session-token-value</SessionToken><Expiration>2030-01-01T00:00:00Z</Expiration></Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>".into())
                } else {
                    (400, "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>Couldn't retrieve verification key</Message></Error></ErrorResponse>".into())
                }
            }
            "/ecr/" => {
                let ok = s.header("x-amz-target") == Some("AmazonEC2ContainerRegistry_V20150921.GetAuthorizationToken")
                    && s.header("x-amz-security-token") == Some("aws-session-token-value")
                    && s.header("authorization").is_some_and(|a| a.contains("/eu-west-1/ecr/aws4_request"))
                    && signature_matches(s, "aws-secret-key-value");
                if ok {
                    let token = base64::engine::general_purpose::STANDARD.encode(format!("AWS:{password}"));
                    (200, json!({"authorizationData": [{"authorizationToken": token, "expiresAt": exp as f64 + 0.25, "proxyEndpoint": "https://123456789012.dkr.ecr.eu-west-1.amazonaws.com"}]}).to_string())
                } else {
                    (403, json!({"__type": "InvalidSignatureException", "message": "The request signature we calculated does not match"}).to_string())
                }
            }
            _ => (404, "{}".into()),
        },
    )
    .await;
    let c = case.mint().await.expect("mint");
    assert_eq!(c.username, "AWS");
    assert_eq!(c.password.expose(), password);
    assert_expiry(&c, exp);
    case.error_classes(
        "/sts/",
        &[password, "aws-secret-key-value", "aws-session-token-value"],
    )
    .await;
}

#[tokio::test]
async fn untrusted_certificates_are_refused() {
    let case = Case::new("chainguard: {identity: abc, issuer: \"{endpoint}\", serviceAccountToken: {file: \"{tokenFile}\"}}", |_, _| (200, "{}".into())).await;
    // Same stand-in, but the client trusts only the system roots.
    let yaml = format!(
        "tls: {{certFile: /x, keyFile: /y}}\nhttp: {{timeout: 1s, retries: 0}}\nregistries:\n- host: \"{}\"\n  {}\n",
        case.host, case.source
    );
    let config = Config::from_yaml(&yaml).unwrap();
    let http = HttpClient::new(&config.http, &Default::default()).unwrap();
    let kube =
        kube::Client::try_from(kube::Config::new("https://127.0.0.1:1".parse().unwrap())).unwrap();
    let e = config.registries[0]
        .source
        .mint(
            MintContext {
                kube: &kube,
                http: &http,
                namespace: "team-a",
                service_account: None,
            },
            &case.host,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, MintError::Transport { .. }), "{e:?}");
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    assert!(case.standin.seen().is_empty());
}

#[test]
fn bad_source_settings_name_the_field() {
    let yaml = "tls: {certFile: /x, keyFile: /y}\nregistries:\n\
        - {host: cgr.dev, chainguard: {identity: \"not a uid\", issuer: \"http://issuer.example\"}}\n\
        - {host: quay.io, quay: {robot: norobot, audience: \"\"}}\n\
        - {host: 1.dkr.ecr.eu-west-1.amazonaws.com, ecr: {region: EU, serviceAccountToken: {file: /t}}}\n\
        - {host: europe-docker.pkg.dev, gcp: {workloadIdentityProvider: projects/1/pools/x}}\n\
        - {host: x.azurecr.io, acr: {serviceAccountToken: {file: /t}}}\n\
        - {host: r.example, tokenExchange: {endpoint: \"ftp://x\", username: \"\", subjectTokenAudience: a}}\n";
    let e = Config::from_yaml(yaml).unwrap_err().to_string();
    for path in [
        "registries[0].chainguard.identity",
        "registries[0].chainguard.issuer",
        "registries[1].quay.robot",
        "registries[1].quay.audience",
        "registries[2].ecr.region",
        "registries[2].ecr.roleArn",
        "registries[3].gcp.workloadIdentityProvider",
        "registries[4].acr.tenantId",
        "registries[4].acr.clientId",
        "registries[5].tokenExchange.endpoint",
        "registries[5].tokenExchange.username",
    ] {
        assert!(e.contains(&format!("{path}: ")), "missing {path} in:\n{e}");
    }
    let e = Config::from_yaml("tls: {certFile: /x, keyFile: /y}\nregistries: [{host: cgr.dev, chainguard: {identity: ab, issuer: x, extra: 1}}]\n").unwrap_err();
    assert!(e.to_string().contains("registries[0].chainguard"), "{e}");
}

// ---- More registries: their own sources, and the declarative exchange -----------------------

/// The registry's answer `issued`, lasting `exp` when it is a JWT.
fn issued_jwt(exp: i64, sub: &str) -> String {
    jwt(json!({"sub": sub, "exp": exp}))
}

#[tokio::test]
async fn artifactory() {
    let opaque = "cmVmdGtuOjAxOjE3OTk5OTk5OTk6artifactory-access-token-value";
    let case = Case::new(
        "artifactory: {providerName: k8s-cluster, audience: jfrog, serviceAccountToken: {file: \"{tokenFile}\"}}",
        move |s, sa| registries::artifactory(s, sa, opaque),
    )
    .await;
    let before = Timestamp::now();
    let c = case.mint().await.expect("mint");
    assert_eq!(c.username, "k8s-puller", "the mapped user, from the answer");
    assert_eq!(c.password.expose(), opaque);
    let lifetime = c.expires_at.duration_since(before).as_secs();
    assert!(
        (1795..=1801).contains(&lifetime),
        "expires_in 1800 read as {lifetime}s"
    );
    case.error_classes("/access/api/v1/oidc/token", &[opaque])
        .await;
}

#[tokio::test]
async fn cloudsmith() {
    let exp = now() + 7200;
    let issued = issued_jwt(exp, "puller-x1y2");
    let answer = issued.clone();
    let case = Case::new(
        "cloudsmith: {organization: acme, serviceSlug: puller-x1y2, audience: cloudsmith, endpoint: \"{endpoint}\", serviceAccountToken: {file: \"{tokenFile}\"}}",
        move |s, sa| registries::cloudsmith(s, sa, &answer),
    )
    .await;
    let c = case.mint().await.expect("mint");
    assert_eq!(c.username, "puller-x1y2");
    assert_eq!(c.password.expose(), issued);
    assert_expiry(&c, exp);
    case.error_classes("/openid/acme/", &[&issued]).await;

    // An opaque token: its lifetime is the configured fallback, or the mint is refused.
    let opaque = "cloudsmith-opaque-api-token-value-0123456789abcdef";
    let case = Case::new(
        "cloudsmith: {organization: acme, serviceSlug: puller-x1y2, audience: cloudsmith, endpoint: \"{endpoint}\", serviceAccountToken: {file: \"{tokenFile}\"}}",
        move |s, sa| registries::cloudsmith(s, sa, opaque),
    )
    .await;
    let e = case.mint().await.unwrap_err();
    assert!(e.to_string().contains("set fallbackLifetime"), "{e}");
    let case = Case::new(
        "cloudsmith: {organization: acme, serviceSlug: puller-x1y2, audience: cloudsmith, endpoint: \"{endpoint}\", fallbackLifetime: 90m, serviceAccountToken: {file: \"{tokenFile}\"}}",
        move |s, sa| registries::cloudsmith(s, sa, opaque),
    )
    .await;
    let before = Timestamp::now();
    let c = case.mint().await.expect("mint");
    let lifetime = c.expires_at.duration_since(before).as_secs();
    assert!(
        (5395..=5401).contains(&lifetime),
        "fallback 90m read as {lifetime}s"
    );
}

#[tokio::test]
async fn artifact_keeper() {
    let opaque = "ak_ci_0123456789abcdefghijklmnopqrstuvwxyz-access";
    let case = Case::new(
        &format!("artifactKeeper: {{audience: artifact-keeper, providerId: \"{}\", serviceAccountToken: {{file: \"{{tokenFile}}\"}}}}", registries::AK_PROVIDER),
        move |s, sa| registries::artifact_keeper(s, sa, opaque),
    )
    .await;
    let before = Timestamp::now();
    let c = case.mint().await.expect("mint");
    assert_eq!(c.username, "ci-k8s");
    assert_eq!(c.password.expose(), opaque);
    let lifetime = c.expires_at.duration_since(before).as_secs();
    assert!(
        (895..=901).contains(&lifetime),
        "expires_in 900 read as {lifetime}s"
    );
    case.error_classes("/api/v1/auth/ci/token", &[opaque]).await;
}

#[tokio::test]
async fn docker_hub() {
    let opaque = "dckr_oat_0123456789abcdefghijklmnopqrstuvwxyzABCD";
    let case = Case::new(
        &format!("dockerHub: {{connectionId: {}, organization: acme, expiresIn: 600, endpoint: \"{{endpoint}}\", serviceAccountToken: {{file: \"{{tokenFile}}\"}}}}", registries::DOCKER_CONNECTION),
        move |s, sa| registries::docker_hub(s, sa, opaque),
    )
    .await;
    let before = Timestamp::now();
    let c = case.mint().await.expect("mint");
    assert_eq!(c.username, "acme", "the organisation");
    assert_eq!(c.password.expose(), opaque);
    // The answer states no lifetime and the token is opaque: the 600 s asked for.
    let lifetime = c.expires_at.duration_since(before).as_secs();
    assert!((595..=601).contains(&lifetime), "read as {lifetime}s");
    case.error_classes("/oauth/token", &[opaque]).await;
}

/// Re-signs what arrived with the keys the STS stand-in handed out: the signature covers the
/// parameters as they were on the wire.
fn alibaba_signature_matches(
    params: &std::collections::BTreeMap<String, String>,
    signature: &str,
) -> bool {
    let params: std::collections::BTreeMap<&str, String> = params
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    pull_secret_injector::sources::alibaba::sign("POST", &params, registries::ALI_SECRET)
        == signature
}

fn alibaba_source() -> String {
    format!(
        "alibaba: {{region: cn-hangzhou, instanceId: cri-k8stest123, roleArn: \"{}\", oidcProviderArn: \"{}\", stsEndpoint: \"{{endpoint}}/sts\", crEndpoint: \"{{endpoint}}/cr\", serviceAccountToken: {{file: \"{{tokenFile}}\"}}}}",
        registries::ALI_ROLE,
        registries::ALI_PROVIDER
    )
}

#[tokio::test]
async fn alibaba() {
    let exp = now() + 3600;
    let password = "eyJpbnN0YW5jZUlkIjoiY3JpLWs4c3Rlc3QxMjMi.alibaba-temp-password";
    let case = Case::new(&alibaba_source(), move |s, sa| {
        registries::alibaba(s, sa, password, exp, &alibaba_signature_matches)
    })
    .await;
    let c = case.mint().await.expect("mint");
    assert_eq!(c.username, "cr_temp_user");
    assert_eq!(c.password.expose(), password);
    assert_expiry(&c, exp);
    let seen = case.standin.seen();
    assert_eq!(
        seen.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(),
        ["/sts/", "/cr/"]
    );
    assert!(
        !seen[0].query.contains_key("OIDCToken"),
        "the token stays out of the URL"
    );
    case.error_classes(
        "/sts/",
        &[
            password,
            registries::ALI_SECRET,
            registries::ALI_SECURITY_TOKEN,
        ],
    )
    .await;

    // The signed call refused: Alibaba's code and message, none of the STS keys.
    case.standin.clear();
    let case2 = Case::new(&alibaba_source(), move |s, sa| {
        registries::alibaba(s, sa, password, exp, &|_, _| false)
    })
    .await;
    let e = case2.mint().await.unwrap_err();
    assert!(matches!(e, MintError::Refused { status: 403, .. }), "{e:?}");
    assert!(
        e.to_string().contains("/cr/") && e.to_string().contains("SignatureDoesNotMatch"),
        "{e}"
    );
    case2.assert_no_secret(
        &e.to_string(),
        &[registries::ALI_SECRET, registries::ALI_SECURITY_TOKEN],
    );
}

/// The declarative exchange reaches Artifactory, Cloudsmith, Artifact Keeper and Docker Hub with
/// configuration alone: against the same stand-ins, it mints what their own sources mint.
#[tokio::test]
async fn the_declarative_exchange_reaches_four_registries_with_no_code_of_their_own() {
    let sa_file = "serviceAccountToken: {file: \"{tokenFile}\"}";
    let issued = issued_jwt(now() + 7200, "puller-x1y2");
    type Handler = fn(&Seen, &str, &str) -> (u16, String);
    let cases: [(&str, String, String, Handler); 4] = [
        (
            "artifactory",
            format!("artifactory: {{providerName: k8s-cluster, audience: jfrog, endpoint: \"{{endpoint}}\", {sa_file}}}"),
            format!(
                "declarative: {{url: \"{{endpoint}}/access/api/v1/oidc/token\", audience: jfrog, \
                 token: {{in: jsonField, field: subject_token}}, \
                 fields: {{grant_type: \"{}\", subject_token_type: \"{}\", provider_name: k8s-cluster}}, \
                 answer: {{token: /access_token, expiresIn: /expires_in, username: /username}}, {sa_file}}}",
                registries::TOKEN_EXCHANGE, registries::ID_TOKEN
            ),
            registries::artifactory,
        ),
        (
            "cloudsmith",
            format!("cloudsmith: {{organization: acme, serviceSlug: puller-x1y2, audience: cloudsmith, endpoint: \"{{endpoint}}\", {sa_file}}}"),
            format!(
                "declarative: {{url: \"{{endpoint}}/openid/acme/\", audience: cloudsmith, \
                 token: {{in: jsonField, field: oidc_token}}, fields: {{service_slug: puller-x1y2}}, \
                 answer: {{token: /token}}, username: puller-x1y2, {sa_file}}}"
            ),
            registries::cloudsmith,
        ),
        (
            "artifactKeeper",
            format!("artifactKeeper: {{audience: artifact-keeper, endpoint: \"{{endpoint}}\", providerId: \"{}\", {sa_file}}}", registries::AK_PROVIDER),
            format!(
                "declarative: {{url: \"{{endpoint}}/api/v1/auth/ci/token\", audience: artifact-keeper, \
                 token: {{in: bearer}}, fields: {{provider_id: \"{}\"}}, \
                 answer: {{expiresIn: /expires_in, username: /username}}, {sa_file}}}",
                registries::AK_PROVIDER
            ),
            registries::artifact_keeper,
        ),
        (
            "dockerHub",
            format!("dockerHub: {{connectionId: {}, organization: acme, expiresIn: 600, endpoint: \"{{endpoint}}\", {sa_file}}}", registries::DOCKER_CONNECTION),
            format!(
                "declarative: {{url: \"{{endpoint}}/oauth/token\", audience: \"https://identity.docker.com\", \
                 token: {{in: formField, field: subject_token}}, \
                 fields: {{grant_type: \"{}\", subject_token_type: \"{}\", connection_id: {}, expires_in: \"600\"}}, \
                 answer: {{expiresIn: /expires_in}}, username: acme, fallbackLifetime: 10m, {sa_file}}}",
                registries::TOKEN_EXCHANGE, registries::ID_TOKEN, registries::DOCKER_CONNECTION
            ),
            registries::docker_hub,
        ),
    ];
    for (name, own, declarative, handler) in cases {
        let mut minted = Vec::new();
        for source in [&own, &declarative] {
            let answer = issued.clone();
            let case = Case::new(source, move |s, sa| handler(s, sa, &answer)).await;
            let c = case
                .mint()
                .await
                .unwrap_or_else(|e| panic!("{name}: {source}: {e}"));
            minted.push((
                c.username,
                c.password.expose().to_string(),
                c.expires_at.as_second(),
            ));
            let seen = case.standin.seen();
            assert_eq!(seen.len(), 1, "{name}: one request");
        }
        let (a, b) = (&minted[0], &minted[1]);
        assert_eq!((&a.0, &a.1), (&b.0, &b.1), "{name}: same credential");
        assert!(
            (a.2 - b.2).abs() <= 1,
            "{name}: same expiry, {} vs {}",
            a.2,
            b.2
        );
    }
}

#[test]
fn bad_settings_of_the_new_sources_name_the_field() {
    let yaml = "tls: {certFile: /x, keyFile: /y}\nregistries:\n\
        - {host: a.jfrog.io, artifactory: {providerName: \"\", audience: \"\", endpoint: \"http://a.jfrog.io\"}}\n\
        - {host: docker.cloudsmith.io, cloudsmith: {organization: \"a/b\", serviceSlug: \"\", audience: x, fallbackLifetime: 5s}}\n\
        - {host: ak.example, artifactKeeper: {audience: \"\", providerId: \"\"}}\n\
        - {host: docker.io, dockerHub: {connectionId: nope, organization: acme, expiresIn: 7200}}\n\
        - {host: x.cn-hangzhou.cr.aliyuncs.com, alibaba: {region: CN, instanceId: x, roleArn: arn:aws:iam::1:role/r, oidcProviderArn: p, durationSeconds: 60}}\n\
        - {host: r.example, declarative: {url: \"https://r.example/t\", audience: a, token: {in: formField}}}\n";
    let e = Config::from_yaml(yaml).unwrap_err().to_string();
    for path in [
        "registries[0].artifactory.providerName",
        "registries[0].artifactory.audience",
        "registries[0].artifactory.endpoint",
        "registries[1].cloudsmith.organization",
        "registries[1].cloudsmith.serviceSlug",
        "registries[1].cloudsmith.fallbackLifetime",
        "registries[2].artifactKeeper.audience",
        "registries[2].artifactKeeper.providerId",
        "registries[3].dockerHub.connectionId",
        "registries[3].dockerHub.expiresIn",
        "registries[4].alibaba.region",
        "registries[4].alibaba.instanceId",
        "registries[4].alibaba.roleArn",
        "registries[4].alibaba.oidcProviderArn",
        "registries[4].alibaba.durationSeconds",
        "registries[5].declarative.token.field",
        "registries[5].declarative.username",
    ] {
        assert!(e.contains(&format!("{path}: ")), "missing {path} in:\n{e}");
    }
    assert!(e.contains("plain http"), "{e}");
    // The field that allows plain http does.
    let ok = "tls: {certFile: /x, keyFile: /y}\nhttp: {allowPlainHttp: true}\nregistries:\n\
        - {host: a.jfrog.io, artifactory: {providerName: p, audience: a, endpoint: \"http://a.jfrog.io\"}}\n";
    Config::from_yaml(ok).expect("allowPlainHttp admits http endpoints");
}

// ---- Corporate networks: a real CONNECT proxy, a private CA -------------------------------

fn through(proxy: &support::proxy::Proxy) -> ProxyEnv {
    ProxyEnv {
        https_proxy: Some(proxy.url.clone()),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_go_through_the_proxy_and_trust_the_private_ca() {
    let Some(proxy) = support::proxy::Proxy::start() else {
        return;
    };
    let exp = now() + 3600;
    let password = "eyJpbnN0YW5jZUlkIjoiY3JpLWs4c3Rlc3QxMjMi.alibaba-temp-password";
    // Two calls (cloud STS, then the registry's API) to a stand-in with a private CA.
    let case = Case::new(&alibaba_source(), move |s, sa| {
        registries::alibaba(s, sa, password, exp, &alibaba_signature_matches)
    })
    .await;
    let target = case.host.clone();
    assert_eq!(proxy.connects_to(&target), 0);
    let c = case
        .mint_with(&through(&proxy), true)
        .await
        .expect("mint through the proxy");
    assert_eq!(c.password.expose(), password);
    assert_eq!(case.standin.seen().len(), 2);
    let tunnels = proxy.connects_to(&target);
    assert!(tunnels >= 1, "the proxy logged no CONNECT to {target}");

    // Without the CA: the TLS handshake inside the tunnel fails, and the error says why and
    // what to trust; the endpoint never saw a request, and nothing is retried in vain forever.
    case.standin.clear();
    let e = case.mint_with(&through(&proxy), false).await.unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, MintError::Transport { .. }), "{e:?}");
    assert!(
        text.contains("certificate") && text.contains("http.caFile") && text.contains("/sts/"),
        "{text}"
    );
    assert!(case.standin.seen().is_empty());
    assert!(
        proxy.connects_to(&target) > tunnels,
        "the refused attempt went through the proxy too"
    );
    case.assert_no_secret(&text, &[]);

    // NO_PROXY names the host: straight there, no new tunnel.
    let before = proxy.connects_to(&target);
    let bypass = ProxyEnv {
        no_proxy: Some("example.internal, 127.0.0.1".into()),
        ..through(&proxy)
    };
    case.mint_with(&bypass, true)
        .await
        .expect("mint without the proxy");
    assert_eq!(
        proxy.connects_to(&target),
        before,
        "NO_PROXY was not honoured"
    );
}

#[tokio::test]
async fn redirects_are_not_followed() {
    let elsewhere = StandIn::start(|_| (200, json!({"access_token": "stolen"}).to_string())).await;
    let location = format!("{}/collect", elsewhere.url);
    let case = Case::new(
        "declarative: {url: \"{endpoint}/token\", audience: a, token: {in: bearer}, username: u, serviceAccountToken: {file: \"{tokenFile}\"}}",
        move |_, _| (200, "{}".into()),
    )
    .await;
    case.standin.push_fault(Fault::Redirect(location));
    // A 307 is not a success: the Location is not followed, the bearer goes nowhere else.
    let e = case.mint().await.unwrap_err();
    assert!(matches!(e, MintError::Refused { status: 307, .. }), "{e:?}");
    assert!(elsewhere.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_servers_key_fetch_goes_through_the_proxy() {
    use pull_secret_injector::token_server::oidc::{IssuerConfig, Verifier};
    let Some(proxy) = support::proxy::Proxy::start() else {
        return;
    };
    let issuer = StandIn::start(|s| match s.path.as_str() {
        "/openid/v1/jwks" => (200, json!({"keys": []}).to_string()),
        _ => (404, "{}".into()),
    })
    .await;
    let config = IssuerConfig {
        url: issuer.url.clone(),
        jwks_uri: Some(format!("{}/openid/v1/jwks", issuer.url)),
        ca_file: Some(issuer.certs.ca()),
        token_file: None,
        audiences: vec!["registry.test".into()],
    };
    let verifier = Verifier::with_proxy(config, Duration::from_secs(10), &through(&proxy)).unwrap();
    let token = jwt(
        json!({"iss": issuer.url, "sub": "system:serviceaccount:a:b", "aud": "registry.test", "exp": now() + 600}),
    );
    // A key id not seen yet makes it fetch the keys.
    let token = token.replacen(
        token.split('.').next().unwrap(),
        &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"k1"}"#),
        1,
    );
    let _ = verifier.verify(&token, Timestamp::now()).await.unwrap_err();
    assert_eq!(
        issuer
            .seen()
            .iter()
            .filter(|s| s.path == "/openid/v1/jwks")
            .count(),
        1
    );
    assert!(
        proxy.connects_to(&issuer.host()) >= 1,
        "the key fetch did not use the proxy"
    );
}

// ---- Through the real API server -------------------------------------------------------------

mod end_to_end {
    #![allow(clippy::await_holding_lock)]

    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use k8s_openapi::api::authentication::v1::TokenReview;
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::{Api, PostParams};
    use serde_json::{json, Value};

    use super::support::standin::{jwt, now, StandIn};
    use super::support::*;

    const CGR: &str = "cgr.example.test";

    /// A Chainguard STS stand-in that issues a distinct token per exchange, lasting `lifetime`
    /// seconds, and refuses while `failing` is set. Remembers every bearer it was shown.
    struct Sts {
        standin: StandIn,
        failing: Arc<AtomicBool>,
        issued: Arc<AtomicU64>,
    }

    async fn sts(lifetime: i64) -> Sts {
        let failing = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicU64::new(0));
        let (f, n) = (failing.clone(), issued.clone());
        let standin = StandIn::start(move |s| {
            if f.load(Ordering::SeqCst) {
                return (403, json!({"error": "identity not bound"}).to_string());
            }
            if s.path != "/sts/exchange" || s.query.get("identity").map(String::as_str) != Some("0123abcd") || s.bearer().is_none() {
                return (400, "{}".into());
            }
            let jti = n.fetch_add(1, Ordering::SeqCst);
            (200, json!({"token": jwt(json!({"aud": "cgr.dev", "exp": now() + lifetime, "jti": jti}))}).to_string())
        })
        .await;
        Sts {
            standin,
            failing,
            issued,
        }
    }

    fn registries(sts: &Sts) -> String {
        format!(
            "{}  - host: {CGR}\n    chainguard: {{identity: \"0123abcd\", issuer: \"{}\"}}\n",
            kubernetes_registry("default", 3600),
            sts.standin.url
        )
    }

    fn extra(sts: &Sts) -> String {
        format!(
            "http: {{timeout: 2s, retries: 0, caFile: {}}}\n",
            sts.standin.certs.ca().display()
        )
    }

    fn auths(secret: &k8s_openapi::api::core::v1::Secret) -> Value {
        docker_config(secret)["auths"].clone()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chainguard_exchange_with_the_namespace_identity() {
        let _serial = serial();
        let sts = sts(3600).await;
        let mut inj = Injector::start_with("src1", &registries(&sts), &extra(&sts)).await;
        let c = inj.client.clone();
        let ns = inj.namespace("cg", true).await;

        let own = json!({"imagePullSecrets": [{"name": "mine"}]});
        let pod = create_pod(&c, &ns, "app", own, false).await.pod;
        assert!(
            pull_secret_names(&pod).contains(&"pull-secret".to_string()),
            "{:?}",
            pull_secret_names(&pod)
        );
        let secret = wait_secret(&c, &ns, "both registries", |s| {
            auths(s).get(CGR).is_some() && auths(s).get(HOST).is_some()
        })
        .await;
        let entry = &auths(&secret)[CGR];
        assert_eq!(entry["username"], "_token");
        let password = entry["password"].as_str().unwrap();
        assert_eq!(
            claims(password)["aud"],
            "cgr.dev",
            "the stand-in's token is what was stored"
        );

        // What the STS was shown is a real service-account token of this namespace, minted by
        // the API server for Chainguard's audience, not for the API server.
        let seen = sts.standin.seen();
        let subject = format!("system:serviceaccount:{ns}:default");
        let bearer = seen
            .iter()
            .filter_map(|s| s.bearer().map(str::to_string))
            .find(|b| claims(b)["sub"] == subject.as_str())
            .expect("the STS was shown this namespace's token");
        let reviews: Api<TokenReview> = Api::all(c.clone());
        let review: TokenReview = serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": bearer, "audiences": ["issuer.enforce.dev"]}})).unwrap();
        let status = reviews
            .create(&PostParams::default(), &review)
            .await
            .unwrap()
            .status
            .unwrap();
        assert_eq!(status.authenticated, Some(true), "{status:?}");
        assert_eq!(
            status.user.unwrap().username.as_deref(),
            Some(subject.as_str())
        );
        assert_eq!(claims(&bearer)["aud"], json!(["issuer.enforce.dev"]));

        // Attached to the namespace's ServiceAccount like any pull Secret.
        wait_for(
            "default ServiceAccount patched",
            Duration::from_secs(30),
            || async {
                let sa = Api::<ServiceAccount>::namespaced(c.clone(), &ns)
                    .get("default")
                    .await
                    .unwrap();
                sa.image_pull_secrets
                    .unwrap_or_default()
                    .iter()
                    .any(|r| r.name == "pull-secret")
            },
        )
        .await;
        inj.cleanup().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_failing_registry_does_not_cost_the_others_their_credentials() {
        let _serial = serial();
        let cp = ControlPlane::get();
        // Chainguard tokens of 30 s: renewed after about 20 s (a third before expiry).
        let sts = sts(30).await;
        sts.failing.store(true, Ordering::SeqCst);
        let mut inj = Injector::start_with("src2", &registries(&sts), &extra(&sts)).await;
        let c = inj.client.clone();
        let ns = inj.namespace("partial", true).await;

        // The STS refuses: the Secret is written with the registry that works, and pods get it.
        let secret = wait_secret(&c, &ns, "the kubernetes registry", |s| {
            auths(s).get(HOST).is_some()
        })
        .await;
        assert!(
            auths(&secret).get(CGR).is_none(),
            "no credential for the failing registry"
        );
        let pod = create_pod(&c, &ns, "app", json!({}), true).await.pod;
        assert!(pull_secret_names(&pod).contains(&"pull-secret".to_string()));
        let k8s_password = password(&secret);

        // It recovers: the missing registry is retried and added; the other is not re-minted.
        let minted_before = cp.token_requests(&ns);
        sts.failing.store(false, Ordering::SeqCst);
        let secret = wait_secret(&c, &ns, "the chainguard registry after recovery", |s| {
            auths(s).get(CGR).is_some()
        })
        .await;
        assert_eq!(
            password(&secret),
            k8s_password,
            "the working registry's credential is carried over"
        );
        let first_cgr = auths(&secret)[CGR]["password"]
            .as_str()
            .unwrap()
            .to_string();
        // One TokenRequest for the exchange itself; none for the kubernetes registry.
        assert_eq!(
            cp.token_requests(&ns) - minted_before,
            1,
            "only the missing registry was minted"
        );

        // The STS fails again when that token is due: its credential stays until it expires.
        sts.failing.store(true, Ordering::SeqCst);
        let refused_before = sts.standin.seen().len();
        wait_for("a refused renewal", Duration::from_secs(40), || async {
            sts.standin.seen().len() > refused_before
        })
        .await;
        let secret = get_secret(&c, &ns).await.unwrap();
        assert_eq!(
            auths(&secret)[CGR]["password"].as_str(),
            Some(first_cgr.as_str()),
            "the last good credential stays"
        );
        assert_eq!(password(&secret), k8s_password);

        // Recovery: renewed with a new token, the kubernetes credential still untouched.
        let issued_before = sts.issued.load(Ordering::SeqCst);
        sts.failing.store(false, Ordering::SeqCst);
        let secret = wait_secret(&c, &ns, "a renewed chainguard token", |s| {
            auths(s)[CGR]["password"]
                .as_str()
                .is_some_and(|p| p != first_cgr)
        })
        .await;
        assert!(sts.issued.load(Ordering::SeqCst) > issued_before);
        assert_eq!(password(&secret), k8s_password);
        inj.cleanup().await;
    }

    /// The new sources in the service: each exchanges a TokenRequest token of the namespace
    /// with its own audience, and all land in the one Secret beside the kubernetes registry.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn new_sources_share_the_secret_with_the_other_registries() {
        use super::support::standin::registries;
        let _serial = serial();
        let issued = jwt(json!({"sub": "issued", "exp": now() + 3600}));
        let answer = issued.clone();
        // One stand-in for the three, by path; it checks the shape, not which SA token came.
        let standin = StandIn::start(move |s| {
            let sa = s
                .field("subject_token")
                .or_else(|| s.bearer().map(str::to_string))
                .unwrap_or_default();
            match s.path.as_str() {
                "/access/api/v1/oidc/token" => registries::artifactory(s, &sa, &answer),
                "/api/v1/auth/ci/token" => registries::artifact_keeper(s, &sa, &answer),
                "/oauth/token" => registries::docker_hub(s, &sa, &answer),
                _ => (404, "{}".into()),
            }
        })
        .await;
        let url = &standin.url;
        let registries = format!(
            "{}  - host: jfrog.example.test\n    artifactory: {{providerName: k8s-cluster, audience: jfrog, endpoint: \"{url}\"}}\n\
             \x20 - host: ak.example.test\n    artifactKeeper: {{audience: artifact-keeper, endpoint: \"{url}\", providerId: \"{}\"}}\n\
             \x20 - host: docker.io\n    declarative: {{url: \"{url}/oauth/token\", audience: \"https://identity.docker.com\", token: {{in: formField, field: subject_token}}, fields: {{grant_type: \"{}\", subject_token_type: \"{}\", connection_id: {}, expires_in: \"600\"}}, username: acme, fallbackLifetime: 10m}}\n",
            kubernetes_registry("default", 3600),
            registries::AK_PROVIDER,
            registries::TOKEN_EXCHANGE,
            registries::ID_TOKEN,
            registries::DOCKER_CONNECTION,
        );
        let extra = format!(
            "http: {{timeout: 2s, retries: 0, caFile: {}}}\n",
            standin.certs.ca().display()
        );
        let mut inj = Injector::start_with("src3", &registries, &extra).await;
        let c = inj.client.clone();
        let ns = inj.namespace("more", true).await;
        let secret = wait_secret(&c, &ns, "four registries", |s| {
            auths(s).as_object().is_some_and(|m| m.len() == 4)
        })
        .await;
        let users: Vec<(String, String)> = auths(&secret)
            .as_object()
            .unwrap()
            .iter()
            .map(|(h, e)| (h.clone(), e["username"].as_str().unwrap_or("").to_string()))
            .collect();
        assert_eq!(
            users,
            [
                ("ak.example.test".to_string(), "ci-k8s".to_string()),
                ("docker.io".into(), "acme".into()),
                ("jfrog.example.test".into(), "k8s-puller".into()),
                (HOST.into(), "oauth2accesstoken".into()),
            ]
        );
        for host in ["ak.example.test", "docker.io", "jfrog.example.test"] {
            assert_eq!(auths(&secret)[host]["password"], issued.as_str(), "{host}");
        }
        // Each exchange presented this namespace's identity with its source's audience.
        let subject = format!("system:serviceaccount:{ns}:default");
        let mut audiences: Vec<String> = standin
            .seen()
            .iter()
            .filter_map(|s| {
                s.field("subject_token")
                    .or_else(|| s.bearer().map(str::to_string))
            })
            .map(|t| claims(&t))
            .filter(|c| c["sub"] == subject.as_str())
            .map(|c| c["aud"][0].as_str().unwrap_or("").to_string())
            .collect();
        audiences.sort();
        audiences.dedup();
        assert_eq!(
            audiences,
            ["artifact-keeper", "https://identity.docker.com", "jfrog"]
        );
        inj.cleanup().await;
    }
}

mod selection {
    #![allow(clippy::await_holding_lock)]

    use std::time::Duration;

    use k8s_openapi::api::core::v1::{Event, Namespace};
    use kube::api::{Api, ListParams, Patch, PatchParams};
    use serde_json::{json, Value};

    use super::support::standin::{jwt, now, StandIn};
    use super::support::*;

    const CGR: &str = "cgr.example.test";

    fn hosts(secret: &k8s_openapi::api::core::v1::Secret) -> Vec<String> {
        docker_config(secret)["auths"]
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    async fn annotate(c: &kube::Client, ns: &str, value: Value) {
        Api::<Namespace>::all(c.clone())
            .patch(ns, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"pull-secret-injector.io/registries": value}}})))
            .await
            .expect("annotate namespace");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_namespace_annotation_picks_the_registries() {
        let _serial = serial();
        let standin = StandIn::start(|_| {
            (
                200,
                json!({"token": jwt(json!({"exp": now() + 3600}))}).to_string(),
            )
        })
        .await;
        let registries = format!(
            "{}  - host: {CGR}\n    chainguard: {{identity: \"0123abcd\", issuer: \"{}\"}}\n",
            kubernetes_registry("default", 3600),
            standin.url
        );
        let extra = format!("http: {{caFile: {}}}\n", standin.certs.ca().display());
        let mut inj = Injector::start_with("sel1", &registries, &extra).await;
        let c = inj.client.clone();
        let ns = inj.namespace("picky", true).await;
        wait_secret(&c, &ns, "both registries by default", |s| {
            hosts(s).len() == 2
        })
        .await;

        annotate(&c, &ns, json!(CGR)).await;
        let s = wait_secret(&c, &ns, "only chainguard", |s| hosts(s) == [CGR]).await;
        assert_eq!(annotation(&s, "pull-secret-injector.io/registries"), CGR);

        annotate(&c, &ns, json!(format!("{HOST}, nowhere.example"))).await;
        wait_secret(&c, &ns, "only the kubernetes registry", |s| {
            hosts(s) == [HOST]
        })
        .await;
        let events: Api<Event> = Api::namespaced(c.clone(), &ns);
        wait_for(
            "an UnknownRegistry event",
            Duration::from_secs(30),
            || async {
                events
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .iter()
                    .any(|e| {
                        e.reason.as_deref() == Some("UnknownRegistry")
                            && e.message
                                .as_deref()
                                .unwrap_or("")
                                .contains("nowhere.example")
                    })
            },
        )
        .await;

        // Selecting nothing configured is an opt-out: the Secret goes, and pods are not patched.
        annotate(&c, &ns, json!("nowhere.example")).await;
        wait_for("the Secret removed", Duration::from_secs(30), || async {
            get_secret(&c, &ns).await.is_none()
        })
        .await;
        let pod = create_pod(&c, &ns, "app", json!({}), true).await;
        assert!(
            !pull_secret_names(&pod.pod).contains(&"pull-secret".to_string()),
            "{:?}",
            pull_secret_names(&pod.pod)
        );
        assert!(
            pod.warnings
                .iter()
                .any(|w| w.contains("selects no configured registry")),
            "{:?}",
            pod.warnings
        );

        annotate(&c, &ns, Value::Null).await;
        wait_secret(&c, &ns, "both registries again", |s| hosts(s).len() == 2).await;
        inj.cleanup().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn matching_images_patches_only_pods_that_pull_from_a_configured_registry() {
        let _serial = serial();
        let mut inj = Injector::start_with(
            "img1",
            &kubernetes_registry("default", 3600),
            "inject: matchingImages\n",
        )
        .await;
        let c = inj.client.clone();
        let ns = inj.namespace("images", true).await;
        wait_secret(&c, &ns, "the namespace's Secret", |_| true).await;

        let hub = create_pod(
            &c,
            &ns,
            "hub",
            json!({"containers": [{"name": "a", "image": "nginx:1.27"}]}),
            false,
        )
        .await
        .pod;
        assert!(
            pull_secret_names(&hub).is_empty(),
            "{:?}",
            pull_secret_names(&hub)
        );
        let init = create_pod(
            &c,
            &ns,
            "init",
            json!({"containers": [{"name": "a", "image": "nginx"}], "initContainers": [{"name": "i", "image": format!("{HOST}/tools/init:1")}]}),
            false,
        )
        .await
        .pod;
        assert_eq!(pull_secret_names(&init), ["pull-secret"]);
        let lookalike = create_pod(
            &c,
            &ns,
            "lookalike",
            json!({"containers": [{"name": "a", "image": format!("{HOST}.evil.example/app")}]}),
            false,
        )
        .await
        .pod;
        assert!(pull_secret_names(&lookalike).is_empty());

        // ServiceAccounts are left alone, so Pods that pull elsewhere do not inherit the Secret.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let sa = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(c.clone(), &ns)
            .get("default")
            .await
            .unwrap();
        assert!(sa.image_pull_secrets.unwrap_or_default().is_empty());
        inj.cleanup().await;
    }
}

mod pull_secret_updater {
    #![allow(clippy::await_holding_lock)]

    use std::collections::BTreeMap;
    use std::time::Duration;

    use k8s_openapi::api::core::v1::{Event, Secret};
    use k8s_openapi::ByteString;
    use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
    use serde_json::{json, Value};

    use super::support::standin::{jwt, now, StandIn};
    use super::support::*;

    async fn user_secret(
        c: &kube::Client,
        ns: &str,
        name: &str,
        type_: &str,
        annotations: &[(&str, &str)],
    ) {
        let doc = json!({"auths": {"other.example": {"auth": "eDp5"}}});
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                ..Default::default()
            },
            type_: Some(type_.into()),
            data: Some(BTreeMap::from([(
                ".dockerconfigjson".to_string(),
                ByteString(serde_json::to_vec(&doc).unwrap()),
            )])),
            ..Default::default()
        };
        Api::<Secret>::namespaced(c.clone(), ns)
            .create(&PostParams::default(), &secret)
            .await
            .expect("create user Secret");
    }

    async fn auths(c: &kube::Client, ns: &str, name: &str) -> Value {
        let s = Api::<Secret>::namespaced(c.clone(), ns)
            .get(name)
            .await
            .unwrap();
        docker_config(&s)["auths"].clone()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn annotated_secrets_are_kept_filled_in_any_namespace() {
        let _serial = serial();
        // Tokens of 10 minutes and 5 seconds: due 5 s after minting (renewed 10 min before exp).
        let standin = StandIn::start(|s| {
            let identity = s.query.get("identity").cloned().unwrap_or_default();
            (200, json!({"token": jwt(json!({"sub": identity, "aud": "cgr.dev", "exp": now() + 605, "n": fastrand::u64(..)}))}).to_string())
        })
        .await;
        let extra = format!(
            "http: {{caFile: {}}}\npullSecretUpdater: {{issuer: \"{}\", serviceAccountToken: {{fromNamespace: {{serviceAccount: default}}}}}}\n",
            standin.certs.ca().display(),
            standin.url
        );
        let mut inj =
            Injector::start_with("upd1", &kubernetes_registry("default", 3600), &extra).await;
        let c = inj.client.clone();
        let ns = inj.namespace("plain", false).await; // not opted in: the annotation is what counts
        wait_for(
            "default ServiceAccount",
            Duration::from_secs(30),
            || async {
                Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(c.clone(), &ns)
                    .get_opt("default")
                    .await
                    .unwrap()
                    .is_some()
            },
        )
        .await;
        user_secret(
            &c,
            &ns,
            "cgr",
            "kubernetes.io/dockerconfigjson",
            &[("pull-secret-updater.chainguard.dev/identity", "0123abcd")],
        )
        .await;
        user_secret(&c, &ns, "unrelated", "kubernetes.io/dockerconfigjson", &[]).await;
        user_secret(
            &c,
            &ns,
            "opaque",
            "Opaque",
            &[("pull-secret-updater.chainguard.dev/identity", "0123abcd")],
        )
        .await;

        wait_for(
            "the annotated Secret filled",
            Duration::from_secs(30),
            || async { auths(&c, &ns, "cgr").await.get("cgr.dev").is_some() },
        )
        .await;
        let a = auths(&c, &ns, "cgr").await;
        assert_eq!(a["cgr.dev"]["username"], "_token");
        assert_eq!(
            a["other.example"],
            json!({"auth": "eDp5"}),
            "the user's other entries stay"
        );
        let first = a["cgr.dev"]["password"].as_str().unwrap().to_string();
        assert_eq!(claims(&first)["sub"], "0123abcd");
        // Exchanged with a token of the Secret's namespace.
        let seen = standin.seen();
        let bearer = seen.iter().find_map(|s| s.bearer()).expect("STS called");
        assert_eq!(
            claims(bearer)["sub"],
            format!("system:serviceaccount:{ns}:default")
        );

        // Renewed ten minutes before exp.
        wait_for("a renewed token", Duration::from_secs(40), || async {
            auths(&c, &ns, "cgr").await["cgr.dev"]["password"]
                .as_str()
                .is_some_and(|p| p != first)
        })
        .await;

        // A new identity gets a token of its own at once.
        Api::<Secret>::namespaced(c.clone(), &ns)
            .patch("cgr", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"pull-secret-updater.chainguard.dev/identity": "fedcba98"}}})))
            .await
            .unwrap();
        wait_for(
            "a token for the new identity",
            Duration::from_secs(30),
            || async {
                auths(&c, &ns, "cgr").await["cgr.dev"]["password"]
                    .as_str()
                    .is_some_and(|p| claims(p)["sub"] == "fedcba98")
            },
        )
        .await;

        // Unannotated and non-docker-config Secrets are not touched; the latter is reported.
        let events: Api<Event> = Api::namespaced(c.clone(), &ns);
        wait_for(
            "a NotDockerConfig event",
            Duration::from_secs(30),
            || async {
                events
                    .list(&ListParams::default())
                    .await
                    .unwrap()
                    .items
                    .iter()
                    .any(|e| e.reason.as_deref() == Some("NotDockerConfig"))
            },
        )
        .await;
        assert!(auths(&c, &ns, "unrelated").await.get("cgr.dev").is_none());
        assert!(auths(&c, &ns, "opaque").await.get("cgr.dev").is_none());
        inj.cleanup().await;
    }

    /// With `namespaces`, only Secrets there are filled: one annotated the same way elsewhere is
    /// left as it was (issue 23: the compatibility is a confused deputy; this keeps it to the
    /// namespaces whose Secret writers are trusted).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn annotated_secrets_outside_the_configured_namespaces_are_left_alone() {
        let _serial = serial();
        let standin = StandIn::start(|s| {
            let identity = s.query.get("identity").cloned().unwrap_or_default();
            (200, json!({"token": jwt(json!({"sub": identity, "aud": "cgr.dev", "exp": now() + 3600}))}).to_string())
        })
        .await;
        let kept = "upd2-kept";
        let extra = format!(
            "http: {{caFile: {}}}\npullSecretUpdater: {{issuer: \"{}\", namespaces: [{kept}], serviceAccountToken: {{fromNamespace: {{serviceAccount: default}}}}}}\n",
            standin.certs.ca().display(),
            standin.url
        );
        let mut inj =
            Injector::start_with("upd2", &kubernetes_registry("default", 3600), &extra).await;
        let c = inj.client.clone();
        let inside = inj.namespace("kept", false).await;
        assert_eq!(inside, kept);
        let outside = inj.namespace("other", false).await;
        for ns in [&inside, &outside] {
            user_secret(
                &c,
                ns,
                "cgr",
                "kubernetes.io/dockerconfigjson",
                &[("pull-secret-updater.chainguard.dev/identity", "0123abcd")],
            )
            .await;
        }
        wait_for(
            "the Secret in the configured namespace filled",
            Duration::from_secs(30),
            || async { auths(&c, &inside, "cgr").await.get("cgr.dev").is_some() },
        )
        .await;
        // Both were created before the one inside was filled; give the other as long again.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(
            auths(&c, &outside, "cgr").await,
            json!({"other.example": {"auth": "eDp5"}}),
            "outside the configured namespaces: untouched"
        );
        // And no token of the other namespace was exchanged.
        let subjects: Vec<String> = standin
            .seen()
            .iter()
            .filter_map(|s| s.bearer().map(|b| claims(b)["sub"].to_string()))
            .collect();
        assert!(!subjects.is_empty());
        assert!(
            subjects
                .iter()
                .all(|s| *s == format!("\"system:serviceaccount:{inside}:default\"")),
            "{subjects:?}"
        );
        inj.cleanup().await;
    }
}

mod service_account_scope {
    #![allow(clippy::await_holding_lock)]

    use std::time::Duration;

    use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
    use kube::api::{Api, DeleteParams, PostParams};
    use serde_json::json;

    use super::support::*;

    async fn secret(c: &kube::Client, ns: &str, name: &str) -> Option<Secret> {
        Api::<Secret>::namespaced(c.clone(), ns)
            .get_opt(name)
            .await
            .unwrap()
    }

    fn subject_of(s: &Secret) -> String {
        claims(
            docker_config(s)["auths"][HOST]["password"]
                .as_str()
                .unwrap(),
        )["sub"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_service_account_gets_its_own_secret_minted_for_it() {
        let _serial = serial();
        let mut inj = Injector::start_with(
            "sas1",
            &kubernetes_registry("default", 3600),
            "identityScope: serviceAccount\n",
        )
        .await;
        let c = inj.client.clone();
        let ns = inj.namespace("workloads", true).await;
        let accounts: Api<ServiceAccount> = Api::namespaced(c.clone(), &ns);
        let created = accounts
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "builder"}})).unwrap(),
            )
            .await
            .unwrap();
        let names: Vec<String> = created
            .image_pull_secrets
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(
            names,
            ["builder-pull-secret"],
            "patched at admission with its own Secret"
        );

        // The refresher makes one Secret per ServiceAccount, each minted for that account.
        wait_for(
            "builder-pull-secret and default-pull-secret",
            Duration::from_secs(30),
            || async {
                secret(&c, &ns, "builder-pull-secret").await.is_some()
                    && secret(&c, &ns, "default-pull-secret").await.is_some()
            },
        )
        .await;
        let builder = secret(&c, &ns, "builder-pull-secret").await.unwrap();
        assert_eq!(
            subject_of(&builder),
            format!("system:serviceaccount:{ns}:builder")
        );
        assert_eq!(
            subject_of(&secret(&c, &ns, "default-pull-secret").await.unwrap()),
            format!("system:serviceaccount:{ns}:default")
        );
        assert!(
            secret(&c, &ns, "pull-secret").await.is_none(),
            "no per-namespace Secret in this scope"
        );
        let owner = &builder.metadata.owner_references.as_ref().expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("ServiceAccount", "builder")
        );

        // A Pod running as builder gets builder's Secret, after its own entries.
        let pod = create_pod(
            &c,
            &ns,
            "build",
            json!({"serviceAccountName": "builder", "imagePullSecrets": [{"name": "mine"}]}),
            false,
        )
        .await
        .pod;
        assert_eq!(pull_secret_names(&pod), ["mine", "builder-pull-secret"]);
        let pod = create_pod(
            &c,
            &ns,
            "plain",
            json!({"imagePullSecrets": [{"name": "mine"}]}),
            false,
        )
        .await
        .pod;
        assert_eq!(pull_secret_names(&pod), ["mine", "default-pull-secret"]);

        // `status` lists each ServiceAccount's Secret.
        let table = inj.status_table();
        for secret in ["builder-pull-secret", "default-pull-secret"] {
            assert!(
                table
                    .lines()
                    .any(|l| l.starts_with(&ns) && l.contains(&format!("ok ({secret})"))),
                "{secret} missing from:\n{table}"
            );
        }

        // Deleting the ServiceAccount deletes its Secret (garbage collection of the owner), and
        // its expiry leaves the metrics (issue 23, point 10: it would count down to a false
        // PullSecretNearExpiry).
        let managed = || async {
            inj.metrics()
                .await
                .lines()
                .find_map(|l| l.strip_prefix("pull_secret_injector_managed_secrets "))
                .and_then(|v| v.parse::<i64>().ok())
                .expect("managed_secrets is exported")
        };
        let with_builder = managed().await;
        accounts
            .delete("builder", &DeleteParams::default())
            .await
            .unwrap();
        wait_for(
            "builder-pull-secret collected",
            Duration::from_secs(60),
            || async { secret(&c, &ns, "builder-pull-secret").await.is_none() },
        )
        .await;
        wait_for(
            &format!("managed_secrets down from {with_builder}"),
            Duration::from_secs(30),
            || async { managed().await == with_builder - 1 },
        )
        .await;

        // Opting out removes the namespace's Secrets.
        inj.set_opt_in(&ns, false).await;
        wait_for(
            "default-pull-secret removed",
            Duration::from_secs(30),
            || async { secret(&c, &ns, "default-pull-secret").await.is_none() },
        )
        .await;
        inj.cleanup().await;
    }
}
