//! The configuration file: its shape, its defaults and its validation.
//!
//! Parsing reports the path of the field that failed (`registries[0].kubernetes.audience`), and
//! validation collects every problem at once so that an operator fixes the file in one pass.

pub(crate) mod updater;

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use serde::{Deserialize, Deserializer};

use crate::core::names::validate_dns_subdomain;

use crate::sources::TokenSourceConfig;

/// The label a namespace carries to opt in, as the default selector uses it.
pub(crate) const OPT_IN_LABEL: &str = "pull-secret-injector.io/inject";

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    /// Address of the HTTPS listener (admission, health and readiness).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    pub tls: TlsConfig,
    /// Namespaces that opted in. Never empty: an empty selector would select every namespace.
    #[serde(default = "default_selector")]
    pub namespace_selector: LabelSelector,
    /// Name of the pull Secret kept in every opted-in namespace.
    #[serde(default = "default_secret_name")]
    pub secret_name: String,
    /// The namespace the service runs in; it is never injected. Defaults to `$POD_NAMESPACE`.
    #[serde(default)]
    pub own_namespace: Option<String>,
    /// More namespaces that are never injected, whatever their labels (`kube-system` always is).
    #[serde(default)]
    pub excluded_namespaces: Vec<String>,
    #[serde(default)]
    pub refresh: RefreshConfig,
    /// How hard the service may press the API server.
    #[serde(default)]
    pub api_server: ApiServerConfig,
    #[serde(default)]
    pub admission: AdmissionConfig,
    /// With several replicas: only the holder of this Lease refreshes. Absent: this process
    /// always refreshes (a single replica).
    #[serde(default)]
    pub leader_election: Option<LeaderElectionConfig>,
    /// Which Pods get the Secret: `always` (every Pod, and ServiceAccounts) or `matchingImages`
    /// (only Pods with an image on a registry the namespace gets; ServiceAccounts are left alone,
    /// since the API server would copy their list into every Pod).
    #[serde(default)]
    pub inject: InjectMode,
    /// `namespace` (one Secret per namespace, minted for the configured ServiceAccount) or
    /// `serviceAccount` (one Secret per ServiceAccount, `<sa>-<secretName>`, minted for it).
    #[serde(default)]
    pub identity_scope: crate::core::subject::IdentityScope,
    /// What is done to ServiceAccounts: `patch` (the default: the reference added at their
    /// admission and to existing ones), `apply` (for ServiceAccounts managed by GitOps: not at
    /// admission; added to existing ones by server-side apply as field manager
    /// `pull-secret-injector`) or `never` (only Pods get the reference). docs/gitops.md.
    #[serde(default)]
    pub service_accounts: crate::core::accounts::ServiceAccountMode,
    /// Compatibility with chainguard's pull-secret-updater (annotated Secrets in any namespace).
    #[serde(default)]
    pub pull_secret_updater: Option<updater::UpdaterConfig>,
    /// How exchanging token sources reach their endpoints.
    #[serde(default)]
    pub http: crate::http::HttpConfig,
    /// What is done about Pods of opted-in namespaces admitted without the Secret that cannot
    /// pull: reported (the default), or evicted so that their controller recreates them.
    #[serde(default)]
    pub remediation: RemediationConfig,
    pub registries: Vec<RegistryConfig>,
}

/// See [`RemediationConfig::mode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum RemediationMode {
    /// Counted and told with an Event; never changed.
    #[default]
    Report,
    /// Also evicted (Eviction API, PodDisruptionBudgets respected) once the namespace's Secret
    /// exists, when in `ErrImagePull`/`ImagePullBackOff` and owned by a ReplicaSet,
    /// StatefulSet, DaemonSet or Job. A bare Pod is never evicted.
    EvictStuckPods,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RemediationConfig {
    #[serde(default)]
    pub mode: RemediationMode,
    /// Evictions a minute at most, from this service as a whole (the leader). Default 10.
    #[serde(default = "default_max_evictions_per_minute")]
    pub max_evictions_per_minute: f64,
    /// Evictions at once after a quiet spell. Default 3.
    #[serde(default = "default_eviction_burst")]
    pub eviction_burst: u32,
}

fn default_max_evictions_per_minute() -> f64 {
    10.0
}

fn default_eviction_burst() -> u32 {
    3
}

