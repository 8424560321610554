//! `pull-secret-injector credential-provider check`: on a node (or by the DaemonSet at start),
//! whether the kubelet will call this plugin with the tokens it needs. Three findings, each
//! with what to fix: the kubelet's CredentialProviderConfig ([`super::node::problems`]); the
//! node's right to request tokens for each audience (a SubjectAccessReview as the node, or a
//! SelfSubjectAccessReview with the node's own kubeconfig); and the plugin, as the kubelet runs
//! it, answering a sample request with a token of a ServiceAccount named for the purpose. No
//! token or credential is printed.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec, SubjectAccessReview,
    SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use serde_json::{json, Value};

use super::node;
use super::protocol::API_VERSION;
use super::PluginConfig;

/// The verb the API server checks before it mints a token for a credential provider.
pub const TOKEN_VERB: &str = "request-serviceaccounts-token-audience";

pub struct CheckOptions {
    pub config: PluginConfig,
    /// The kubelet's `--image-credential-provider-config`.
    pub kubelet_config: PathBuf,
    /// Its `--image-credential-provider-bin-dir`.
    pub bin_dir: PathBuf,
    pub name: String,
    /// Ask as this node (`system:node:<name>`); without it, as whoever the kubeconfig is.
    pub node_name: Option<String>,
    /// `namespace/name` of a ServiceAccount whose token the sample request carries.
    pub sample_service_account: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("reading {path}: {message}")]
    Read { path: String, message: String },
    #[error("asking the API server: {0}")]
    Api(String),
}

/// One finding: `Ok` what holds, `Err` what is wrong and what to do.
pub type Finding = Result<String, String>;

pub async fn run(client: &kube::Client, o: &CheckOptions) -> Result<Vec<Finding>, CheckError> {
    let path = o.kubelet_config.display().to_string();
    let text = std::fs::read_to_string(&o.kubelet_config).map_err(|e| CheckError::Read {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let kubelet: Value = serde_yaml::from_str(&text).map_err(|e| CheckError::Read {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let mut findings = Vec::new();
    let problems = node::problems(&kubelet, &o.name, &o.config);
    if problems.is_empty() {
        findings.push(Ok(format!(
            "{path}: provider {:?} covers every registry with the right tokenAttributes",
            o.name
        )));
    }
    findings.extend(problems.into_iter().map(|p| Err(format!("{path}: {p}"))));
    for audience in node::audiences(&o.config) {
        let allowed = may_request(client, o.node_name.as_deref(), &audience).await?;
        let who = o
            .node_name
            .as_ref()
            .map(|n| format!("node {n}"))
            .unwrap_or_else(|| "this node's identity".into());
        findings.push(if allowed {
            Ok(format!("{who} may request service-account tokens for audience {audience}"))
        } else {
            Err(format!(
                "{who} may not request service-account tokens for audience {audience} (verb {TOKEN_VERB}), so the kubelet pulls without credentials: grant it to group system:nodes in a ClusterRole with resources [{audience:?}] (deploy/credential-provider/rbac.yaml)"
            ))
        });
    }
    match &o.sample_service_account {
        None => findings.push(Ok(
            "sample request skipped: pass --sample-service-account NAMESPACE/NAME to run one"
                .into(),
        )),
        Some(sa) => findings.push(sample(client, o, &kubelet, sa).await),
    }
    Ok(findings)
}

async fn may_request(
    client: &kube::Client,
    node: Option<&str>,
    audience: &str,
) -> Result<bool, CheckError> {
    let attributes = ResourceAttributes {
        verb: Some(TOKEN_VERB.into()),
        group: Some(String::new()),
        resource: Some(audience.into()),
        ..Default::default()
    };
    let api_error =
        |e: kube::Error| CheckError::Api(crate::cluster::KubeError::from(e).to_string());
    let status = match node {
        Some(node) => {
            let review = SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(format!("system:node:{node}")),
                    groups: Some(vec!["system:nodes".into(), "system:authenticated".into()]),
                    resource_attributes: Some(attributes),
                    ..Default::default()
                },
                ..Default::default()
            };
            Api::<SubjectAccessReview>::all(client.clone())
                .create(&PostParams::default(), &review)
                .await
                .map_err(api_error)?
                .status
        }
        None => {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(attributes),
                    ..Default::default()
                },
                ..Default::default()
            };
            Api::<SelfSubjectAccessReview>::all(client.clone())
                .create(&PostParams::default(), &review)
                .await
                .map_err(api_error)?
                .status
        }
    };
    Ok(status.is_some_and(|s| s.allowed))
}

/// Runs the first provider as the kubelet would (its binary, args, a request on stdin with a
/// token of `sa` for its audience) for an image on its first registry.
async fn sample(client: &kube::Client, o: &CheckOptions, kubelet: &Value, sa: &str) -> Finding {
    let Some((namespace, account)) = sa.split_once('/') else {
        return Err(format!(
            "--sample-service-account {sa:?}: give NAMESPACE/NAME"
        ));
    };
    let provider = kubelet["providers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == o.name.as_str()))
        .ok_or_else(|| format!("sample request: no provider {:?} to run", o.name))?;
    let audience = provider["tokenAttributes"]["serviceAccountTokenAudience"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let host = provider["matchImages"][0]
        .as_str()
        .filter(|h| !h.contains('*'))
        .map(String::from)
        .or_else(|| o.config.registries.first().map(|r| r.host.clone()))
        .unwrap_or_default();
    let request: TokenRequest = serde_json::from_value(
        json!({"spec": {"audiences": [audience], "expirationSeconds": 600}}),
    )
    .map_err(|e| e.to_string())?;
    let token = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .map_err(|e| {
            format!(
                "sample request: no token for ServiceAccount {sa}: {}",
                crate::cluster::KubeError::from(e)
            )
        })?
        .status
        .map(|s| s.token)
        .unwrap_or_default();
    let image = format!("{host}/pull-secret-injector-check:latest");
    let input = json!({"apiVersion": API_VERSION, "kind": "CredentialProviderRequest",
        "image": image, "serviceAccountToken": token,
        "serviceAccountAnnotations": {}})
    .to_string();
    let binary = o.bin_dir.join(&o.name);
    let args: Vec<String> = provider["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let out = tokio::task::spawn_blocking(move || -> std::io::Result<std::process::Output> {
        let mut child = Command::new(&binary)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        child.wait_with_output()
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| {
        format!(
            "sample request: cannot run {}: {e}",
            o.bin_dir.join(&o.name).display()
        )
    })?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        return Err(format!(
            "sample request for {image}: the plugin failed: {stderr}"
        ));
    }
    let response: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("sample request for {image}: the answer is not JSON: {e}"))?;
    let auth = response["auth"].as_object().map(|a| a.len()).unwrap_or(0);
    if response["kind"] == "CredentialProviderResponse" && auth > 0 {
        Ok(format!(
            "sample request for {image} as {sa}: the plugin answered a credential (not shown)"
        ))
    } else {
        Err(format!(
            "sample request for {image}: the answer holds no credential"
        ))
    }
}
