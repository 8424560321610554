//! Calls to token endpoints (registries, clouds), shared by every exchanging source: one HTTP
//! client, one retry policy, one way to describe failures.
//!
//! A failure names the source, the endpoint (without its query), the HTTP status and what the
//! server said, and never a token: the server's text is cut short and anything that looks like
//! a token, or is one of the secrets the request carried, is replaced by `<redacted>`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

use crate::core::credential::Sensitive;

/// `http:` in the config file: how exchanging sources reach token endpoints.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpConfig {
    /// Per request, connect to last byte.
    #[serde(
        default = "default_timeout",
        deserialize_with = "crate::core::duration::field"
    )]
    pub timeout: Duration,
    /// Retries after a timeout, a connection failure, a 5xx or a 429 (other answers are final).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// PEM bundle trusted besides the system's roots (a self-hosted registry's private CA, or a
    /// proxy's that inspects TLS).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Whether `http://` endpoints are allowed. Off: every call is HTTPS, or refused.
    #[serde(default)]
    pub allow_plain_http: bool,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_retries() -> u32 {
    3
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            timeout: default_timeout(),
            retries: default_retries(),
            ca_file: None,
            allow_plain_http: false,
        }
    }
}

/// The proxy the process environment names: `$HTTPS_PROXY`, `$HTTP_PROXY` (for plain `http`
/// endpoints, where allowed) and `$NO_PROXY`, upper case first, as curl reads them. Read once by
/// [`crate::settings::Environment`] and handed to every [`HttpClient`]; nothing else reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    pub https_proxy: Option<String>,
    pub http_proxy: Option<String>,
    pub no_proxy: Option<String>,
    /// `$KUBERNETES_SERVICE_HOST`: the API server's in-cluster address, never proxied.
    pub api_server_host: Option<String>,
}

/// The API server's in-cluster names: a proxy outside the cluster could not reach them, and
/// what is sent there (service-account tokens) has no business crossing it.
const API_SERVER_NAMES: &[&str] = &[
    "kubernetes.default.svc.cluster.local",
    "kubernetes.default.svc",
    "kubernetes.default",
];

impl ProxyEnv {
    /// Reads the variables through `var` (`std::env::var` in `main`, a map in tests).
    pub(crate) fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let either = |upper: &str, lower: &str| {
            var(upper)
                .or_else(|| var(lower))
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        Self {
            https_proxy: either("HTTPS_PROXY", "https_proxy"),
            http_proxy: either("HTTP_PROXY", "http_proxy"),
            no_proxy: either("NO_PROXY", "no_proxy"),
            api_server_host: var("KUBERNETES_SERVICE_HOST").filter(|v| !v.is_empty()),
        }
    }

    /// `$NO_PROXY` with the API server's names and address added.
    pub(crate) fn bypass_list(&self) -> String {
        let mut hosts: Vec<&str> = self
            .no_proxy
            .iter()
            .flat_map(|l| l.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect();
        hosts.extend(API_SERVER_NAMES);
        hosts.extend(self.api_server_host.as_deref());
        hosts.join(",")
    }

    /// The proxies to install: one for `https` URLs, one for `http` URLs when plain HTTP is
    /// allowed. A value without a scheme is `http://` (as curl reads it).
    fn proxies(&self, allow_plain_http: bool) -> Result<Vec<reqwest::Proxy>, HttpClientError> {
        let bypass = reqwest::NoProxy::from_string(&self.bypass_list());
        let mut out = Vec::new();
        let wanted = [
            ("HTTPS_PROXY", self.https_proxy.as_deref(), true),
            ("HTTP_PROXY", self.http_proxy.as_deref(), allow_plain_http),
        ];
        for (variable, value, wanted) in wanted {
            let Some(value) = value.filter(|_| wanted) else {
                continue;
            };
            let url =
                proxy_url(value).map_err(|message| HttpClientError::Proxy { variable, message })?;
            let proxy = if variable == "HTTPS_PROXY" {
                reqwest::Proxy::https(url)
            } else {
                reqwest::Proxy::http(url)
            };
            let proxy = proxy.map_err(|e| HttpClientError::Proxy {
                variable,
                message: describe_transport(&e),
            })?;
            out.push(proxy.no_proxy(bypass.clone()));
        }
        Ok(out)
    }
}

/// A proxy variable's value as a URL: `http` or `https` with a host. Errors show the value
/// without its user information (it may hold a password).
fn proxy_url(value: &str) -> Result<reqwest::Url, String> {
    let with_scheme = if value.contains("://") {
        value.to_string()
    } else {
        format!("http://{value}")
    };
    let url = reqwest::Url::parse(&with_scheme).map_err(|e| {
        let shown = match with_scheme.rsplit_once('@') {
            Some((_, host)) => format!("<user>@{host}"),
            None => with_scheme.clone(),
        };
        format!("{shown:?} is not a URL: {e}")
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{} is not an http:// or https:// proxy URL with a host",
            endpoint_of(&url)
        ));
    }
    Ok(url)
}

