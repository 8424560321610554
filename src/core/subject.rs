//! Whose identity a pull Secret carries. With `identityScope: namespace` (the default) one
//! Secret per namespace is minted for the configured ServiceAccount; with `serviceAccount`, one
//! Secret per ServiceAccount, `<sa>-<secretName>`, minted for that ServiceAccount, so a registry
//! can tell which workload pulls. Everything keyed per Secret (cache, single flight, renewal)
//! uses [`Subject::key`].

use serde::Deserialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IdentityScope {
    #[default]
    Namespace,
    ServiceAccount,
}

/// The owner of one pull Secret.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Subject {
    pub namespace: String,
    /// Set with `identityScope: serviceAccount`.
    pub service_account: Option<String>,
}

impl Subject {
    pub fn namespace(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            service_account: None,
        }
    }

    pub(crate) fn service_account(namespace: &str, service_account: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            service_account: Some(service_account.to_string()),
        }
    }

    /// The subject of a workload running as `service_account` under `scope`.
    pub(crate) fn for_workload(
        scope: IdentityScope,
        namespace: &str,
        service_account: &str,
    ) -> Self {
        match scope {
            IdentityScope::Namespace => Self::namespace(namespace),
            IdentityScope::ServiceAccount => Self::service_account(namespace, service_account),
        }
    }

    /// `ns` or `ns/sa`: the cache key (a `/` cannot occur in either name).
    pub(crate) fn key(&self) -> String {
        match &self.service_account {
            None => self.namespace.clone(),
            Some(sa) => format!("{}/{sa}", self.namespace),
        }
    }

    /// The Secret's name: `base`, or `<sa>-<base>` per ServiceAccount.
    pub(crate) fn secret_name(&self, base: &str) -> String {
        match &self.service_account {
            None => base.to_string(),
            Some(sa) => format!("{sa}-{base}"),
        }
    }
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_names_per_scope() {
        let ns = Subject::for_workload(IdentityScope::Namespace, "team-a", "builder");
        assert_eq!(
            (ns.key(), ns.secret_name("pull-secret")),
            ("team-a".into(), "pull-secret".into())
        );
        let sa = Subject::for_workload(IdentityScope::ServiceAccount, "team-a", "builder");
        assert_eq!(
            (sa.key(), sa.secret_name("pull-secret")),
            ("team-a/builder".into(), "builder-pull-secret".into())
        );
    }
}
