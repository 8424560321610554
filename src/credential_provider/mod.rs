//! `pull-secret-injector credential-provider`: a kubelet image credential provider. The
//! kubelet runs it once per image pull it has no cached credential for, with the Pod's own
//! service-account token (KEP-4412, `tokenAttributes` in its `CredentialProviderConfig`); it
//! answers the credential for the image's registry, minted with the same [`sources`] as the
//! service, so that a node pulls with per-workload, short-lived credentials and no Secret is
//! stored anywhere.
//!
//! [`protocol`] is the wire format and the pure rules (cache lifetime, token identity);
//! this module picks the registry, hands the token to its source and words the errors.
//!
//! [`sources`]: crate::sources

pub mod check;
pub mod install;
pub mod node;
pub(crate) mod protocol;

use std::collections::BTreeMap;
use std::path::Path;

use jiff::Timestamp;
use serde::Deserialize;

use crate::config::{self, ConfigError, FieldError, RegistryConfig};
use crate::core::credential::Sensitive;
use crate::core::images;
use crate::http::{HttpClient, HttpClientError, HttpConfig, ProxyEnv};
use crate::sources::kubernetes::{self, ServiceAccountToken};
use crate::sources::{self, MintError, Presented};

use protocol::{Request, RequestError, Response};

/// The plugin's config file: the service's `http` and `registries` sections, read by the same
/// types and checked by the same rules.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginConfig {
    #[serde(default)]
    pub http: HttpConfig,
    pub registries: Vec<RegistryConfig>,
}