impl HttpConfig {
    pub(crate) fn validate(&self, err: &mut impl FnMut(&str, String)) {
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(60) {
            err(
                "http.timeout",
                "must be more than 0s and at most 60s".into(),
            );
        }
        if self.retries > 10 {
            err("http.retries", "must be at most 10".into());
        }
    }
}

/// A call out that did not give a usable answer. The sources turn it into their `MintError`
/// (same variants, same text); the token server keeps it as it is.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// No answer: connection refused, TLS failure, timeout.
    #[error("{source_name}: {endpoint} failed: {message}")]
    Transport {
        source_name: &'static str,
        endpoint: String,
        message: String,
    },
    /// An answer other than 2xx; `detail` is the server's text, redacted and cut short.
    #[error("{source_name}: {endpoint} answered {status}: {detail}")]
    Refused {
        source_name: &'static str,
        endpoint: String,
        status: u16,
        detail: String,
    },
    /// A 2xx answer that is not what was asked for.
    #[error("{source_name} returned an unusable credential: {reason}")]
    Unusable {
        source_name: &'static str,
        reason: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum HttpClientError {
    #[error("cannot read http.caFile {path}: {message}")]
    CaFile { path: PathBuf, message: String },
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
    #[error("${variable}: {message}")]
    Proxy {
        variable: &'static str,
        message: String,
    },
}

/// The HTTP client every exchanging source uses, with its retry policy.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: reqwest::Client,
    retries: u32,
    /// The first backoff; it doubles per attempt (with jitter) up to `MAX_BACKOFF`.
    backoff: Duration,
    timeout: Duration,
}

const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A `Retry-After` longer than this is not waited for inside one mint; the renewal's own
/// backoff takes over.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);
/// How much of an error body is kept.
const DETAIL_CHARS: usize = 300;

