//! The kubelet's side of the plugin: its `CredentialProviderConfig`. [`entries`] are the
//! providers this plugin needs (one per token audience: the kubelet gives a provider one),
//! [`merge`] puts them into an existing file keeping every other provider, and [`problems`]
//! says what in a file keeps the kubelet from calling the plugin with the right token. All
//! pure, over parsed YAML; reading files, asking the API server and running the plugin are
//! `pull-secret-injector credential-provider check`'s (`main.rs`, `check`).

use serde_json::{json, Value};

use super::protocol::API_VERSION;
use super::PluginConfig;

/// The kind and API group of the kubelet's file.
pub const KIND: &str = "CredentialProviderConfig";
pub const GROUP: &str = "kubelet.config.k8s.io/";

/// What a provider entry of this plugin is made from.
#[derive(Clone, Debug)]
pub struct EntryOptions<'a> {
    /// The provider's name: the plugin's file name in the kubelet's bin dir. A second audience
    /// gets `<name>-2` (a copy or link of the binary under that name), and so on.
    pub name: &'a str,
    /// The plugin's config file as the kubelet's providers pass it (`--config`).
    pub config_path: &'a str,
}

/// The providers for `plugin`: one per token audience, in the order the registries name them.
pub fn entries(plugin: &PluginConfig, options: &EntryOptions) -> Vec<Value> {
    let mut audiences: Vec<String> = Vec::new();
    for r in &plugin.registries {
        let audience = r.source.token_audience();
        if !audiences.contains(&audience) {
            audiences.push(audience);
        }
    }
    audiences
        .iter()
        .enumerate()
        .map(|(i, audience)| {
            let registries: Vec<_> = plugin
                .registries
                .iter()
                .filter(|r| &r.source.token_audience() == audience)
                .collect();
            let hosts: Vec<&str> = registries.iter().map(|r| r.host.as_str()).collect();
            // The `kubernetes` source hands the Pod's own token on: bound to that Pod, never
            // reused for another.
            let cache_type = if registries.iter().all(|r| r.source.name() == "kubernetes") {
                "Token"
            } else {
                "ServiceAccount"
            };
            let mut keys: Vec<&str> = registries
                .iter()
                .flat_map(|r| r.source.annotation_keys())
                .collect();
            keys.sort();
            keys.dedup();
            let mut token = json!({"serviceAccountTokenAudience": audience,
                "cacheType": cache_type, "requireServiceAccount": true});
            if !keys.is_empty() {
                token["requiredServiceAccountAnnotationKeys"] = json!(keys);
            }
            let name = if i == 0 {
                options.name.to_string()
            } else {
                format!("{}-{}", options.name, i + 1)
            };
            json!({
                "name": name, "apiVersion": API_VERSION, "matchImages": hosts,
                "defaultCacheDuration": "0s",
                "args": ["credential-provider", "--config", options.config_path],
                "tokenAttributes": token,
            })
        })
        .collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error("the file is not a CredentialProviderConfig (kind {0:?}, apiVersion {1:?})")]
    NotAConfig(String, String),
    #[error("providers is not a list")]
    Providers,
}

/// What a merge did.
#[derive(Debug, PartialEq, Eq)]
pub enum Merged {
    /// The file already held exactly these entries.
    Unchanged,
    /// Entries were added or replaced (their names).
    Changed(Vec<String>),
}

/// `existing` (a parsed CredentialProviderConfig, or `None` for no file yet) with `entries` in
/// it: an entry of the same name is replaced where it stands, a new one appended; every other
/// provider and field stays as it was. Merging the result again changes nothing.
pub fn merge(existing: Option<Value>, entries: &[Value]) -> Result<(Value, Merged), MergeError> {
    let mut config = existing.unwrap_or_else(
        || json!({"apiVersion": format!("{GROUP}v1"), "kind": KIND, "providers": []}),
    );
    let kind = config["kind"].as_str().unwrap_or_default().to_string();
    let version = config["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if kind != KIND || !version.starts_with(GROUP) {
        return Err(MergeError::NotAConfig(kind, version));
    }
    if config.get("providers").is_none_or(Value::is_null) {
        config["providers"] = json!([]);
    }
    let providers = config["providers"]
        .as_array_mut()
        .ok_or(MergeError::Providers)?;
    let mut changed = Vec::new();
    for entry in entries {
        let name = entry["name"].as_str().unwrap_or_default();
        match providers.iter_mut().find(|p| p["name"] == name) {
            Some(p) if p == entry => {}
            Some(p) => {
                *p = entry.clone();
                changed.push(name.to_string());
            }
            None => {
                providers.push(entry.clone());
                changed.push(name.to_string());
            }
        }
    }
    let merged = if changed.is_empty() {
        Merged::Unchanged
    } else {
        Merged::Changed(changed)
    };
    Ok((config, merged))
}

