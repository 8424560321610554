//! The webhook's own certificate, without cert-manager: a CA and a serving certificate for the
//! Service's DNS names, kept in a `kubernetes.io/tls` Secret of the service's namespace and
//! reused while valid, and the webhook configuration's `caBundle` kept current.
//!
//! Run as an init container in every replica: the first writes the Secret, the others (and
//! later restarts) reuse it. A renewal keeps the previous CA in `caBundle` beside the new one,
//! so replicas still serving the old certificate keep being trusted during a rollout.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::Client;

use crate::cluster::{self, KubeError};
use crate::secret::layout::{MANAGED_BY_LABEL, MANAGER};

const NOT_AFTER: &str = "pull-secret-injector.io/not-after";
const DNS_NAMES: &str = "pull-secret-injector.io/dns-names";

#[derive(Clone, Debug)]
pub struct CertsRequest {
    pub namespace: String,
    pub secret: String,
    pub service: String,
    pub webhook: Option<String>,
    pub out_dir: Option<PathBuf>,
    pub validity: Duration,
    /// A certificate with less than this left is replaced.
    pub renew_within: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("generating the certificate failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{action} {what} failed: {source}")]
    Api {
        action: &'static str,
        what: String,
        #[source]
        source: KubeError,
    },
    #[error("updating {what} failed: kept changing; try again")]
    Contended { what: String },
    #[error("writing {path} failed: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Secret {0} exists but is not a certificate made by pull-secret-injector; delete it or choose another --secret")]
    Foreign(String),
}

/// PEM texts of a CA and a serving certificate signed by it.
#[derive(Clone)]
pub struct Bundle {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    pub not_after: Timestamp,
}

/// The names a Service is reached by from the API server.
pub(crate) fn service_dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Whether a stored certificate must be replaced: unknown, for other names, or expiring soon.
pub(crate) fn needs_replacement(
    annotations: &BTreeMap<String, String>,
    dns_names: &[String],
    now: Timestamp,
    renew_within: Duration,
) -> bool {
    let names_match = annotations
        .get(DNS_NAMES)
        .is_some_and(|n| *n == dns_names.join(","));
    let not_after = annotations
        .get(NOT_AFTER)
        .and_then(|t| t.parse::<Timestamp>().ok());
    let remaining = not_after.map(|t| t.duration_since(now));
    let fresh =
        remaining.is_some_and(|r| r.as_secs() > 0 && r.as_secs() as u64 > renew_within.as_secs());
    !(names_match && fresh)
}

/// A new CA and serving certificate for `dns_names`, valid for `validity`.
pub(crate) fn generate(dns_names: &[String], validity: Duration) -> Result<Bundle, CertsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let now = Timestamp::now();
    let not_after = now
        + jiff::SignedDuration::try_from(validity)
            .unwrap_or(jiff::SignedDuration::from_hours(24 * 365));
    let to_offset = |t: Timestamp| time_from_unix(t.as_second());

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "pull-secret-injector webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = to_offset(now - jiff::SignedDuration::from_mins(5));
    ca.not_after = to_offset(not_after);
    let ca_cert = ca.self_signed(&ca_key)?;

    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(dns_names.to_vec())?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        dns_names.first().cloned().unwrap_or_default(),
    );
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    leaf.not_before = ca.not_before;
    leaf.not_after = ca.not_after;
    let cert = leaf.signed_by(&key, &Issuer::from_params(&ca, &ca_key))?;
    Ok(Bundle {
        ca_pem: ca_cert.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        not_after,
    })
}

fn time_from_unix(seconds: i64) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Makes or reuses the certificate Secret, updates the webhook's `caBundle`, writes the files.
pub async fn ensure(client: &Client, req: &CertsRequest) -> Result<Bundle, CertsError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), &req.namespace);
    let what = format!("Secret {}/{}", req.namespace, req.secret);
    let api_err = |action, e: kube::Error| CertsError::Api {
        action,
        what: what.clone(),
        source: e.into(),
    };
    let names = service_dns_names(&req.service, &req.namespace);
    let mut previous_ca = None;
    let bundle = loop {
        let stored = api
            .get_opt(&req.secret)
            .await
            .map_err(|e| api_err("reading", e))?;
        if let Some(s) = &stored {
            let managed = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MANAGED_BY_LABEL))
                .map(String::as_str)
                == Some(MANAGER);
            if !managed {
                return Err(CertsError::Foreign(what));
            }
            let annotations = s.metadata.annotations.clone().unwrap_or_default();
            if let Some(b) = bundle_from(s) {
                if !needs_replacement(&annotations, &names, Timestamp::now(), req.renew_within) {
                    tracing::info!(secret = %what, not_after = %b.not_after, "reusing the webhook certificate");
                    break b;
                }
                previous_ca = Some(b.ca_pem);
            }
        }
        let fresh = generate(&names, req.validity)?;
        let at = stored
            .as_ref()
            .and_then(|s| cluster::Stamp::of(&s.metadata));
        match cluster::create_or_replace(&api, at.as_ref(), tls_secret(req, &names, &fresh)).await {
            Ok(_) => {
                tracing::info!(secret = %what, not_after = %fresh.not_after, "wrote a new webhook certificate");
                break fresh;
            }
            // Another replica wrote it first: use theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(api_err("writing", e)),
        }
    };
    if let Some(webhook) = &req.webhook {
        set_ca_bundle(client, webhook, &bundle.ca_pem, previous_ca.as_deref()).await?;
    }
    if let Some(dir) = &req.out_dir {
        write_files(dir, &bundle)?;
    }
    Ok(bundle)
}