impl HttpClient {
    /// A client for `config`, through the proxies `proxy` names. Pass `ProxyEnv::default()` for
    /// a client that never uses a proxy (the API server's TokenReview).
    pub fn new(config: &HttpConfig, proxy: &ProxyEnv) -> Result<Self, HttpClientError> {
        let mut roots = rustls::RootCertStore::empty();
        // Unreadable system certificates are skipped; an empty store fails at first use with
        // a clear TLS error rather than at start.
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        if let Some(path) = &config.ca_file {
            let ca_error = |message: String| HttpClientError::CaFile {
                path: path.clone(),
                message,
            };
            let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_error(e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("no PEM certificate in it".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| HttpClientError::Build(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut builder = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(config.timeout)
            .user_agent(concat!("pull-secret-injector/", env!("CARGO_PKG_VERSION")))
            // Token endpoints answer directly; a redirect would carry credentials elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .https_only(!config.allow_plain_http)
            // reqwest would read the proxy variables itself; they were read once, in main.
            .no_proxy();
        for p in proxy.proxies(config.allow_plain_http)? {
            builder = builder.proxy(p);
        }
        let client = builder
            .build()
            .map_err(|e| HttpClientError::Build(describe_transport(&e)))?;
        Ok(Self {
            client,
            retries: config.retries,
            backoff: Duration::from_millis(250),
            timeout: config.timeout,
        })
    }

    /// The same client with a shorter first backoff, for tests that exercise retries.
    pub fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sends the request `build` makes, retrying timeouts, connection failures, 5xx and 429
    /// with backoff and jitter (a 429's or 503's `Retry-After` is honoured). Returns the body of
    /// a 2xx answer; any other answer is a [`CallError::Refused`] with the server's text, in
    /// which `secrets` (what the request carried) are redacted.
    pub(crate) async fn send(
        &self,
        source_name: &'static str,
        secrets: &[&Sensitive],
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, CallError> {
        let mut attempt = 0;
        loop {
            let request = build(&self.client)
                .build()
                .map_err(|e| CallError::Transport {
                    source_name,
                    endpoint: String::new(),
                    message: format!("cannot build the request: {}", describe_transport(&e)),
                })?;
            let endpoint = format!("{} {}", request.method(), endpoint_of(request.url()));
            let outcome = self.client.execute(request).await;
            let (retry_after, error) = match outcome {
                Ok(response) => {
                    let status = response.status();
                    let retry_after = retry_after(response.headers());
                    let body = match response.bytes().await {
                        Ok(b) => b.to_vec(),
                        Err(e) => {
                            let error = CallError::Transport {
                                source_name,
                                endpoint,
                                message: self.describe(&e),
                            };
                            if attempt < self.retries {
                                self.pause(attempt, None).await;
                                attempt += 1;
                                continue;
                            }
                            return Err(error);
                        }
                    };
                    if status.is_success() {
                        return Ok(body);
                    }
                    let error = CallError::Refused {
                        source_name,
                        endpoint,
                        status: status.as_u16(),
                        detail: describe_body(&body, secrets),
                    };
                    let retryable = status.is_server_error()
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS;
                    if !retryable {
                        return Err(error);
                    }
                    (retry_after, error)
                }
                // A request reqwest would not send (plain http where refused) fails the same way
                // each time.
                Err(e) if e.is_builder() => {
                    return Err(CallError::Transport {
                        source_name,
                        endpoint,
                        message: self.describe(&e),
                    })
                }
                Err(e) => (
                    None,
                    CallError::Transport {
                        source_name,
                        endpoint,
                        message: self.describe(&e),
                    },
                ),
            };
            if attempt >= self.retries {
                return Err(error);
            }
            tracing::debug!(source = source_name, attempt, error = %error, "token endpoint failed; retrying");
            self.pause(attempt, retry_after).await;
            attempt += 1;
        }
    }

    async fn pause(&self, attempt: u32, retry_after: Option<Duration>) {
        let wait = match retry_after {
            Some(d) => d.min(MAX_RETRY_AFTER),
            None => {
                let exp = self
                    .backoff
                    .saturating_mul(1u32 << attempt.min(16))
                    .min(MAX_BACKOFF);
                // Jitter in [½, 1): replicas and namespaces failing together spread out.
                exp.mul_f64(0.5 + fastrand::f64() / 2.0)
            }
        };
        tokio::time::sleep(wait).await;
    }

    fn describe(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            return format!("no answer within {}s", self.timeout.as_secs_f64());
        }
        let text = describe_transport(e);
        if text.contains("certificate") {
            // Behind a proxy that inspects TLS, the certificate is the proxy's, not the endpoint's.
            format!("{text} (the certificate must chain to the system's roots or to http.caFile)")
        } else if text.contains("tunnel error") {
            format!("through the proxy ($HTTPS_PROXY): {text}")
        } else if text.contains("URL scheme is not allowed") {
            "plain http is refused: use https, or set http.allowPlainHttp".into()
        } else {
            text
        }
    }
}

/// Parses a successful answer as `T`. The error says what was expected and where parsing
/// stopped, never the content (it may hold a token).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(
    source_name: &'static str,
    what: &str,
    body: &[u8],
) -> Result<T, CallError> {
    serde_json::from_slice(body).map_err(|e| CallError::Unusable {
        source_name,
        reason: format!(
            "the answer is not {what} ({:?} error at line {} column {})",
            e.classify(),
            e.line(),
            e.column()
        ),
    })
}

/// Scheme, host, port and path: the query may carry parameters that do not belong in logs.
fn endpoint_of(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    u.set_query(None);
    u.set_fragment(None);
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The cause chain of a transport error without reqwest's own top line (which holds the URL
/// and its query).
fn describe_transport(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    if parts.is_empty() {
        if e.is_connect() {
            "connection failed".into()
        } else if e.is_body() || e.is_decode() {
            "reading the answer failed".into()
        } else {
            "request failed".into()
        }
    } else {
        parts.dedup();
        parts.join(": ")
    }
}

/// What an error answer said, fit for logs and Events: the `error`/`error_description`/`message`
/// of a JSON body when there is one, else the text; whitespace collapsed, cut to
/// `DETAIL_CHARS`, the request's secrets and anything token-like redacted.
pub(crate) fn describe_body(body: &[u8], secrets: &[&Sensitive]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(json) => summarise_json(&json).unwrap_or_else(|| text.to_string()),
        Err(_) => summarise_xml(&text).unwrap_or_else(|| text.to_string()),
    };
    let mut text = text;
    for s in secrets {
        if !s.expose().is_empty() {
            text = text.replace(s.expose(), "<redacted>");
        }
    }
    let words: Vec<String> = text.split_whitespace().map(redact_word).collect();
    let text = words.join(" ");
    if text.is_empty() {
        return "(empty answer)".into();
    }
    match text.char_indices().nth(DETAIL_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

fn summarise_json(json: &serde_json::Value) -> Option<String> {
    let field =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
    // RFC 6749/8693 errors, Google's {"error": {"message": ...}}, AWS/Quay {"message"}/{"error_message"},
    // Alibaba's {"Code", "Message"}.
    let nested = json.get("error").filter(|e| e.is_object());
    let parts: Vec<String> = [
        field(json, "error"),
        field(json, "error_description"),
        nested.and_then(|e| field(e, "status")),
        nested.and_then(|e| field(e, "message")),
        field(json, "Code"),
        field(json, "message").or_else(|| field(json, "Message")),
        field(json, "error_message"),
        field(json, "__type"),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!parts.is_empty()).then(|| parts.join(": "))
}

/// AWS query APIs (STS) answer errors as `<Error><Code>…</Code><Message>…</Message></Error>`.
fn summarise_xml(text: &str) -> Option<String> {
    let parts: Vec<String> = [xml_text(text, "Code"), xml_text(text, "Message")]
        .into_iter()
        .flatten()
        .collect();
    (!parts.is_empty()).then(|| parts.join(": "))
}

/// The text of the first `<tag>` element, XML entities decoded. STS answers, the only XML any
/// token source reads, are small and flat.
pub(crate) fn xml_text(doc: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = doc.find(&open)? + open.len();
    let end = start + doc[start..].find(&format!("</{tag}>"))?;
    let text = doc[start..end].trim();
    Some(
        text.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// A JWT (three base64url parts, the first starting `eyJ`) or a long run of token characters
/// (an opaque access token) is replaced.
fn redact_word(word: &str) -> String {
    let core: String = word
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.=+/~".contains(*c))
        .collect();
    let jwt_like = core.contains("eyJ") && core.matches('.').count() >= 2;
    let opaque = core.len() >= 40
        && core.chars().filter(|c| c.is_ascii_alphanumeric()).count() * 10 >= core.len() * 9;
    if jwt_like || opaque {
        "<redacted>".into()
    } else {
        word.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_summarised_and_redacted() {
        let secret = Sensitive::new("subject-token-value");
        let d = describe_body(br#"{"error":"invalid_grant","error_description":"token subject-token-value is expired"}"#, &[&secret]);
        assert_eq!(d, "invalid_grant: token <redacted> is expired");
        let d = describe_body(
            br#"{"error":{"code":400,"message":"Invalid value","status":"INVALID_ARGUMENT"}}"#,
            &[],
        );
        assert_eq!(d, "INVALID_ARGUMENT: Invalid value");
        let d = describe_body(
            br#"{"RequestId":"3D57","Code":"InvalidParameter.OIDCToken","Message":"token expired"}"#,
            &[],
        );
        assert_eq!(d, "InvalidParameter.OIDCToken: token expired");
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
        let d = describe_body(
            format!("<html>\n  denied for {jwt}\n</html>").as_bytes(),
            &[],
        );
        assert_eq!(d, "<html> denied for <redacted> </html>");
        let opaque = "A".repeat(30) + &"b9".repeat(10);
        assert_eq!(
            describe_body(format!("bad token {opaque}").as_bytes(), &[]),
            "bad token <redacted>"
        );
        assert_eq!(describe_body(b"  ", &[]), "(empty answer)");
        let xml = b"<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>No OpenIDConnect provider found</Message></Error></ErrorResponse>";
        assert_eq!(
            describe_body(xml, &[]),
            "InvalidIdentityToken: No OpenIDConnect provider found"
        );
        // Entities are decoded before redaction, so a secret the answer escaped is still caught.
        let escaped = Sensitive::new("s3cr&t");
        let xml = b"<Error><Code>AccessDenied</Code><Message>key s3cr&amp;t &lt;revoked&gt;</Message></Error>";
        assert_eq!(
            describe_body(xml, &[&escaped]),
            "AccessDenied: key <redacted> <revoked>"
        );
        let long = "word ".repeat(200);
        let d = describe_body(long.as_bytes(), &[]);
        assert_eq!(d.chars().count(), DETAIL_CHARS + 1, "{d}");
        assert!(d.ends_with('…'));
    }

    #[tokio::test]
    async fn plain_http_is_refused_before_connecting_unless_allowed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let client = HttpClient::new(&HttpConfig::default(), &ProxyEnv::default()).unwrap();
        let secret = Sensitive::new("sa");
        let e = client
            .send("declarative", &[&secret], |c| c.post(&url))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("plain http is refused"), "{e}");
        assert!(
            listener.accept().is_err(),
            "no connection was made, and none retried"
        );
        let allowed = HttpConfig {
            allow_plain_http: true,
            retries: 0,
            ..Default::default()
        };
        let client = HttpClient::new(&allowed, &ProxyEnv::default()).unwrap();
        let call =
            tokio::spawn(async move { client.send("declarative", &[], |c| c.post(&url)).await });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while listener.accept().is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "allowed, yet no connection"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        call.abort();
    }

    #[test]
    fn proxy_urls_are_checked_without_showing_their_password() {
        let with = |url: &str| ProxyEnv {
            https_proxy: Some(url.into()),
            ..Default::default()
        };
        let config = HttpConfig::default();
        assert!(
            HttpClient::new(&config, &with("proxy.corp:3128")).is_ok(),
            "no scheme: http"
        );
        assert!(HttpClient::new(&config, &with("http://u:p@proxy.corp:3128")).is_ok());
        let e = HttpClient::new(&config, &with("socks5://u:s3cret@proxy.corp:1080"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("$HTTPS_PROXY: ") && !e.contains("s3cret"),
            "{e}"
        );
        let e = HttpClient::new(&config, &with("http://u:s3cret@proxy corp:3128"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("$HTTPS_PROXY: ") && !e.contains("s3cret"),
            "{e}"
        );
    }

    #[test]
    fn endpoints_lose_query_and_userinfo() {
        let u =
            reqwest::Url::parse("https://user:pw@issuer.example/sts/exchange?identity=abc&aud=x#f")
                .unwrap();
        assert_eq!(endpoint_of(&u), "https://issuer.example/sts/exchange");
    }

    #[test]
    fn malformed_json_errors_do_not_echo_content() {
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct T {
            expires_in: u64,
        }
        let e = parse_json::<T>(
            "tokenExchange",
            "a token response",
            br#"{"expires_in":"secret-ish-value"}"#,
        )
        .unwrap_err();
        let text = e.to_string();
        assert!(!text.contains("secret-ish-value"), "{text}");
        assert!(text.contains("not a token response"), "{text}");
    }
}
