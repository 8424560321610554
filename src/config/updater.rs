//! `pullSecretUpdater:`, the settings of the chainguard pull-secret-updater compatibility
//! (`compat::updater`). Here with the rest of the file's shape, so that reading the config
//! needs nothing from the controller.

use std::time::Duration;

use serde::Deserialize;

use crate::sources::chainguard::ChainguardSource;
use crate::sources::kubernetes::ServiceAccountToken;
use crate::sources::TokenSourceConfig;

/// `pullSecretUpdater:` in the config file. Present: the compatibility controller runs (it needs
/// cluster-wide read and update of Secrets; see deploy/).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdaterConfig {
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// The `auths` key filled, and the `aud` asked of the STS.
    #[serde(default = "default_registry")]
    pub registry: String,
    /// The `aud` of the service-account token presented to the STS.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Whose token is exchanged: the injector's own (a projected file, as pull-secret-updater
    /// does) or a ServiceAccount of each Secret's namespace.
    pub service_account_token: ServiceAccountToken,
    #[serde(
        default = "default_renew_before",
        deserialize_with = "crate::core::duration::field"
    )]
    pub renew_before: Duration,
    /// Only Secrets in these namespaces are kept filled (and watched); empty: every namespace,
    /// as pull-secret-updater does. Anyone who may create a Secret where this looks can have
    /// it filled for any identity that trusts this service: a list keeps that to namespaces
    /// whose writers are trusted, and lets the install grant Secrets there only.
    #[serde(default)]
    pub namespaces: Vec<String>,
}

fn default_issuer() -> String {
    "https://issuer.enforce.dev".into()
}

fn default_registry() -> String {
    "cgr.dev".into()
}

fn default_audience() -> String {
    "issuer.enforce.dev".into()
}

fn default_renew_before() -> Duration {
    Duration::from_secs(600)
}

impl UpdaterConfig {
    pub(crate) fn validate(&self, allow_plain_http: bool, err: &mut impl FnMut(&str, String)) {
        crate::sources::validate_endpoint(
            "pullSecretUpdater.issuer",
            &self.issuer,
            allow_plain_http,
            err,
        );
        if self.registry.is_empty() || self.registry.contains("://") {
            err(
                "pullSecretUpdater.registry",
                format!(
                    "{:?} must be a registry host such as cgr.dev",
                    self.registry
                ),
            );
        }
        if self.renew_before.is_zero() {
            err(
                "pullSecretUpdater.renewBefore",
                "must be more than 0s".into(),
            );
        }
        self.service_account_token
            .validate("pullSecretUpdater.serviceAccountToken", err);
        for (i, ns) in self.namespaces.iter().enumerate() {
            let path = format!("pullSecretUpdater.namespaces[{i}]");
            if let Err(m) = crate::core::names::validate_dns_label(ns) {
                err(&path, m);
            } else if self.namespaces[..i].contains(ns) {
                err(&path, format!("{ns:?} is listed twice"));
            }
        }
    }

    /// Whether Secrets in `namespace` are kept filled.
    pub(crate) fn covers(&self, namespace: &str) -> bool {
        self.namespaces.is_empty() || self.namespaces.iter().any(|n| n == namespace)
    }

    /// The `chainguard` source that mints for `identity`: the updater's settings are that
    /// source's, so its mint is the one every registry entry gets.
    pub(crate) fn source(&self, identity: &str) -> TokenSourceConfig {
        TokenSourceConfig::Chainguard(ChainguardSource {
            identity: identity.to_string(),
            issuer: self.issuer.clone(),
            registry_audience: self.registry.clone(),
            audience: self.audience.clone(),
            service_account_token: self.service_account_token.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_narrow_what_is_kept_filled_and_are_checked() {
        let config = |namespaces: &str| {
            serde_yaml::from_str::<UpdaterConfig>(&format!(
                "serviceAccountToken: {{file: /t}}\nnamespaces: {namespaces}"
            ))
            .unwrap()
        };
        let every = config("[]");
        assert!(every.covers("team-a") && every.covers("kube-system"));
        let some = config("[team-a, team-b]");
        assert!(some.covers("team-a") && some.covers("team-b"));
        assert!(!some.covers("team-c") && !some.covers("kube-system"));
        let mut errors = Vec::new();
        config("[team-a, Team_B, team-a]").validate(false, &mut |p: &str, m: String| {
            errors.push(format!("{p}: {m}"))
        });
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].starts_with("pullSecretUpdater.namespaces[1]"),
            "{errors:?}"
        );
        assert!(
            errors[1].starts_with("pullSecretUpdater.namespaces[2]") && errors[1].contains("twice"),
            "{errors:?}"
        );
    }
}
