//! The settings the service runs with: the configuration file resolved against the process
//! environment once, at start-up, and handed to the webhook, the provisioner and the
//! refresher. Nothing below reads an environment variable.

use std::time::Duration;

use crate::config::{AdmissionConfig, Config, InjectMode, RegistryConfig};
use crate::core::namespaces::NamespacePolicy;
use crate::core::subject::{IdentityScope, Subject};
use crate::http::ProxyEnv;

/// What the process environment says about where the service runs (set through the downward
/// API in the Deployment).
#[derive(Clone, Debug, Default)]
pub struct Environment {
    /// `$POD_NAME`: this replica's name, for the Lease and for Events.
    pub pod_name: Option<String>,
    /// `$POD_NAMESPACE`: the namespace the service runs in, when the config does not say.
    pub pod_namespace: Option<String>,
    /// `$HTTPS_PROXY`, `$HTTP_PROXY`, `$NO_PROXY` (and `$KUBERNETES_SERVICE_HOST`, never
    /// proxied): how calls to token endpoints leave a corporate network.
    pub proxy: ProxyEnv,
}

impl Environment {
    /// Reads `$POD_NAME`, `$POD_NAMESPACE` and the proxy variables. Called once, in `main`.
    pub fn from_process() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
        Self {
            pod_name: var("POD_NAME"),
            pod_namespace: var("POD_NAMESPACE"),
            proxy: ProxyEnv::from_vars(var),
        }
    }
}

/// Which replica refreshes: the Lease that decides it, and this replica's name in it.
#[derive(Clone, Debug)]
pub struct Election {
    pub lease_name: String,
    pub namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_grace: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error(
        "leaderElection.namespace: must be set when neither ownNamespace nor $POD_NAMESPACE is"
    )]
    LeaseNamespace,
}

#[derive(Clone, Debug)]
pub struct Settings {
    /// The file as read, for the parts only the assembly uses (listener, TLS, HTTP client,
    /// pull-secret-updater).
    pub config: Config,
    /// The namespaces served: the selector, minus kube-system, the own namespace and the
    /// configured exclusions.
    pub policy: NamespacePolicy,
    /// `Some` when several replicas share the refreshing.
    pub election: Option<Election>,
    /// This replica's name in Events, when it has one.
    pub instance: Option<String>,
    /// This replica's Pod (namespace, name), when known: Events about the service itself
    /// (renewal capacity) go on it.
    pub own_pod: Option<(String, String)>,
    /// The proxy for calls to token endpoints, from the environment.
    pub proxy: ProxyEnv,
    /// The namespace the service runs in, when known: never touched.
    pub own_namespace: Option<String>,
}

impl Settings {
    pub fn new(config: Config, env: &Environment) -> Result<Self, SettingsError> {
        let own_namespace = config
            .own_namespace
            .clone()
            .or_else(|| env.pod_namespace.clone());
        let election = match &config.leader_election {
            None => None,
            Some(le) => Some(Election {
                lease_name: le.lease_name.clone(),
                namespace: le
                    .namespace
                    .clone()
                    .or_else(|| own_namespace.clone())
                    .ok_or(SettingsError::LeaseNamespace)?,
                identity: env
                    .pod_name
                    .clone()
                    .unwrap_or_else(|| format!("pull-secret-injector-{:016x}", fastrand::u64(..))),
                lease_duration: le.lease_duration,
                renew_grace: le.renew_grace,
            }),
        };
        let policy = NamespacePolicy::new(
            config.namespace_selector.clone(),
            own_namespace.as_deref(),
            &config.excluded_namespaces,
        );
        let own_pod =
            (env.pod_namespace.clone().or_else(|| own_namespace.clone())).zip(env.pod_name.clone());
        Ok(Self {
            policy,
            election,
            instance: env.pod_name.clone(),
            own_pod,
            proxy: env.proxy.clone(),
            own_namespace,
            config,
        })
    }

    /// The name of the pull Secret (per namespace; per ServiceAccount it is prefixed).
    pub(crate) fn secret_name(&self) -> &str {
        &self.config.secret_name
    }

    pub(crate) fn inject(&self) -> InjectMode {
        self.config.inject
    }

    /// What is done to ServiceAccounts (`serviceAccounts`).
    pub(crate) fn service_accounts(&self) -> crate::core::accounts::ServiceAccountMode {
        self.config.service_accounts
    }

    pub(crate) fn scope(&self) -> IdentityScope {
        self.config.identity_scope
    }