impl Default for RemediationConfig {
    fn default() -> Self {
        Self {
            mode: RemediationMode::default(),
            max_evictions_per_minute: default_max_evictions_per_minute(),
            eviction_burst: default_eviction_burst(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum InjectMode {
    #[default]
    Always,
    MatchingImages,
}

/// See [`AdmissionConfig::mode`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AdmissionMode {
    #[default]
    Webhook,
    Policy,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LeaderElectionConfig {
    #[serde(default = "default_lease_name")]
    pub lease_name: String,
    /// Where the Lease lives. Default: `ownNamespace`.
    #[serde(default)]
    pub namespace: Option<String>,
    /// How long a Lease holds without renewal: the longest hand-over after a leader dies.
    #[serde(
        default = "default_lease_duration",
        deserialize_with = "crate::core::duration::field"
    )]
    pub lease_duration: Duration,
    /// The holder renews this long before its Lease would expire.
    #[serde(
        default = "default_renew_grace",
        deserialize_with = "crate::core::duration::field"
    )]
    pub renew_grace: Duration,
}

fn default_lease_name() -> String {
    "pull-secret-injector".into()
}

fn default_lease_duration() -> Duration {
    Duration::from_secs(15)
}

fn default_renew_grace() -> Duration {
    Duration::from_secs(5)
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RefreshConfig {
    /// Renew a credential when less than this remains. Default: a third of its lifetime.
    #[serde(default, deserialize_with = "crate::core::duration::optional_field")]
    pub renew_before: Option<Duration>,
    /// The ceiling of mints per second from this replica, so that many Secrets falling due
    /// together (a restart after an outage, thousands of namespaces) never flood the API server
    /// or a registry. Below it the pace follows what the Secrets kept need (at least 20/s).
    /// Default 100.
    #[serde(default = "default_max_mints_per_second")]
    pub max_mints_per_second: f64,
}

fn default_max_mints_per_second() -> f64 {
    100.0
}

impl Default for RefreshConfig {
    fn default() -> Self {
        Self {
            renew_before: None,
            max_mints_per_second: default_max_mints_per_second(),
        }
    }
}

/// The service's requests to the API server, all of them (watches, reads, TokenRequests,
/// writes, Events), over one client per process.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiServerConfig {
    /// Requests per second on average, at most. Each renewal takes two (a TokenRequest and a
    /// write), so this must be at least twice `refresh.maxMintsPerSecond`. Default 250.
    #[serde(default = "default_qps")]
    pub qps: f64,
    /// Requests that may go at once, above that rate, after a quieter spell. Default 500.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_qps() -> f64 {
    250.0
}

fn default_burst() -> u32 {
    500
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        Self {
            qps: default_qps(),
            burst: default_burst(),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Who adds the Secret to Pods and ServiceAccounts at admission: this service's webhook
    /// (`webhook`, the default) or the API server itself through the shipped
    /// MutatingAdmissionPolicies (`policy`, Kubernetes 1.36+). The install reads the same value
    /// to pick what it ships; the service serves `/mutate` and refreshes either way.
    #[serde(default)]
    pub mode: AdmissionMode,
    /// The longest an admission waits for a credential before it answers anyway.
    #[serde(
        default = "default_budget",
        deserialize_with = "crate::core::duration::field"
    )]
    pub budget: Duration,
    /// Request bodies larger than this are refused with 413.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: usize,
    /// A client gets this long to complete its TLS handshake; a slower one is disconnected.
    #[serde(
        default = "default_handshake_timeout",
        deserialize_with = "crate::core::duration::field"
    )]
    pub handshake_timeout: Duration,
    /// A client gets this long to send a request's headers, and again its body; a slower one is
    /// disconnected (headers) or answered 408 (body), so it cannot hold a connection open.
    #[serde(
        default = "default_read_timeout",
        deserialize_with = "crate::core::duration::field"
    )]
    pub read_timeout: Duration,
    /// A connection with no request in progress for this long is closed (before its first
    /// request and between requests, HTTP/1 and HTTP/2).
    #[serde(
        default = "default_idle_timeout",
        deserialize_with = "crate::core::duration::field"
    )]
    pub idle_timeout: Duration,
    /// Connections past their TLS handshake at once; further ones are closed, with a log line.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections from one IP address at once, handshakes included. Default: half of
    /// `maxConnections`, so one peer never takes them all.
    #[serde(default)]
    pub max_connections_per_peer: Option<usize>,
    /// Bytes of request bodies held at once, over all connections and streams: a request that
    /// would go over waits for room up to `readTimeout`, then gets 503. Bytes are counted as
    /// they arrive, not as declared.
    #[serde(default = "default_max_bytes_in_flight")]
    pub max_bytes_in_flight: usize,
    /// Of those, what the requests of one IP address may hold at once. Default: half of
    /// `maxBytesInFlight`, at least `maxBodyBytes`.
    #[serde(default)]
    pub max_bytes_in_flight_per_peer: Option<usize>,
    /// After SIGTERM the server keeps answering this long before it stops accepting: the API
    /// server learns of a terminating Pod's endpoint only after a moment, and a review it sends
    /// to a closed port is an unpatched Pod (`failurePolicy: Ignore`).
    #[serde(
        default = "default_shutdown_delay",
        deserialize_with = "crate::core::duration::field"
    )]
    pub shutdown_delay: Duration,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            mode: AdmissionMode::default(),
            budget: default_budget(),
            max_body_bytes: default_max_body_bytes(),
            handshake_timeout: default_handshake_timeout(),
            read_timeout: default_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_connections_per_peer: None,
            max_bytes_in_flight: default_max_bytes_in_flight(),
            max_bytes_in_flight_per_peer: None,
            shutdown_delay: default_shutdown_delay(),
        }
    }
}

