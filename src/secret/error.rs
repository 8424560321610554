//! Why a pull Secret could not be made sure of: one variant per situation, each naming the
//! object it is about.

use std::sync::Arc;

use crate::cluster::KubeError;
use crate::sources::MintError;

/// Why a Secret could not be made sure of. Each variant names the object it is about; the
/// text reaches logs, admission warnings and Events as it is.
#[derive(Clone, Debug, thiserror::Error)]
pub(crate) enum ProvisionError {
    #[error("Secret {namespace}/{name} exists and is not managed by pull-secret-injector; it is left untouched")]
    Conflict { namespace: String, name: String },
    #[error("minting a credential for {registry} failed: {source}")]
    Mint {
        registry: String,
        /// Shared: the error is cached with the failed attempt and handed to every waiter.
        #[source]
        source: Arc<MintError>,
    },
    /// Every mint failed and nothing stored is still unexpired.
    #[error("minting a credential for {registries} failed: no registry has a usable credential")]
    NoUsableCredential { registries: String },
    #[error(
        "namespace {namespace} selects no configured registry (annotation {annotation}: {value:?})"
    )]
    NothingSelected {
        namespace: String,
        annotation: &'static str,
        value: String,
    },
    /// Per ServiceAccount: the ServiceAccount does not exist (a review can name any).
    #[error("ServiceAccount {namespace}/{name} does not exist")]
    NoServiceAccount { namespace: String, name: String },
    #[error("{action} Secret {namespace}/{name} failed: {source}")]
    Secret {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: KubeError,
    },
    #[error("listing the pull Secrets in namespace {namespace} failed: {source}")]
    ListSecrets {
        namespace: String,
        #[source]
        source: KubeError,
    },
    #[error("{action} ServiceAccount {namespace}/{name} failed: {source}")]
    ServiceAccount {
        action: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: KubeError,
    },
    #[error("listing the ServiceAccounts in namespace {namespace} failed: {source}")]
    ListServiceAccounts {
        namespace: String,
        #[source]
        source: KubeError,
    },
    /// The namespace's registry annotation, for a namespace the watch has not seen yet.
    #[error("reading Namespace {namespace} failed: {source}")]
    Namespace {
        namespace: String,
        #[source]
        source: KubeError,
    },
    /// Writers or editors kept getting in the way.
    #[error("{action} {kind} {namespace}/{name} failed: {reason}")]
    Contended {
        action: &'static str,
        kind: &'static str,
        namespace: String,
        name: String,
        reason: &'static str,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kube_error() -> KubeError {
        kube::Error::Api(
            kube::core::Status::failure("forbidden by policy", "Forbidden")
                .with_code(403)
                .boxed(),
        )
        .into()
    }

    /// Every variant names what it is about in a sentence an operator can read (these texts
    /// reach logs, admission warnings and Events); none runs a word into a name or a `*`.
    #[test]
    fn errors_read_as_sentences() {
        let ns = || "team-a".to_string();
        let cases = [
            (
                ProvisionError::ListServiceAccounts { namespace: ns(), source: kube_error() },
                "listing the ServiceAccounts in namespace team-a failed: ",
            ),
            (
                ProvisionError::ListSecrets { namespace: ns(), source: kube_error() },
                "listing the pull Secrets in namespace team-a failed: ",
            ),
            (
                ProvisionError::Namespace { namespace: ns(), source: kube_error() },
                "reading Namespace team-a failed: ",
            ),
            (
                ProvisionError::ServiceAccount {
                    action: "patching",
                    namespace: ns(),
                    name: "builder".into(),
                    source: kube_error(),
                },
                "patching ServiceAccount team-a/builder failed: ",
            ),
            (
                ProvisionError::Secret {
                    action: "reading",
                    namespace: ns(),
                    name: "pull-secret".into(),
                    source: kube_error(),
                },
                "reading Secret team-a/pull-secret failed: ",
            ),
            (
                ProvisionError::Contended {
                    action: "patching",
                    kind: "ServiceAccount",
                    namespace: ns(),
                    name: "builder".into(),
                    reason: "it kept changing while being patched",
                },
                "patching ServiceAccount team-a/builder failed: it kept changing while being patched",
            ),
            (
                ProvisionError::NoUsableCredential { registries: "cgr.dev, quay.io".into() },
                "minting a credential for cgr.dev, quay.io failed: no registry has a usable credential",
            ),
        ];
        for (error, start) in cases {
            let text = error.to_string();
            assert!(
                text.starts_with(start),
                "{text:?} should start with {start:?}"
            );
            assert!(!text.contains('*') && !text.contains("/for "), "{text:?}");
        }
    }

    /// The API server's answer is kept as the source, and shown.
    #[test]
    fn api_errors_keep_their_source() {
        let e = ProvisionError::ListServiceAccounts {
            namespace: "team-a".into(),
            source: kube_error(),
        };
        assert!(e.to_string().contains("forbidden by policy"), "{e}");
        assert!(std::error::Error::source(&e).is_some());
    }

    /// A failed mint keeps the source's typed error as its `source`, and its text.
    #[test]
    fn mint_errors_keep_the_typed_source() {
        let e = ProvisionError::Mint {
            registry: "cgr.dev".into(),
            source: Arc::new(MintError::Unusable {
                source_name: "chainguard",
                reason: "empty token".into(),
            }),
        };
        assert_eq!(
            e.to_string(),
            "minting a credential for cgr.dev failed: chainguard returned an unusable credential: empty token"
        );
        let source = std::error::Error::source(&e).expect("a source");
        assert!(source.downcast_ref::<Arc<MintError>>().is_some());
    }
}
