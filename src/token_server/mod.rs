//! `pull-secret-injector token-server`: a Docker Registry v2 token service (the "token" auth
//! scheme of distribution/registry, Harbor and Zot) that trusts the cluster's service-account
//! tokens, so the `kubernetes` source's credentials pull from a registry you run.
//!
//! A request goes `server` (HTTP, Basic auth) → `oidc` (verify the JWT against the cluster's
//! issuer) → `rules` (which of the requested scopes this identity gets) → `issue` (sign a
//! short-lived registry token).

pub(crate) mod issue;
pub mod oidc;
pub(crate) mod review;
pub(crate) mod rules;
pub mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{parse_yaml, read_yaml, ConfigError, FieldError, TlsConfig};

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenServerConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The HTTPS certificate clients (docker, containerd, skopeo) see.
    pub tls: TlsConfig,
    pub issuer: oidc::IssuerConfig,
    /// The registry's `service` (its `auth.token.service`); tokens carry it as `aud`.
    pub service: String,
    pub signing: SigningConfig,
    /// How long an issued registry token lasts.
    #[serde(
        default = "default_lifetime",
        deserialize_with = "crate::core::duration::field"
    )]
    pub token_lifetime: Duration,
    /// Clock skew tolerated on `exp` and `nbf` of service-account tokens.
    #[serde(
        default = "default_leeway",
        deserialize_with = "crate::core::duration::field"
    )]
    pub leeway: Duration,
    pub rules: Vec<rules::Rule>,
    /// Each verified token is confirmed with the API server (so deleting a ServiceAccount
    /// revokes its tokens here within `cacheFor`).
    #[serde(default)]
    pub token_review: review::TokenReviewConfig,
    /// A client gets this long to complete its TLS handshake.
    #[serde(
        default = "crate::config::default_handshake_timeout",
        deserialize_with = "crate::core::duration::field"
    )]
    pub handshake_timeout: Duration,
    /// A client gets this long for each request's headers, and the whole request.
    #[serde(
        default = "crate::config::default_read_timeout",
        deserialize_with = "crate::core::duration::field"
    )]
    pub read_timeout: Duration,
    /// A connection with no request in progress for this long is closed.
    #[serde(
        default = "crate::config::default_idle_timeout",
        deserialize_with = "crate::core::duration::field"
    )]
    pub idle_timeout: Duration,
    /// Connections past their TLS handshake at once; further ones are closed, with a log line.
    #[serde(default = "crate::config::default_max_connections")]
    pub max_connections: usize,
    /// Connections from one IP address at once, handshakes included. Default: half of
    /// `maxConnections`.
    #[serde(default)]
    pub max_connections_per_peer: Option<usize>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SigningConfig {
    /// PEM certificate chain the registry trusts (`rootcertbundle`), leaf first.
    pub cert_file: PathBuf,
    /// The leaf's P-256 key, PEM PKCS#8.
    pub key_file: PathBuf,
    /// `iss` of the tokens: the registry's `auth.token.issuer`.
    #[serde(default = "default_token_issuer")]
    pub issuer: String,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 5001))
}

fn default_lifetime() -> Duration {
    Duration::from_secs(300)
}

fn default_leeway() -> Duration {
    Duration::from_secs(10)
}

fn default_token_issuer() -> String {
    "pull-secret-injector".into()
}

impl TokenServerConfig {
    /// The server's connection limits, defaults resolved.
    pub(crate) fn connection_limits(&self) -> crate::connections::Limits {
        crate::connections::Limits {
            max_connections: self.max_connections,
            max_connections_per_peer: self
                .max_connections_per_peer
                .unwrap_or_else(|| crate::connections::default_per_peer(self.max_connections)),
            handshake_timeout: self.handshake_timeout,
            idle_timeout: self.idle_timeout,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Self::validated(read_yaml(path)?)
    }

    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        Self::validated(parse_yaml(text)?)
    }