impl AdmissionConfig {
    /// The webhook's connection limits, defaults resolved.
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

    /// `maxBytesInFlightPerPeer`, its default resolved.
    pub(crate) fn bytes_in_flight_per_peer(&self) -> usize {
        self.max_bytes_in_flight_per_peer.unwrap_or_else(|| {
            (self.max_bytes_in_flight / 2)
                .max(self.max_body_bytes)
                .min(self.max_bytes_in_flight)
        })
    }
}

fn default_shutdown_delay() -> Duration {
    Duration::from_secs(5)
}

/// A handshake takes milliseconds; this leaves room for a loaded machine, and bounds how long
/// a socket that never starts TLS holds a slot.
pub(crate) fn default_handshake_timeout() -> Duration {
    Duration::from_secs(3)
}

pub(crate) fn default_read_timeout() -> Duration {
    Duration::from_secs(10)
}

pub(crate) fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}

pub(crate) fn default_max_connections() -> usize {
    512
}

fn default_max_bytes_in_flight() -> usize {
    // Eight of the largest bodies the API server sends: about 32 MiB, far below the memory limit.
    8 * default_max_body_bytes()
}

/// One `auths` entry of the pull Secret and the source its credential is minted from:
/// `{host: ..., <source>: {...}}`, exactly one source per entry.
#[derive(Clone, Debug)]
pub struct RegistryConfig {
    /// The key in `.dockerconfigjson` `auths`, e.g. `registry.example.com` or `ghcr.io:443`.
    pub host: String,
    pub source: TokenSourceConfig,
}

// By hand rather than `#[serde(flatten)]`: flattening loses the path of an error inside the
// source and accepts unknown keys silently.
impl<'de> Deserialize<'de> for RegistryConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entry;
        impl<'de> serde::de::Visitor<'de> for Entry {
            type Value = RegistryConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a registry: {host: ..., <token source>: {...}}")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RegistryConfig, A::Error> {
                use serde::de::Error;
                let (mut host, mut source) = (None, None);
                while let Some(key) = map.next_key::<String>()? {
                    if key == "host" {
                        host = Some(map.next_value()?);
                    } else if source.is_some() {
                        return Err(A::Error::custom(format!(
                            "{key:?}: a registry takes exactly one token source"
                        )));
                    } else {
                        source = Some(TokenSourceConfig::from_entry(&key, &mut map)?);
                    }
                }
                Ok(RegistryConfig {
                    host: host.ok_or_else(|| A::Error::missing_field("host"))?,
                    source: source.ok_or_else(|| {
                        A::Error::custom(format!(
                            "no token source: expected one of {}",
                            TokenSourceConfig::NAMES.join(", ")
                        ))
                    })?,
                })
            }
        }
        d.deserialize_map(Entry)
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}

fn default_selector() -> LabelSelector {
    LabelSelector {
        match_labels: Some([(OPT_IN_LABEL.to_string(), "enabled".to_string())].into()),
        match_expressions: None,
    }
}

fn default_secret_name() -> String {
    "pull-secret".to_string()
}

fn default_budget() -> Duration {
    Duration::from_secs(2)
}

fn default_max_body_bytes() -> usize {
    // The API server caps request bodies at 3 MiB; an AdmissionReview embeds the object.
    4 * 1024 * 1024
}

/// A problem with the configuration, with the path of the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config: {0}")]
    Parse(FieldError),
    #[error("config is invalid:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

/// Reads a YAML file into `T`, naming the file when it cannot be read.
pub(crate) fn read_yaml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_yaml(&text)
}