impl PluginConfig {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = config::read_yaml(path)?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = config::parse_yaml(text)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        let mut err = |path: &str, message: String| {
            errors.push(FieldError {
                path: path.to_string(),
                message,
            })
        };
        self.http.validate(&mut err);
        let checks = sources::Checks {
            renew_before: None,
            allow_plain_http: self.http.allow_plain_http,
        };
        config::validate_registries(&self.registries, checks, &mut err);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    /// The registry entry `image` pulls from.
    pub fn registry_for(&self, image: &str) -> Result<&RegistryConfig, PluginError> {
        self.registries
            .iter()
            .find(|r| images::is_on(image, &r.host))
            .ok_or_else(|| PluginError::NoRegistry {
                image: image.to_string(),
                registry: images::registry_of(image).to_string(),
                configured: self
                    .registries
                    .iter()
                    .map(|r| r.host.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// The most read from stdin. A request is an image name, the Pod's token and the
/// ServiceAccount annotations the kubelet passes (an object's annotations total at most
/// 256 KiB): a few kilobytes, far below this.
pub(crate) const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// Reads one request from `input` (stdin), refusing more than [`MAX_REQUEST_BYTES`] before
/// anything is parsed: memory stays bounded whatever is piped in.
pub fn read_request(input: impl std::io::Read) -> Result<Vec<u8>, PluginError> {
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut input.take(MAX_REQUEST_BYTES as u64 + 1), &mut bytes)
        .map_err(|e| PluginError::Stdin(e.to_string()))?;
    if bytes.len() > MAX_REQUEST_BYTES {
        return Err(PluginError::TooLarge);
    }
    Ok(bytes)
}

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Http(#[from] HttpClientError),
    #[error("cannot read the request from stdin: {0}")]
    Stdin(String),
    #[error("the request on stdin is larger than {} KiB; the kubelet sends one CredentialProviderRequest of a few kilobytes", MAX_REQUEST_BYTES / 1024)]
    TooLarge,
    #[error("{0}")]
    Request(#[from] RequestError),
    #[error("image {image:?} is on registry {registry}, which the config does not list (it lists {configured}): make the kubelet's matchImages name only configured registries")]
    NoRegistry {
        image: String,
        registry: String,
        configured: String,
    },
    #[error("registry {host}: the request has no serviceAccountToken, which the {source_name} source needs: give this provider tokenAttributes (serviceAccountTokenAudience: {audience}, cacheType, requireServiceAccount: true) in the kubelet's CredentialProviderConfig")]
    NoToken {
        host: String,
        source_name: &'static str,
        audience: String,
    },
    #[error("registry {host}: the service-account token is unusable: {reason}")]
    Token { host: String, reason: String },
    #[error("registry {host}: the service-account token is for audience {found}, the config expects {expected:?}: set tokenAttributes.serviceAccountTokenAudience to it (one provider per audience)")]
    Audience {
        host: String,
        expected: String,
        found: String,
    },
    #[error("registry {host}: ServiceAccount {service_account} has no {key} annotation in the request and the config sets no {field}: annotate the ServiceAccount and list the key in tokenAttributes.requiredServiceAccountAnnotationKeys (the kubelet passes only the keys listed there)")]
    Annotation {
        host: String,
        service_account: String,
        key: &'static str,
        field: &'static str,
    },
    #[error("registry {host}: {source}")]
    Mint {
        host: String,
        #[source]
        source: MintError,
    },
}

impl PluginError {
    /// What the plugin prints on stderr, where the kubelet's log shows it: one line.
    pub fn line(&self) -> String {
        let text = self.to_string();
        let words: Vec<&str> = text.split_whitespace().collect();
        format!(
            "pull-secret-injector credential-provider: {}",
            words.join(" ")
        )
    }
}

/// The plugin with its config loaded: one request in, one response out.
pub struct Plugin {
    config: PluginConfig,
    http: HttpClient,
}

impl Plugin {
    /// `proxy`: the proxy variables the kubelet passed (the provider's `env` in its config).
    pub fn new(config: PluginConfig, proxy: &ProxyEnv) -> Result<Self, PluginError> {
        let http = HttpClient::new(&config.http, proxy)?;
        Ok(Self { config, http })
    }

    /// Answers one `CredentialProviderRequest` (the bytes the kubelet wrote to stdin).
    pub async fn answer(&self, input: &[u8]) -> Result<Response, PluginError> {
        let request = protocol::parse_request(input)?;
        let registry = self.config.registry_for(&request.image)?;
        let token = self.token(registry, &request).await?;
        let host = || registry.host.clone();
        let identity =
            protocol::token_identity(token.expose()).map_err(|reason| PluginError::Token {
                host: host(),
                reason,
            })?;
        let expected = registry.source.token_audience();
        if !identity.audiences.contains(&expected) {
            return Err(PluginError::Audience {
                host: host(),
                expected,
                found: format!("{:?}", identity.audiences),
            });
        }
        let annotations: BTreeMap<String, String> = request.service_account_annotations;
        if let Some(key) = registry
            .source
            .annotation_keys()
            .into_iter()
            .find(|k| !annotations.contains_key(*k))
        {
            return Err(PluginError::Annotation {
                host: host(),
                service_account: format!("{}/{}", identity.namespace, identity.service_account),
                key,
                field: sources::setting_for(key),
            });
        }
        let presented = Presented {
            token: &token,
            namespace: &identity.namespace,
            service_account: Some(&identity.service_account),
            annotations: &annotations,
        };
        let credential = registry
            .source
            .exchange(&self.http, &registry.host, &presented)
            .await
            .map_err(|source| PluginError::Mint {
                host: host(),
                source,
            })?;
        // The token itself as the password (the `kubernetes` source) is bound to this Pod.
        let pass_through = credential.password == token;
        Ok(Response {
            registry: images::registry_of(&request.image).to_string(),
            cache_duration: protocol::cache_duration(&credential, pass_through, Timestamp::now()),
            username: credential.username,
            password: credential.password,
        })
    }

    /// The Pod's token from the request; without one, the source's token file if it names
    /// one (a node-wide identity for Pods without a ServiceAccount token).
    async fn token(
        &self,
        registry: &RegistryConfig,
        request: &Request,
    ) -> Result<Sensitive, PluginError> {
        if let Some(t) = &request.service_account_token {
            return Ok(t.clone());
        }
        match registry.source.service_account_token() {
            Some(ServiceAccountToken::File(path)) => kubernetes::read_token_file(path)
                .await
                .map_err(|source| PluginError::Mint {
                    host: registry.host.clone(),
                    source,
                }),
            _ => Err(PluginError::NoToken {
                host: registry.host.clone(),
                source_name: registry.source.name(),
                audience: registry.source.token_audience(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
registries:
  - host: registry.example.com
    kubernetes: {audience: registry.example.com, username: k8s}
  - host: "127.0.0.1:5000"
    quay: {robot: org+puller, audience: quay.test}
  - host: index.docker.io
    tokenExchange: {endpoint: "https://sts.example.com/token", username: u, subjectTokenAudience: sts.example.com}
"#;

    #[test]
    fn stdin_is_read_up_to_the_limit_and_refused_past_it() {
        let at_limit = vec![b' '; MAX_REQUEST_BYTES];
        assert_eq!(
            read_request(&at_limit[..]).unwrap().len(),
            MAX_REQUEST_BYTES
        );
        // An endless input is refused after reading one byte past the limit.
        let e = read_request(std::io::repeat(b'{')).unwrap_err();
        assert!(matches!(e, PluginError::TooLarge), "{e:?}");
        assert!(e.line().contains("larger than 1024 KiB"), "{}", e.line());
    }

    #[test]
    fn the_registry_is_picked_by_the_image_host() {
        let c = PluginConfig::from_yaml(CONFIG).unwrap();
        let host = |image: &str| c.registry_for(image).map(|r| r.host.as_str());
        assert_eq!(
            host("registry.example.com/team-a/app:v1").unwrap(),
            "registry.example.com"
        );
        assert_eq!(
            host("127.0.0.1:5000/a/b@sha256:00").unwrap(),
            "127.0.0.1:5000"
        );
        assert_eq!(host("nginx:1.27").unwrap(), "index.docker.io");
        let e = host("registry.example.com.evil.test/app").unwrap_err();
        assert_eq!(
            e.to_string(),
            "image \"registry.example.com.evil.test/app\" is on registry registry.example.com.evil.test, which the config does not list (it lists registry.example.com, 127.0.0.1:5000, index.docker.io): make the kubelet's matchImages name only configured registries"
        );
        assert!(
            host("127.0.0.1:5001/a").is_err(),
            "another port is another registry"
        );
    }

    #[test]
    fn the_config_is_the_services_registries_section() {
        let e = PluginConfig::from_yaml("registries: []\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("registries: at least one registry is required"),
            "{e}"
        );
        let e = PluginConfig::from_yaml(
            "registries:\n  - host: https://r.example\n    quay: {robot: nobody, audience: a}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("registries[0].host") && e.contains("registries[0].quay.robot"),
            "{e}"
        );
        let e = PluginConfig::from_yaml(&format!("tls: {{certFile: a, keyFile: b}}\n{CONFIG}"))
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `tls`"), "{e}");
    }

    #[test]
    fn the_shipped_example_parses() {
        let c = PluginConfig::from_yaml(include_str!(
            "../../deploy/credential-provider/pull-secret-injector.yaml"
        ))
        .unwrap();
        let audiences: Vec<String> = c
            .registries
            .iter()
            .map(|r| r.source.token_audience())
            .collect();
        assert_eq!(
            audiences,
            [
                "registry.example.com",
                "quay.example.com",
                "sts.amazonaws.com"
            ]
        );
        assert_eq!(
            c.registries[2].source.annotation_keys(),
            ["eks.amazonaws.com/role-arn"]
        );
    }

    #[test]
    fn errors_are_one_line() {
        let e = PluginError::Config(
            PluginConfig::from_yaml(
                "registries:\n  - host: a b\n    kubernetes: {audience: \"\"}\n",
            )
            .unwrap_err(),
        );
        let line = e.line();
        assert!(!line.contains('\n'), "{line}");
        assert!(
            line.starts_with(
                "pull-secret-injector credential-provider: config is invalid: - registries[0].host"
            ),
            "{line}"
        );
    }

    fn jwt(claims: serde_json::Value) -> String {
        use crate::core::jwt::encode_part;
        format!(
            "{}.{}.c2ln",
            encode_part(br#"{"alg":"RS256"}"#),
            encode_part(claims.to_string().as_bytes())
        )
    }

    fn request(image: &str, token: Option<&str>) -> Vec<u8> {
        serde_json::json!({
            "apiVersion": protocol::API_VERSION, "kind": "CredentialProviderRequest",
            "image": image, "serviceAccountToken": token,
        })
        .to_string()
        .into_bytes()
    }

    #[tokio::test]
    async fn a_pass_through_token_is_the_password_and_never_cached() {
        let plugin = Plugin::new(
            PluginConfig::from_yaml(CONFIG).unwrap(),
            &ProxyEnv::default(),
        )
        .unwrap();
        let exp = Timestamp::now().as_second() + 3600;
        let token = jwt(
            serde_json::json!({"sub": "system:serviceaccount:team-a:builder", "aud": ["registry.example.com"], "exp": exp}),
        );
        let r = plugin
            .answer(&request("registry.example.com/team-a/app:v1", Some(&token)))
            .await
            .unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.username.as_str(),
                r.password.expose()
            ),
            ("registry.example.com", "k8s", token.as_str())
        );
        assert_eq!(r.cache_duration, std::time::Duration::ZERO);
    }

    #[tokio::test]
    async fn token_problems_have_their_own_messages() {
        let plugin = Plugin::new(
            PluginConfig::from_yaml(CONFIG).unwrap(),
            &ProxyEnv::default(),
        )
        .unwrap();
        let image = "registry.example.com/team-a/app:v1";
        let e = plugin.answer(&request(image, None)).await.unwrap_err();
        assert!(
            e.to_string().starts_with("registry registry.example.com: the request has no serviceAccountToken, which the kubernetes source needs: give this provider tokenAttributes (serviceAccountTokenAudience: registry.example.com"),
            "{e}"
        );
        let exp = Timestamp::now().as_second() + 3600;
        let wrong = jwt(
            serde_json::json!({"sub": "system:serviceaccount:a:b", "aud": ["sts.example.com"], "exp": exp, "secret": "pod-token-secret"}),
        );
        let e = plugin
            .answer(&request(image, Some(&wrong)))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "registry registry.example.com: the service-account token is for audience [\"sts.example.com\"], the config expects \"registry.example.com\": set tokenAttributes.serviceAccountTokenAudience to it (one provider per audience)");
        let e = plugin
            .answer(&request(image, Some("opaque-pod-token-secret")))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("not a JWT"), "{e}");
        assert!(!e.line().contains("pod-token-secret"), "{e}");
        let expired = jwt(
            serde_json::json!({"sub": "system:serviceaccount:a:b", "aud": "registry.example.com", "exp": 1000}),
        );
        let e = plugin
            .answer(&request(image, Some(&expired)))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("expired"), "{e}");
        let e = plugin
            .answer(
                br#"{"apiVersion": "credentialprovider.kubelet.k8s.io/v1alpha1", "image": "x"}"#,
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("v1alpha1"), "{e}");
    }
}
