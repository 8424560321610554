//! Where credentials come from. A token source turns a namespace's identity into a registry
//! credential; each source lives in its own module and is one variant of [`TokenSourceConfig`],
//! so adding a source touches that enum and a new module, nothing else.

pub mod jwt;
pub mod kubernetes;

use std::fmt;
use std::time::Duration;

use jiff::Timestamp;

/// A value that must never be printed: its `Debug` is redacted and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive(String);

impl Sensitive {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must write it (the pull Secret's data).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sensitive(<redacted>)")
    }
}

/// A registry credential and how long it lasts.
#[derive(Clone, Debug)]
pub struct Credential {
    pub username: String,
    pub password: Sensitive,
    pub issued_at: Timestamp,
    /// As the source reported it, never assumed from what was asked for.
    pub expires_at: Timestamp,
}

/// The token sources, as the config file names them (`registries[].<source>`).
#[derive(Clone, Debug)]
pub enum TokenSourceConfig {
    /// A TokenRequest token for a ServiceAccount of the namespace, used as the password.
    Kubernetes(kubernetes::KubernetesSource),
}

#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error("TokenRequest for ServiceAccount {namespace}/{service_account} failed: {message}")]
    TokenRequest { namespace: String, service_account: String, message: String },
    #[error("reading the service-account token file {path} failed: {message}")]
    TokenFile { path: String, message: String },
    #[error("{source_name} returned an unusable credential: {reason}")]
    Unusable { source_name: &'static str, reason: String },
}

impl TokenSourceConfig {
    /// The config keys, one per variant.
    pub const NAMES: &'static [&'static str] = &["kubernetes"];

    /// Reads the source named `key` from the value that follows it in a registry entry.
    pub fn from_entry<'de, A: serde::de::MapAccess<'de>>(key: &str, map: &mut A) -> Result<Self, A::Error> {
        match key {
            "kubernetes" => Ok(Self::Kubernetes(map.next_value()?)),
            other => Err(serde::de::Error::unknown_field(other, Self::NAMES)),
        }
    }

    /// The name used in logs, metrics and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kubernetes(_) => "kubernetes",
        }
    }

    pub fn validate(&self, path: &str, renew_before: Option<Duration>, err: &mut impl FnMut(&str, String)) {
        match self {
            Self::Kubernetes(k) => k.validate(&format!("{path}.kubernetes"), renew_before, err),
        }
    }

    /// Mints a fresh credential for `namespace`.
    pub async fn mint(&self, client: &kube::Client, namespace: &str) -> Result<Credential, MintError> {
        match self {
            Self::Kubernetes(k) => k.mint(client, namespace).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_values_do_not_print() {
        let c = Credential {
            username: "u".into(),
            password: Sensitive::new("eyJhbGciOi.secret-token"),
            issued_at: Timestamp::UNIX_EPOCH,
            expires_at: Timestamp::UNIX_EPOCH,
        };
        let printed = format!("{c:?} {c:#?}");
        assert!(!printed.contains("secret-token"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }
}