fn bundle_from(s: &Secret) -> Option<Bundle> {
    let data = s.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    let not_after = s
        .metadata
        .annotations
        .as_ref()?
        .get(NOT_AFTER)?
        .parse()
        .ok()?;
    Some(Bundle {
        ca_pem: text("ca.crt")?,
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
        not_after,
    })
}

fn tls_secret(req: &CertsRequest, names: &[String], b: &Bundle) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    Secret {
        metadata: ObjectMeta {
            name: Some(req.secret.clone()),
            namespace: Some(req.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGER.to_string(),
            )])),
            annotations: Some(BTreeMap::from([
                (NOT_AFTER.to_string(), b.not_after.to_string()),
                (DNS_NAMES.to_string(), names.join(",")),
            ])),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("ca.crt".to_string(), bytes(&b.ca_pem)),
            ("tls.crt".to_string(), bytes(&b.cert_pem)),
            ("tls.key".to_string(), bytes(&b.key_pem)),
        ])),
        ..Default::default()
    }
}

/// Sets every webhook's `caBundle` to the current CA, followed by the previous one if any.
pub(crate) async fn set_ca_bundle(
    client: &Client,
    webhook: &str,
    ca_pem: &str,
    previous_ca: Option<&str>,
) -> Result<(), CertsError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let what = format!("MutatingWebhookConfiguration {webhook}");
    let api_err = |action, e: kube::Error| CertsError::Api {
        action,
        what: what.clone(),
        source: e.into(),
    };
    let mut pem = ca_pem.to_string();
    if let Some(prev) = previous_ca.filter(|p| *p != ca_pem) {
        pem.push_str(prev);
    }
    let bundle = ByteString(pem.into_bytes());
    for _attempt in 0..5 {
        let mut config = api.get(webhook).await.map_err(|e| api_err("reading", e))?;
        let mut changed = false;
        for hook in config.webhooks.iter_mut().flatten() {
            if hook.client_config.ca_bundle.as_ref() != Some(&bundle) {
                hook.client_config.ca_bundle = Some(bundle.clone());
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        match api.replace(webhook, &PostParams::default(), &config).await {
            Ok(_) => {
                tracing::info!(webhook, "updated caBundle");
                return Ok(());
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(api_err("updating", e)),
        }
    }
    Err(CertsError::Contended { what })
}

fn write_files(dir: &Path, b: &Bundle) -> Result<(), CertsError> {
    let write = |name: &str, text: &str, private: bool| {
        let path = dir.join(name);
        write_file(&path, text.as_bytes(), private)
            .map_err(|source| CertsError::Write { path, source })
    };
    write("ca.crt", &b.ca_pem, false)?;
    write("tls.key", &b.key_pem, true)?;
    write("tls.crt", &b.cert_pem, false)
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    // `mode` applies only to a file it creates: an existing key file keeps its mode unless set
    // here, after the truncation and before the key is written.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    let _ = private;
    file.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(names: &[String], not_after: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (DNS_NAMES.to_string(), names.join(",")),
            (NOT_AFTER.to_string(), not_after.to_string()),
        ])
    }

    #[test]
    fn dns_names_cover_every_way_the_api_server_may_call() {
        assert_eq!(
            service_dns_names("psi", "ns"),
            ["psi", "psi.ns", "psi.ns.svc", "psi.ns.svc.cluster.local"]
        );
    }

    #[test]
    fn replacement_when_names_change_or_expiry_nears() {
        let names = service_dns_names("psi", "ns");
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let month = Duration::from_secs(30 * 86400);
        assert!(!needs_replacement(
            &annotations(&names, "2026-12-01T00:00:00Z"),
            &names,
            now,
            month
        ));
        assert!(needs_replacement(
            &annotations(&names, "2026-01-15T00:00:00Z"),
            &names,
            now,
            month
        ));
        assert!(needs_replacement(
            &annotations(&names, "2025-12-01T00:00:00Z"),
            &names,
            now,
            month
        ));
        assert!(needs_replacement(
            &annotations(&names[..2], "2026-12-01T00:00:00Z"),
            &names,
            now,
            month
        ));
        assert!(needs_replacement(&BTreeMap::new(), &names, now, month));
        assert!(needs_replacement(
            &annotations(&names, "garbage"),
            &names,
            now,
            month
        ));
    }

    #[test]
    fn generated_pair_is_served_and_trusted() {
        let names = service_dns_names("psi", "ns");
        let b = generate(&names, Duration::from_secs(86400)).unwrap();
        assert!(b.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(b.key_pem.contains("PRIVATE KEY"));
        let dir = tempfile::tempdir().unwrap();
        write_files(dir.path(), &b).unwrap();
        // The server's loader accepts it (key matches certificate).
        crate::tls::ReloadingCert::load(&dir.path().join("tls.crt"), &dir.path().join("tls.key"))
            .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("tls.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    /// A key file that already exists, readable by all, is left readable by its owner only.
    #[cfg(unix)]
    #[test]
    fn an_existing_key_file_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let names = service_dns_names("psi", "ns");
        let b = generate(&names, Duration::from_secs(86400)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("tls.key");
        std::fs::write(&key, "old").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_files(dir.path(), &b).unwrap();
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_to_string(&key).unwrap(), b.key_pem);
    }
}