    fn validated(config: Self) -> Result<Self, ConfigError> {
        let mut errors = Vec::new();
        let mut err = |path: &str, message: String| {
            errors.push(FieldError {
                path: path.into(),
                message,
            })
        };
        if config.issuer.audiences.iter().all(|a| a.trim().is_empty()) {
            err(
                "issuer.audiences",
                "at least one audience is required".into(),
            );
        }
        crate::sources::validate_endpoint("issuer.url", &config.issuer.url, false, &mut err);
        if let Some(u) = &config.issuer.jwks_uri {
            crate::sources::validate_endpoint("issuer.jwksUri", u, false, &mut err);
        }
        if config.service.trim().is_empty() {
            err("service", "must not be empty".into());
        }
        if config.token_lifetime < Duration::from_secs(30)
            || config.token_lifetime > Duration::from_secs(3600)
        {
            err("tokenLifetime", "must be between 30s and 1h".into());
        }
        if config.token_review.enabled {
            crate::sources::validate_endpoint(
                "tokenReview.url",
                &config.token_review.url,
                false,
                &mut err,
            );
            if config.token_review.cache_for > Duration::from_secs(300) {
                err("tokenReview.cacheFor", "must be at most 5m".into());
            }
        }
        if config.read_timeout.is_zero() {
            err("readTimeout", "must be more than 0s".into());
        }
        if config.idle_timeout.is_zero() {
            err("idleTimeout", "must be more than 0s".into());
        }
        if config.max_connections == 0 {
            err("maxConnections", "must be at least 1".into());
        }
        if let Some(m) = crate::connections::check_per_peer(
            config.max_connections_per_peer,
            config.max_connections,
            "maxConnections",
        ) {
            err("maxConnectionsPerPeer", m);
        }
        if let Some(m) = crate::connections::check_handshake_timeout(config.handshake_timeout) {
            err("handshakeTimeout", m);
        }
        if config.leeway > Duration::from_secs(300) {
            err("leeway", "must be at most 5m".into());
        }
        for (i, r) in config.rules.iter().enumerate() {
            if r.repositories.is_empty() {
                err(
                    &format!("rules[{i}].repositories"),
                    "must list at least one repository pattern".into(),
                );
            }
            for p in &r.repositories {
                if !valid_pattern(p) {
                    err(
                        &format!("rules[{i}].repositories"),
                        format!("{p:?}: use `name`, `prefix/*` or `*`"),
                    );
                }
            }
            for a in &r.actions {
                if !["pull", "push", "delete", "*"].contains(&a.as_str()) {
                    err(
                        &format!("rules[{i}].actions"),
                        format!("{a:?} is not pull, push, delete or *"),
                    );
                }
            }
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

impl TokenServerConfig {
    /// What keeps this config from working on this machine, as far as can be seen without
    /// starting (`check-config --kind token-server`): files it names that cannot be read, and a
    /// TokenReview host that does not resolve here. Start-up asks the API server itself.
    pub fn problems_here(&self) -> Vec<FieldError> {
        let mut problems = Vec::new();
        let files = [
            ("tls.certFile", Some(&self.tls.cert_file)),
            ("tls.keyFile", Some(&self.tls.key_file)),
            ("signing.certFile", Some(&self.signing.cert_file)),
            ("signing.keyFile", Some(&self.signing.key_file)),
            ("issuer.caFile", self.issuer.ca_file.as_ref()),
            ("issuer.tokenFile", self.issuer.token_file.as_ref()),
        ];
        for (path, file) in files {
            let Some(file) = file else { continue };
            if let Err(e) = std::fs::File::open(file) {
                problems.push(FieldError {
                    path: path.into(),
                    message: format!("cannot read {}: {e}", file.display()),
                });
            }
        }
        if self.token_review.enabled {
            if let Some(host) = unresolvable_host(&self.token_review.url) {
                problems.push(FieldError {
                    path: "tokenReview.url".into(),
                    message: format!("{host} does not resolve here; {}", review::SET_URL),
                });
            }
        }
        problems
    }
}

/// The host of `url` when it has one that does not resolve from this machine.
fn unresolvable_host(url: &str) -> Option<String> {
    use std::net::ToSocketAddrs;
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?.to_owned();
    let port = url.port_or_known_default()?;
    let resolves = (host.as_str(), port)
        .to_socket_addrs()
        .is_ok_and(|mut addrs| addrs.next().is_some());
    (!resolves).then_some(host)
}

/// `name`, `prefix/*` or `*`: a `*` only as a whole last segment.
fn valid_pattern(p: &str) -> bool {
    match p.strip_suffix("/*") {
        _ if p == "*" => true,
        Some(prefix) => !prefix.is_empty() && !prefix.contains('*'),
        None => !p.is_empty() && !p.contains('*'),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
tls: {certFile: t.crt, keyFile: t.key}
issuer: {url: "https://kubernetes.default.svc.cluster.local", audiences: [registry.test]}
service: registry.test
signing: {certFile: s.crt, keyFile: s.key}
rules:
  - {namespace: team-a, repositories: ["team-a/*", "shared/*"]}
"#;

    #[test]
    fn the_documented_example_parses() {
        let c =
            TokenServerConfig::from_yaml(include_str!("../../deploy/token-server.example.yaml"))
                .unwrap();
        assert_eq!(c.rules.len(), 2);
        assert_eq!(c.rules[1].actions, ["pull", "push"]);
    }

    #[test]
    fn defaults_and_errors_with_paths() {
        let c = TokenServerConfig::from_yaml(GOOD).unwrap();
        assert_eq!(c.token_lifetime, Duration::from_secs(300));
        assert_eq!(c.signing.issuer, "pull-secret-injector");
        assert_eq!(c.rules[0].actions, ["pull"]);
        let bad = GOOD
            .replace("[registry.test]", "[]")
            .replace("\"team-a/*\"", "\"te*m\"")
            + "tokenLifetime: 2h\n";
        let e = TokenServerConfig::from_yaml(&bad).unwrap_err().to_string();
        for path in [
            "issuer.audiences: ",
            "tokenLifetime: ",
            "rules[0].repositories: ",
        ] {
            assert!(e.contains(path), "{path} in {e}");
        }
        let limits = c.connection_limits();
        assert_eq!(
            (limits.max_connections_per_peer, limits.handshake_timeout),
            (256, Duration::from_secs(3))
        );
        let e = TokenServerConfig::from_yaml(
            &(GOOD.to_string()
                + "maxConnections: 4\nmaxConnectionsPerPeer: 5\nhandshakeTimeout: 2m\n"),
        )
        .unwrap_err()
        .to_string();
        for path in ["maxConnectionsPerPeer: ", "handshakeTimeout: "] {
            assert!(e.contains(path), "{path} in {e}");
        }
        let e = TokenServerConfig::from_yaml(&GOOD.replace("service:", "servce:"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("servce"), "{e}");
    }

    /// Issue 22: `check-config --kind token-server` names what cannot work here: the in-cluster
    /// TokenReview name outside a cluster, and files that are not there.
    #[test]
    fn problems_here_name_the_field_and_what_to_set() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, "x").unwrap();
            path.display().to_string()
        };
        let good = GOOD
            .replace("t.crt", &file("t.crt"))
            .replace("t.key", &file("t.key"))
            .replace("s.crt", &file("s.crt"))
            .replace("s.key", &file("s.key"));
        let here = good.clone() + "tokenReview: {url: \"https://127.0.0.1:6443\"}\n";
        let config = TokenServerConfig::from_yaml(&here).unwrap();
        assert!(config.problems_here().is_empty());
        // `.invalid` never resolves (RFC 6761), like the in-cluster default outside a cluster.
        let away = good.replace(&file("s.key"), "/nonexistent/s.key")
            + "tokenReview: {url: \"https://kubernetes.default.svc.invalid\"}\n";
        let problems = TokenServerConfig::from_yaml(&away).unwrap().problems_here();
        let text: Vec<String> = problems
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect();
        assert_eq!(problems.len(), 2, "{text:?}");
        assert!(
            text[0].starts_with("signing.keyFile: cannot read /nonexistent/s.key"),
            "{text:?}"
        );
        assert!(text[1].starts_with("tokenReview.url: kubernetes.default.svc.invalid does not resolve here; set tokenReview.url"), "{text:?}");
        let off = TokenServerConfig::from_yaml(
            &(good + "tokenReview: {enabled: false, url: \"https://x.invalid\"}\n"),
        )
        .unwrap();
        assert!(off.problems_here().is_empty());
    }
}