/// Parses a YAML document into `T`; an error names the path of the field that failed
/// (`registries[0].kubernetes.audience`).
pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." {
            "(top level)".to_string()
        } else {
            path
        };
        let message = e.into_inner().to_string();
        // serde_yaml may already start its message with the path.
        let message = message
            .strip_prefix(&format!("{path}: "))
            .map(str::to_string)
            .unwrap_or(message);
        ConfigError::Parse(FieldError { path, message })
    })
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let config: Config = read_yaml(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates a YAML document.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Config = parse_yaml(text)?;
        config.validate()?;
        Ok(config)
    }

    /// The audiences of the TokenRequests this service makes, one per registry whose source
    /// asks the API server for a token (not those reading a token file), in config order and
    /// each once. The shipped self-fencing policy allows exactly these.
    pub fn token_audiences(&self) -> Vec<String> {
        let mut audiences: Vec<String> = Vec::new();
        for r in &self.registries {
            let audience = r.source.token_audience();
            if !r.source.uses_token_file() && !audiences.contains(&audience) {
                audiences.push(audience);
            }
        }
        audiences
    }

    /// The ServiceAccounts this service's TokenRequests are for with one Secret per namespace,
    /// in config order and each once: the only ones the shipped RBAC lets it request tokens
    /// for (`resourceNames`). Empty when every source reads a token file.
    pub fn token_service_accounts(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (name, _) in self
            .registries
            .iter()
            .filter_map(|r| r.source.token_request())
        {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
        names
    }

    /// The longest lifetime, in seconds, any of this service's TokenRequests asks for: the
    /// shipped self-fencing policy refuses longer ones. 0 when every source reads a token file.
    pub fn max_token_seconds(&self) -> i64 {
        self.registries
            .iter()
            .filter_map(|r| r.source.token_request())
            .map(|(_, seconds)| seconds)
            .max()
            .unwrap_or(0)
    }

    /// Checks what types alone cannot express; reports every problem found.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut err = |path: &str, message: String| {
            errors.push(FieldError {
                path: path.to_string(),
                message,
            })
        };

        if let Err(m) = validate_dns_subdomain(&self.secret_name) {
            err("secretName", m);
        }
        crate::core::namespaces::validate(&self.namespace_selector, "namespaceSelector", &mut err);
        if self.admission.budget.is_zero() || self.admission.budget > Duration::from_secs(25) {
            err(
                "admission.budget",
                "must be more than 0s and at most 25s (webhook timeouts are capped at 30s)".into(),
            );
        }
        if self.admission.read_timeout.is_zero() {
            err("admission.readTimeout", "must be more than 0s".into());
        }
        if self.admission.max_body_bytes < 1024 {
            err("admission.maxBodyBytes", "must be at least 1024".into());
        }
        if self.admission.shutdown_delay > Duration::from_secs(60) {
            err(
                "admission.shutdownDelay",
                "must be at most 60s (the Pod's terminationGracePeriodSeconds must cover it)"
                    .into(),
            );
        }
        if self.admission.idle_timeout.is_zero() {
            err("admission.idleTimeout", "must be more than 0s".into());
        }
        if self.admission.max_connections == 0 {
            err("admission.maxConnections", "must be at least 1".into());
        }
        if let Some(m) = crate::connections::check_per_peer(
            self.admission.max_connections_per_peer,
            self.admission.max_connections,
            "admission.maxConnections",
        ) {
            err("admission.maxConnectionsPerPeer", m);
        }
        if let Some(m) =
            crate::connections::check_handshake_timeout(self.admission.handshake_timeout)
        {
            err("admission.handshakeTimeout", m);
        }
        if self.admission.max_bytes_in_flight < self.admission.max_body_bytes {
            err(
                "admission.maxBytesInFlight",
                "must be at least admission.maxBodyBytes".into(),
            );
        }
        if let Some(n) = self.admission.max_bytes_in_flight_per_peer {
            if n < self.admission.max_body_bytes || n > self.admission.max_bytes_in_flight {
                err(
                    "admission.maxBytesInFlightPerPeer",
                    "must be at least admission.maxBodyBytes and at most admission.maxBytesInFlight".into(),
                );
            }
        }
        if !(self.refresh.max_mints_per_second > 0.0
            && self.refresh.max_mints_per_second.is_finite())
        {
            err(
                "refresh.maxMintsPerSecond",
                "must be a number above 0".into(),
            );
        }
        if let Some(rb) = self.refresh.renew_before {
            if rb.is_zero() {
                err("refresh.renewBefore", "must be more than 0s".into());
            }
        }
        if !(self.api_server.qps > 0.0 && self.api_server.qps.is_finite()) {
            err("apiServer.qps", "must be a number above 0".into());
        } else if self.api_server.qps < 2.0 * self.refresh.max_mints_per_second {
            err(
                "apiServer.qps",
                format!(
                    "must be at least twice refresh.maxMintsPerSecond ({}): each renewal is a \
                     TokenRequest and a write",
                    self.refresh.max_mints_per_second
                ),
            );
        }
        let r = &self.remediation;
        if !(r.max_evictions_per_minute > 0.0 && r.max_evictions_per_minute <= 600.0) {
            err(
                "remediation.maxEvictionsPerMinute",
                "must be a number above 0 and at most 600".into(),
            );
        }
        if !(1..=100).contains(&r.eviction_burst) {
            err(
                "remediation.evictionBurst",
                "must be at least 1 and at most 100".into(),
            );
        }
        if self.api_server.burst == 0 {
            err("apiServer.burst", "must be at least 1".into());
        }
        if let Some(le) = &self.leader_election {
            if let Err(m) = validate_dns_subdomain(&le.lease_name) {
                err("leaderElection.leaseName", m);
            }
            if le.lease_duration.as_secs() < 2 {
                err("leaderElection.leaseDuration", "must be at least 2s".into());
            }
            if le.renew_grace.as_secs() < 1 || le.renew_grace >= le.lease_duration {
                err(
                    "leaderElection.renewGrace",
                    "must be at least 1s and shorter than leaseDuration".into(),
                );
            }
        }
        self.http.validate(&mut err);
        if self.identity_scope == crate::core::subject::IdentityScope::ServiceAccount {
            for (i, r) in self.registries.iter().enumerate() {
                if r.source.uses_token_file() {
                    err(
                        &format!("registries[{i}].{}.serviceAccountToken", r.source.name()),
                        "identityScope serviceAccount mints for each ServiceAccount: use fromNamespace, not a token file".into(),
                    );
                }
            }
        }
        if self.admission.mode == AdmissionMode::Policy && self.inject == InjectMode::MatchingImages
        {
            err(
                "inject",
                "matchingImages needs admission.mode webhook: which images match a registry is decided by the service, not by the shipped policies".into(),
            );
        }
        if self.service_accounts == crate::core::accounts::ServiceAccountMode::Apply
            && self.inject == InjectMode::MatchingImages
        {
            err(
                "serviceAccounts",
                "apply has nothing to apply with inject matchingImages, which leaves ServiceAccounts alone: use never (or leave it out)".into(),
            );
        }
        if let Some(u) = &self.pull_secret_updater {
            u.validate(self.http.allow_plain_http, &mut err);
        }
        let checks = crate::sources::Checks {
            renew_before: self.refresh.renew_before,
            allow_plain_http: self.http.allow_plain_http,
        };
        validate_registries(&self.registries, checks, &mut err);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