/// Whether a `matchImages` pattern covers images on `host` (`host[:port]`): the kubelet's
/// rules, host segments globbed one by one with `*`, the port exact, any path.
pub(crate) fn covers(pattern: &str, host: &str) -> bool {
    let pattern = pattern
        .strip_prefix("https://")
        .or_else(|| pattern.strip_prefix("http://"))
        .unwrap_or(pattern);
    let pattern_host = pattern.split('/').next().unwrap_or_default();
    let split = |h: &str| -> (String, String) {
        match h.rsplit_once(':') {
            Some((name, port)) => (name.to_string(), port.to_string()),
            None => (h.to_string(), String::new()),
        }
    };
    let ((p_name, p_port), (h_name, h_port)) = (split(pattern_host), split(host));
    let (p_parts, h_parts): (Vec<&str>, Vec<&str>) =
        (p_name.split('.').collect(), h_name.split('.').collect());
    p_port == h_port
        && p_parts.len() == h_parts.len()
        && p_parts.iter().zip(&h_parts).all(|(p, h)| glob(p, h))
}

/// `*` matches any run of characters within one segment.
fn glob(pattern: &str, text: &str) -> bool {
    match pattern.split_once('*') {
        None => pattern == text,
        Some((head, tail)) => {
            text.starts_with(head)
                && (0..=text.len() - head.len().min(text.len()))
                    .filter_map(|i| text.get(head.len() + i..))
                    .any(|rest| glob(tail, rest))
        }
    }
}