    pub(crate) fn registries(&self) -> &[RegistryConfig] {
        &self.config.registries
    }

    /// The configured registry hosts, in configuration order.
    pub(crate) fn hosts(&self) -> Vec<&str> {
        self.config
            .registries
            .iter()
            .map(|r| r.host.as_str())
            .collect()
    }

    pub(crate) fn admission(&self) -> &AdmissionConfig {
        &self.config.admission
    }

    pub(crate) fn renew_before(&self) -> Option<Duration> {
        self.config.refresh.renew_before
    }

    /// Whose Secret a workload running as `service_account` in `namespace` uses.
    pub(crate) fn subject_for(&self, namespace: &str, service_account: &str) -> Subject {
        Subject::for_workload(self.scope(), namespace, service_account)
    }

    /// The name of `subject`'s Secret.
    pub(crate) fn secret_of(&self, subject: &Subject) -> String {
        subject.secret_name(self.secret_name())
    }
}

/// Whether the kubeconfig's current cluster names a `proxy-url`: the one way to ask for the API
/// server to be reached through a proxy (`$HTTPS_PROXY` never sends it there).
pub fn kubeconfig_names_proxy(kubeconfig: Option<&kube::config::Kubeconfig>) -> bool {
    let Some(kc) = kubeconfig else {
        return false;
    };
    let cluster = kc
        .contexts
        .iter()
        .find(|c| Some(&c.name) == kc.current_context.as_ref())
        .and_then(|c| c.context.as_ref())
        .map(|c| c.cluster.as_str());
    kc.clusters
        .iter()
        .find(|c| Some(c.name.as_str()) == cluster)
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.proxy_url.as_deref())
        .is_some_and(|u| !u.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "tls: {certFile: a, keyFile: b}\nregistries: [{host: r.example, kubernetes: {audience: a}}]\n";

    #[test]
    fn the_environment_fills_what_the_file_leaves_out() {
        let config = Config::from_yaml(&format!("{MINIMAL}leaderElection: {{}}\n")).unwrap();
        assert!(matches!(
            Settings::new(config.clone(), &Environment::default()),
            Err(SettingsError::LeaseNamespace)
        ));
        let env = Environment {
            pod_name: Some("psi-0".into()),
            pod_namespace: Some("psi".into()),
            ..Default::default()
        };
        let s = Settings::new(config, &env).unwrap();
        let election = s.election.unwrap();
        assert_eq!(
            (election.namespace.as_str(), election.identity.as_str()),
            ("psi", "psi-0")
        );
        assert!(
            s.policy.is_excluded("psi"),
            "its own namespace is never served"
        );
    }

    #[test]
    fn only_the_kubeconfig_sends_the_api_server_through_a_proxy() {
        let kubeconfig = |proxy: &str| {
            kube::config::Kubeconfig::from_yaml(&format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: b\n\
                 clusters:\n- name: a\n  cluster: {{server: https://a, proxy-url: http://p:3128}}\n\
                 - name: b\n  cluster: {{server: https://b{proxy}}}\n\
                 contexts:\n- name: a\n  context: {{cluster: a, user: u}}\n- name: b\n  context: {{cluster: b, user: u}}\n"
            ))
            .unwrap()
        };
        assert!(!kubeconfig_names_proxy(None), "in-cluster");
        assert!(
            !kubeconfig_names_proxy(Some(&kubeconfig(""))),
            "another cluster's proxy-url does not count"
        );
        assert!(kubeconfig_names_proxy(Some(&kubeconfig(
            ", proxy-url: http://p:3128"
        ))));
    }

    #[test]
    fn proxy_variables_are_read_once_upper_case_first() {
        let vars = |pairs: &[(&str, &str)]| {
            let map: std::collections::HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            ProxyEnv::from_vars(move |k| map.get(k).cloned())
        };
        let p = vars(&[
            ("HTTPS_PROXY", "http://upper:3128"),
            ("https_proxy", "http://lower:3128"),
            ("no_proxy", "internal.example, 10.0.0.0/8"),
            ("http_proxy", " "),
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ]);
        assert_eq!(p.https_proxy.as_deref(), Some("http://upper:3128"));
        assert_eq!(p.http_proxy, None, "blank is unset");
        assert_eq!(
            p.bypass_list(),
            "internal.example,10.0.0.0/8,kubernetes.default.svc.cluster.local,kubernetes.default.svc,kubernetes.default,10.96.0.1"
        );
    }
}