/// The `registries` list, wherever it is read (the service, the credential provider): at least
/// one, hosts without a scheme and listed once, each source valid.
pub(crate) fn validate_registries(
    registries: &[RegistryConfig],
    checks: crate::sources::Checks,
    err: &mut impl FnMut(&str, String),
) {
    if registries.is_empty() {
        err("registries", "at least one registry is required".into());
    }
    let mut hosts = BTreeSet::new();
    for (i, r) in registries.iter().enumerate() {
        let path = format!("registries[{i}]");
        if r.host.is_empty() || r.host.contains("://") || r.host.contains(char::is_whitespace) {
            err(
                &format!("{path}.host"),
                format!(
                    "{:?} must be a registry host such as registry.example.com, without a scheme",
                    r.host
                ),
            );
        } else if !hosts.insert(r.host.as_str()) {
            err(
                &format!("{path}.host"),
                format!("{:?} is listed twice", r.host),
            );
        }
        r.source.validate(&path, checks, err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
tls: {certFile: a.crt, keyFile: a.key}
registries:
  - host: registry.example.com
    kubernetes:
      audience: https://registry.example.com
"#;

    fn invalid(yaml: &str) -> Vec<FieldError> {
        match Config::from_yaml(yaml) {
            Err(ConfigError::Invalid(errors)) => errors,
            other => panic!("expected validation errors, got {other:?}"),
        }
    }

    fn parse_error(yaml: &str) -> FieldError {
        match Config::from_yaml(yaml) {
            Err(ConfigError::Parse(e)) => e,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(c.secret_name, "pull-secret");
        assert_eq!(c.admission.budget, Duration::from_secs(2));
        assert_eq!(c.refresh.renew_before, None);
        let labels = c.namespace_selector.match_labels.unwrap();
        assert_eq!(
            labels.get(OPT_IN_LABEL).map(String::as_str),
            Some("enabled")
        );
        let TokenSourceConfig::Kubernetes(k) = &c.registries[0].source else {
            panic!("not kubernetes")
        };
        assert_eq!(k.service_account, "default");
        assert_eq!(k.expiration_seconds, 3600);
    }

    #[test]
    fn api_server_limits_default_to_250_per_second_in_bursts_of_500_and_are_checked() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(
            c.api_server,
            ApiServerConfig {
                qps: 250.0,
                burst: 500
            }
        );
        let c = Config::from_yaml(&format!(
            "{MINIMAL}apiServer: {{qps: 5.5}}\nrefresh: {{maxMintsPerSecond: 2.75}}\n"
        ))
        .unwrap();
        assert_eq!((c.api_server.qps, c.api_server.burst), (5.5, 500));
        // Below two requests per mint at the ceiling: renewals would wait on the client.
        let errors = invalid(&format!("{MINIMAL}apiServer: {{qps: 150}}\n"));
        assert_eq!(errors[0].path, "apiServer.qps");
        assert!(errors[0]
            .message
            .contains("twice refresh.maxMintsPerSecond (100)"));
        for (value, path) in [
            ("{qps: 0}", "apiServer.qps"),
            ("{qps: -1}", "apiServer.qps"),
            ("{qps: .inf}", "apiServer.qps"),
            ("{qps: .nan}", "apiServer.qps"),
            ("{burst: 0}", "apiServer.burst"),
        ] {
            let errors = invalid(&format!("{MINIMAL}apiServer: {value}\n"));
            let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
            assert_eq!(paths, [path], "{value}");
        }
        assert_eq!(
            parse_error(&format!("{MINIMAL}apiServer: {{burst: -1}}\n")).path,
            "apiServer.burst"
        );
    }

    #[test]
    fn remediation_reports_by_default_and_its_rate_is_checked() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        assert_eq!(c.remediation.mode, RemediationMode::Report);
        assert_eq!(
            (
                c.remediation.max_evictions_per_minute,
                c.remediation.eviction_burst
            ),
            (10.0, 3)
        );
        let c = Config::from_yaml(&format!(
            "{MINIMAL}remediation: {{mode: evictStuckPods, maxEvictionsPerMinute: 0.5}}\n"
        ))
        .unwrap();
        assert_eq!(c.remediation.mode, RemediationMode::EvictStuckPods);
        assert_eq!(c.remediation.max_evictions_per_minute, 0.5);
        for (value, path) in [
            (
                "{maxEvictionsPerMinute: 0}",
                "remediation.maxEvictionsPerMinute",
            ),
            (
                "{maxEvictionsPerMinute: .nan}",
                "remediation.maxEvictionsPerMinute",
            ),
            (
                "{maxEvictionsPerMinute: 601}",
                "remediation.maxEvictionsPerMinute",
            ),
            ("{evictionBurst: 0}", "remediation.evictionBurst"),
            ("{evictionBurst: 101}", "remediation.evictionBurst"),
        ] {
            let errors = invalid(&format!("{MINIMAL}remediation: {value}\n"));
            let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
            assert_eq!(paths, [path], "{value}");
        }
        assert_eq!(
            parse_error(&format!(
                "{MINIMAL}remediation: {{mode: evictEverything}}\n"
            ))
            .path,
            "remediation.mode"
        );
    }

    #[test]
    fn connection_and_byte_limits_default_to_half_for_one_peer_and_are_checked() {
        let c = Config::from_yaml(MINIMAL).unwrap();
        let limits = c.admission.connection_limits();
        assert_eq!(
            (
                limits.max_connections,
                limits.max_connections_per_peer,
                limits.handshake_timeout
            ),
            (512, 256, Duration::from_secs(3))
        );
        assert_eq!(c.admission.bytes_in_flight_per_peer(), 16 << 20);
        // Never below one body, never above the budget.
        let c = Config::from_yaml(&format!(
            "{MINIMAL}admission: {{maxBodyBytes: 4096, maxBytesInFlight: 6000, maxConnections: 1}}\n"
        ))
        .unwrap();
        assert_eq!(c.admission.bytes_in_flight_per_peer(), 4096);
        assert_eq!(c.admission.connection_limits().max_connections_per_peer, 1);
        let paths: Vec<_> = invalid(&format!(
            "{MINIMAL}admission: {{maxConnections: 10, maxConnectionsPerPeer: 11, handshakeTimeout: 0s, maxBodyBytes: 4096, maxBytesInFlightPerPeer: 1024}}\n"
        ))
        .into_iter()
        .map(|e| e.path)
        .collect();
        assert_eq!(
            paths,
            [
                "admission.maxConnectionsPerPeer",
                "admission.handshakeTimeout",
                "admission.maxBytesInFlightPerPeer"
            ]
        );
    }

    #[test]
    fn the_documented_example_parses() {
        let c = Config::from_yaml(include_str!("../deploy/config.example.yaml")).unwrap();
        assert_eq!(c.refresh.renew_before, Some(Duration::from_secs(20 * 60)));
        assert_eq!(c.registries[0].host, "registry.example.com");
        let TokenSourceConfig::Kubernetes(k) = &c.registries[0].source else {
            panic!("not kubernetes")
        };
        assert_eq!(k.username.as_deref(), Some("oauth2accesstoken"));
    }

    #[test]
    fn a_misspelt_field_is_named_with_its_path() {
        let e = parse_error(&MINIMAL.replace("keyFile", "keyfile"));
        assert_eq!(e.path, "tls.keyfile");
        assert!(e.message.contains("unknown field"), "{e}");
        let e = parse_error(&MINIMAL.replace("audience:", "audiance:"));
        assert!(e.path.starts_with("registries[0]"), "{e}");
        assert!(e.message.contains("audiance"), "{e}");
    }

    #[test]
    fn a_wrong_type_is_named_with_its_path() {
        let e = parse_error(&format!("{MINIMAL}refresh: {{renewBefore: soon}}\n"));
        assert_eq!(e.path, "refresh.renewBefore");
        assert!(e.message.contains("not a duration"), "{e}");
        let e = parse_error(&MINIMAL.replace(
            "audience: https://registry.example.com",
            "audience: x\n      expirationSeconds: many",
        ));
        assert_eq!(e.path, "registries[0].kubernetes.expirationSeconds");
    }

    #[test]
    fn an_unknown_token_source_is_refused() {
        let e = parse_error(&MINIMAL.replace("kubernetes:", "kubernets:"));
        assert!(e.path.starts_with("registries[0]"), "{e}");
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once() {
        let yaml = r#"
tls: {certFile: a.crt, keyFile: a.key}
secretName: Pull_Secret
namespaceSelector: {}
refresh: {renewBefore: 2h}
registries:
  - host: https://registry.example.com
    kubernetes: {audience: "", expirationSeconds: 60}
  - host: registry.example.com
    kubernetes: {audience: a}
  - host: registry.example.com
    kubernetes: {audience: a}
"#;
        let paths: Vec<_> = invalid(yaml).into_iter().map(|e| e.path).collect();
        for expected in [
            "secretName",
            "namespaceSelector",
            "registries[0].host",
            "registries[0].kubernetes.audience",
            "registries[0].kubernetes.expirationSeconds",
            "registries[1].kubernetes.expirationSeconds",
            "registries[2].host",
        ] {
            assert!(
                paths.iter().any(|p| p == expected),
                "{expected} missing from {paths:?}"
            );
        }
    }

    #[test]
    fn leader_election_is_checked() {
        let yaml = format!(
            "{MINIMAL}ownNamespace: psi\nleaderElection: {{leaseDuration: 5s, renewGrace: 5s}}\n"
        );
        let paths: Vec<_> = invalid(&yaml).into_iter().map(|e| e.path).collect();
        assert_eq!(paths, ["leaderElection.renewGrace"]);
        let c = Config::from_yaml(&format!(
            "{MINIMAL}ownNamespace: psi\nleaderElection: {{}}\n"
        ))
        .unwrap();
        let le = c.leader_election.unwrap();
        assert_eq!(
            (
                le.lease_name.as_str(),
                le.lease_duration.as_secs(),
                le.renew_grace.as_secs()
            ),
            ("pull-secret-injector", 15, 5)
        );
    }

    #[test]
    fn inject_mode_parses() {
        let base = "tls: {certFile: a, keyFile: b}\nregistries: [{host: r.example, kubernetes: {audience: a}}]\n";
        assert_eq!(Config::from_yaml(base).unwrap().inject, InjectMode::Always);
        assert_eq!(
            Config::from_yaml(&format!("{base}inject: matchingImages\n"))
                .unwrap()
                .inject,
            InjectMode::MatchingImages
        );
        let e = Config::from_yaml(&format!("{base}inject: sometimes\n")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("config: inject: unknown variant `sometimes`"),
            "{e}"
        );
    }

    #[test]
    fn admission_mode_parses_and_defaults_to_the_webhook() {
        let base = "tls: {certFile: a, keyFile: b}\nregistries: [{host: r.example, kubernetes: {audience: a}}]\n";
        for (extra, mode) in [
            ("", AdmissionMode::Webhook),
            ("admission: {mode: webhook}\n", AdmissionMode::Webhook),
            ("admission: {mode: policy}\n", AdmissionMode::Policy),
        ] {
            let c = Config::from_yaml(&format!("{base}{extra}")).unwrap();
            assert_eq!(c.admission.mode, mode, "{extra:?}");
        }
        let e = parse_error(&format!("{base}admission: {{mode: both}}\n"));
        assert_eq!(e.path, "admission.mode");
        let errors = invalid(&format!(
            "{base}admission: {{mode: policy}}\ninject: matchingImages\n"
        ));
        assert_eq!(errors[0].path, "inject");
    }

    #[test]
    fn service_accounts_mode_parses_and_is_checked() {
        use crate::core::accounts::ServiceAccountMode;
        let base = "tls: {certFile: a, keyFile: b}\nregistries: [{host: r.example, kubernetes: {audience: a}}]\n";
        for (extra, mode) in [
            ("", ServiceAccountMode::Patch),
            ("serviceAccounts: patch\n", ServiceAccountMode::Patch),
            ("serviceAccounts: apply\n", ServiceAccountMode::Apply),
            ("serviceAccounts: never\n", ServiceAccountMode::Never),
            (
                "serviceAccounts: never\ninject: matchingImages\n",
                ServiceAccountMode::Never,
            ),
        ] {
            let c = Config::from_yaml(&format!("{base}{extra}")).unwrap();
            assert_eq!(c.service_accounts, mode, "{extra:?}");
        }
        let e = parse_error(&format!("{base}serviceAccounts: pods\n"));
        assert_eq!(e.path, "serviceAccounts");
        assert!(
            e.message.contains("patch, apply, never") || e.message.contains("`patch`"),
            "{}",
            e.message
        );
        let errors = invalid(&format!(
            "{base}serviceAccounts: apply\ninject: matchingImages\n"
        ));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "serviceAccounts");
        assert!(
            errors[0].message.contains("use never"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn token_audiences_are_those_of_token_requests_once_each() {
        let yaml = r#"
tls: {certFile: a, keyFile: b}
registries:
  - {host: a.example, kubernetes: {audience: https://a.example}}
  - {host: b.example, kubernetes: {audience: https://a.example}}
  - {host: cgr.dev, chainguard: {identity: 0123abcd}}
  - {host: quay.io, quay: {robot: "acme+r", audience: quay-fed, serviceAccountToken: {file: /var/run/t}}}
"#;
        let c = Config::from_yaml(yaml).unwrap();
        assert_eq!(
            c.token_audiences(),
            ["https://a.example", "issuer.enforce.dev"]
        );
    }

    #[test]
    fn token_service_accounts_and_lifetime_are_those_of_token_requests() {
        let yaml = r#"
tls: {certFile: a, keyFile: b}
registries:
  - {host: a.example, kubernetes: {audience: https://a.example, expirationSeconds: 1800}}
  - {host: b.example, kubernetes: {serviceAccount: puller, audience: https://b.example}}
  - {host: cgr.dev, chainguard: {identity: 0123abcd, serviceAccountToken: {fromNamespace: {serviceAccount: puller, expirationSeconds: 7200}}}}
  - {host: quay.io, quay: {robot: "acme+r", audience: quay-fed, serviceAccountToken: {file: /var/run/t}}}
"#;
        let c = Config::from_yaml(yaml).unwrap();
        assert_eq!(c.token_service_accounts(), ["default", "puller"]);
        assert_eq!(c.max_token_seconds(), 7200);
        let files = "tls: {certFile: a, keyFile: b}\nregistries: [{host: quay.io, quay: {robot: \"a+r\", audience: q, serviceAccountToken: {file: /t}}}]\n";
        let c = Config::from_yaml(files).unwrap();
        assert!(c.token_service_accounts().is_empty());
        assert_eq!(c.max_token_seconds(), 0);
    }

    #[test]
    fn token_lifetimes_are_at_most_a_day() {
        let errors = invalid(
            r#"
tls: {certFile: a, keyFile: b}
registries:
  - {host: a.example, kubernetes: {audience: a, expirationSeconds: 2592000}}
  - {host: cgr.dev, chainguard: {identity: 0123abcd, serviceAccountToken: {fromNamespace: {expirationSeconds: 86401}}}}
"#,
        );
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "registries[0].kubernetes.expirationSeconds",
                "registries[1].chainguard.serviceAccountToken.fromNamespace.expirationSeconds"
            ]
        );
        assert!(errors[0].message.contains("maximum of 86400"), "{errors:?}");
        Config::from_yaml(
            "tls: {certFile: a, keyFile: b}\nregistries: [{host: a.example, kubernetes: {audience: a, expirationSeconds: 86400}}]\n",
        )
        .unwrap();
    }

    #[test]
    fn no_registries_is_an_error() {
        let errors = invalid("tls: {certFile: a, keyFile: b}\nregistries: []\n");
        assert_eq!(errors[0].path, "registries");
    }
}