/// What keeps the kubelet from calling the plugin as `plugin` needs, with what to do: for each
/// registry, a provider named `name` (or `name-N`) whose matchImages cover it, of the v1
/// protocol, with tokenAttributes for the registry's audience, requiring a ServiceAccount and
/// the annotation keys the source reads.
pub fn problems(kubelet: &Value, name: &str, plugin: &PluginConfig) -> Vec<String> {
    let ours = |p: &&Value| {
        p["name"].as_str().is_some_and(|n| {
            n == name
                || n.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('-'))
                    .is_some_and(|n| n.parse::<u32>().is_ok())
        })
    };
    let empty = Vec::new();
    let providers: Vec<&Value> = kubelet["providers"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter(ours)
        .collect();
    if providers.is_empty() {
        return vec![format!(
            "the kubelet's CredentialProviderConfig has no provider named {name:?}: merge this plugin's entry into it (`pull-secret-injector credential-provider merge`) and restart the kubelet"
        )];
    }
    let mut found = Vec::new();
    for r in &plugin.registries {
        let host = &r.host;
        let Some(p) = providers.iter().find(|p| {
            p["matchImages"]
                .as_array()
                .is_some_and(|m| m.iter().filter_map(Value::as_str).any(|m| covers(m, host)))
        }) else {
            found.push(format!(
                "registry {host}: no matchImages of provider {name:?} covers it, so the kubelet never asks the plugin for it: add {host:?} to matchImages"
            ));
            continue;
        };
        let pname = p["name"].as_str().unwrap_or_default();
        if p["apiVersion"] != API_VERSION {
            found.push(format!(
                "provider {pname:?}: apiVersion {} is not {API_VERSION}: set it",
                p["apiVersion"]
            ));
        }
        let t = &p["tokenAttributes"];
        let audience = r.source.token_audience();
        if t.is_null() {
            found.push(format!(
                "provider {pname:?}: no tokenAttributes, so the kubelet passes no service-account token: add tokenAttributes {{serviceAccountTokenAudience: {audience}, cacheType, requireServiceAccount: true}}"
            ));
            continue;
        }
        if t["serviceAccountTokenAudience"] != audience.as_str() {
            found.push(format!(
                "registry {host}: provider {pname:?} asks for tokens of audience {}, the plugin's config expects {audience:?}: set tokenAttributes.serviceAccountTokenAudience to it",
                t["serviceAccountTokenAudience"]
            ));
        }
        if t["requireServiceAccount"] != true {
            found.push(format!(
                "provider {pname:?}: tokenAttributes.requireServiceAccount is not true: Pods without a ServiceAccount would be sent without a token; set it to true"
            ));
        }
        if !matches!(t["cacheType"].as_str(), Some("Token" | "ServiceAccount")) {
            found.push(format!(
                "provider {pname:?}: tokenAttributes.cacheType must be Token or ServiceAccount"
            ));
        }
        let listed: Vec<&str> = t["requiredServiceAccountAnnotationKeys"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for key in r.source.annotation_keys() {
            if !listed.contains(&key) {
                found.push(format!(
                    "registry {host}: provider {pname:?} does not list {key} in tokenAttributes.requiredServiceAccountAnnotationKeys, so the kubelet does not pass it: add it"
                ));
            }
        }
    }
    found
}

/// The token audiences the node must be allowed to request (`request-serviceaccounts-token-
/// audience`), once each.
pub fn audiences(plugin: &PluginConfig) -> Vec<String> {
    let mut all: Vec<String> = plugin
        .registries
        .iter()
        .map(|r| r.source.token_audience())
        .collect();
    all.sort();
    all.dedup();
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLUGIN: &str = r#"
registries:
  - host: registry.example.com
    kubernetes: {audience: registry.example.com}
  - host: "127.0.0.1:5000"
    kubernetes: {audience: registry.example.com}
  - host: 123456789012.dkr.ecr.eu-west-1.amazonaws.com
    ecr: {region: eu-west-1}
"#;

    fn plugin() -> PluginConfig {
        PluginConfig::from_yaml(PLUGIN).unwrap()
    }

    fn ours() -> Vec<Value> {
        entries(
            &plugin(),
            &EntryOptions {
                name: "psi",
                config_path: "/etc/psi.yaml",
            },
        )
    }

    #[test]
    fn one_provider_per_audience() {
        let e = ours();
        assert_eq!(e.len(), 2);
        assert_eq!(
            e[0],
            json!({"name": "psi", "apiVersion": API_VERSION,
                "matchImages": ["registry.example.com", "127.0.0.1:5000"],
                "defaultCacheDuration": "0s",
                "args": ["credential-provider", "--config", "/etc/psi.yaml"],
                "tokenAttributes": {"serviceAccountTokenAudience": "registry.example.com",
                    "cacheType": "Token", "requireServiceAccount": true}})
        );
        assert_eq!(e[1]["name"], "psi-2");
        assert_eq!(e[1]["tokenAttributes"]["cacheType"], "ServiceAccount");
        assert_eq!(
            e[1]["tokenAttributes"]["requiredServiceAccountAnnotationKeys"],
            json!(["eks.amazonaws.com/role-arn"])
        );
        assert!(problems(&merge(None, &e).unwrap().0, "psi", &plugin()).is_empty());
    }

    #[test]
    fn the_merge_keeps_other_providers_and_is_idempotent() {
        let other = json!({"name": "ecr-credential-provider", "apiVersion": API_VERSION,
            "matchImages": ["*.dkr.ecr.*.amazonaws.com"], "defaultCacheDuration": "12h"});
        let stale = json!({"name": "psi", "apiVersion": API_VERSION, "matchImages": ["old"]});
        let existing = json!({"apiVersion": "kubelet.config.k8s.io/v1", "kind": KIND,
            "providers": [other, stale]});
        let (merged, what) = merge(Some(existing), &ours()).unwrap();
        assert_eq!(what, Merged::Changed(vec!["psi".into(), "psi-2".into()]));
        let providers = merged["providers"].as_array().unwrap();
        assert_eq!(providers[0], other, "untouched, in its place");
        assert_eq!(providers[1], ours()[0], "replaced where it stood");
        assert_eq!(providers[2], ours()[1], "appended");
        let (again, what) = merge(Some(merged.clone()), &ours()).unwrap();
        assert_eq!((again, what), (merged, Merged::Unchanged));
        // No file yet, or one without providers.
        let (fresh, _) = merge(None, &ours()).unwrap();
        assert_eq!(fresh["kind"], KIND);
        assert_eq!(fresh["providers"].as_array().unwrap().len(), 2);
        let (bare, _) = merge(
            Some(json!({"apiVersion": "kubelet.config.k8s.io/v1", "kind": KIND})),
            &ours(),
        )
        .unwrap();
        assert_eq!(bare["providers"].as_array().unwrap().len(), 2);
        // Not a CredentialProviderConfig: refused.
        let e = merge(
            Some(json!({"apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration"})),
            &ours(),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("not a CredentialProviderConfig"),
            "{e}"
        );
        let e = merge(
            Some(json!({"apiVersion": "kubelet.config.k8s.io/v1", "kind": KIND, "providers": {}})),
            &ours(),
        )
        .unwrap_err();
        assert_eq!(e, MergeError::Providers);
    }

    #[test]
    fn match_images_globs_like_the_kubelet() {
        for (pattern, host, covered) in [
            ("registry.example.com", "registry.example.com", true),
            ("registry.example.com/team-a", "registry.example.com", true),
            ("*.example.com", "registry.example.com", true),
            ("*.example.com", "example.com", false),
            ("*.*.*.*:5000/direct", "10.213.1.1:5000", true),
            ("*.*.*.*:5000", "10.213.1.1:5001", false),
            ("127.0.0.1:5000", "127.0.0.1", false),
            ("reg*.example.com", "registry.example.com", true),
            (
                "registry.example.com",
                "registry.example.com.evil.test",
                false,
            ),
            ("https://registry.example.com", "registry.example.com", true),
        ] {
            assert_eq!(covers(pattern, host), covered, "{pattern} {host}");
        }
    }

    #[test]
    fn each_problem_says_what_to_fix() {
        let p = plugin();
        let none = json!({"apiVersion": "kubelet.config.k8s.io/v1", "kind": KIND, "providers": []});
        let found = problems(&none, "psi", &p);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].contains("no provider named \"psi\": merge"),
            "{found:?}"
        );
        let mut wrong = merge(None, &ours()).unwrap().0;
        wrong["providers"][0]["matchImages"] = json!(["registry.example.com"]);
        wrong["providers"][0]["tokenAttributes"]["serviceAccountTokenAudience"] = json!("other");
        wrong["providers"][0]["tokenAttributes"]["requireServiceAccount"] = json!(false);
        wrong["providers"][1]["tokenAttributes"]
            .as_object_mut()
            .unwrap()
            .remove("requiredServiceAccountAnnotationKeys");
        let found = problems(&wrong, "psi", &p);
        let expect = [
            "registry registry.example.com: provider \"psi\" asks for tokens of audience \"other\", the plugin's config expects \"registry.example.com\": set tokenAttributes.serviceAccountTokenAudience to it",
            "provider \"psi\": tokenAttributes.requireServiceAccount is not true",
            "registry 127.0.0.1:5000: no matchImages of provider \"psi\" covers it",
            "registry 123456789012.dkr.ecr.eu-west-1.amazonaws.com: provider \"psi-2\" does not list eks.amazonaws.com/role-arn",
        ];
        assert_eq!(found.len(), expect.len(), "{found:#?}");
        for (f, e) in found.iter().zip(expect) {
            assert!(f.starts_with(e), "{f}\nexpected: {e}");
        }
        let mut no_token = merge(None, &ours()).unwrap().0;
        no_token["providers"][0]
            .as_object_mut()
            .unwrap()
            .remove("tokenAttributes");
        let found = problems(&no_token, "psi", &p);
        assert!(found[0].contains("no tokenAttributes"), "{found:?}");
        assert_eq!(audiences(&p), ["registry.example.com", "sts.amazonaws.com"]);
    }
}
