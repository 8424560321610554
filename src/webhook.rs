//! From an AdmissionReview to its answer: decode, decide whether the namespace is served, build
//! the patch, and make sure the Secret it points at exists, within the admission budget.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};

use crate::admission::{self, Review, ReviewError, Target, Verdict};
use crate::config::InjectMode;
use crate::images;
use crate::leadership::RetrySlot;
use crate::metrics::Metrics;
use crate::provisioner::{ProvisionError, Provisioner};
use crate::selector::{Eligibility, NamespacePolicy};
use crate::subject::IdentityScope;

pub struct Webhook {
    client: Client,
    policy: NamespacePolicy,
    namespaces: Store<Namespace>,
    provisioner: Arc<Provisioner>,
    budget: Duration,
    /// Namespaces whose Secret could not be made during an admission: the refresher retries.
    retry: RetrySlot,
    metrics: Arc<Metrics>,
    /// Secrets whose provisioning was slow to fail, or outlasted the budget, in the last few
    /// seconds: while a token endpoint hangs, admissions answer at once instead of each waiting
    /// the budget again. Quick failures (a ServiceAccount not created yet) are not held: the
    /// next admission simply tries again. The refresher keeps retrying with its own backoff.
    failed_recently: moka::future::Cache<String, ()>,
}

/// How long a slow admission-time failure stops further admission-time attempts for that Secret.
const FAILURE_HOLD: Duration = Duration::from_secs(5);
/// A failure that took this long is an endpoint worth not waiting on again at once.
const SLOW_FAILURE: Duration = Duration::from_secs(1);

impl Webhook {
    pub fn new(
        client: Client,
        policy: NamespacePolicy,
        namespaces: Store<Namespace>,
        provisioner: Arc<Provisioner>,
        budget: Duration,
        retry: RetrySlot,
        metrics: Arc<Metrics>,
    ) -> Self {
        let failed_recently = moka::future::Cache::builder()
            .time_to_live(FAILURE_HOLD)
            .build();
        Self {
            client,
            policy,
            namespaces,
            provisioner,
            budget,
            retry,
            metrics,
            failed_recently,
        }
    }

    /// Answers one AdmissionReview body. Only an unreadable body is an error.
    pub async fn review(&self, body: &[u8]) -> Result<Vec<u8>, ReviewError> {
        let started = std::time::Instant::now();
        let review = match admission::decode(body) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.admission("other", "invalid");
                return Err(e);
            }
        };
        let (verdict, outcome) = self.decide(&review, body).await;
        let kind = review.request.target().map_or("other", |t| t.as_str());
        self.metrics.admission(kind, outcome);
        self.metrics
            .admission_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(admission::encode(&review, &verdict))
    }

    /// The answer, and the outcome word for metrics. `body` is the review as received, for
    /// what `review` does not hold (container images).
    async fn decide(&self, review: &Review, body: &[u8]) -> (Verdict, &'static str) {
        let req = &review.request;
        let (Some(target), Some(namespace)) = (req.target(), req.namespace.as_deref()) else {
            return (Verdict::unchanged(), "unchanged");
        };
        if !self.opted_in(namespace).await {
            return (Verdict::unchanged(), "unchanged");
        }
        let selection = self.provisioner.selection_from_store(namespace);
        if selection.hosts.is_empty() {
            let warning = format!("pull-secret-injector: namespace {namespace} selects no configured registry (annotation {}); nothing injected", crate::selector::REGISTRIES_ANNOTATION);
            return (Verdict::unchanged().warn(warning), "unchanged");
        }
        let Some(object) = req.object.as_ref() else {
            return (
                Verdict::unchanged()
                    .warn("pull-secret-injector: the request carries no object to patch"),
                "invalid",
            );
        };
        if self.provisioner.inject_mode() == InjectMode::MatchingImages {
            if target != Target::Pod {
                return (Verdict::unchanged(), "unchanged");
            }
            match admission::images(body) {
                Ok(found) if images::any_on(found.iter().map(String::as_str), &selection.hosts) => {
                }
                Ok(_) => return (Verdict::unchanged(), "unchanged"),
                Err(e) => {
                    return (
                        Verdict::unchanged()
                            .warn(format!("pull-secret-injector: {e}; nothing injected")),
                        "invalid",
                    )
                }
            }
        }
        let service_account = match target {
            Target::Pod => object.pod_service_account(),
            Target::ServiceAccount => object.name(),
        };
        let scope = self.provisioner.scope();
        if scope == IdentityScope::ServiceAccount && service_account.is_empty() {
            return (Verdict::unchanged().warn("pull-secret-injector: a ServiceAccount without a name cannot get its own Secret"), "unchanged");
        }
        let subject = self.provisioner.subject_for(namespace, service_account);
        let secret = subject.secret_name(self.provisioner.secret_name());
        let patch = admission::patch_for(target, object, &secret);
        tracing::debug!(
            namespace,
            kind = target.as_str(),
            dry_run = req.is_dry_run(),
            ops = patch.0.len(),
            "admission"
        );
        // Dry runs must have no side effects (sideEffects: NoneOnDryRun): no mint, no write.
        if req.is_dry_run() {
            return (Verdict::patched(patch), "patched");
        }
        // Per ServiceAccount, a ServiceAccount being created cannot have a token minted for it
        // yet: the refresher provisions its Secret once it exists.
        if scope == IdentityScope::ServiceAccount && target == Target::ServiceAccount {
            return (Verdict::patched(patch), "patched");
        }
        let fresh = self.provisioner.is_fresh(&subject).await;
        self.metrics.cache_lookup(fresh);
        if fresh {
            return (Verdict::patched(patch), "patched");
        }
        if self.failed_recently.contains_key(&subject.key()) {
            let warning = format!("pull-secret-injector: Secret {secret} is not ready yet (provisioning failed moments ago); it is retried in the background");
            return (Verdict::patched(patch).warn(warning), "not_ready");
        }
        // Provisioning runs in its own task so that it completes even when this admission stops
        // waiting for it; concurrent admissions join the same attempt.
        let provisioner = self.provisioner.clone();
        let s = subject.clone();
        let started = std::time::Instant::now();
        let attempt = tokio::spawn(async move { provisioner.ensure(&s).await });
        let outcome = tokio::time::timeout(self.budget, attempt).await;
        match outcome {
            Ok(Ok(Ok(_))) => (Verdict::patched(patch), "patched"),
            Ok(Ok(Err(e)))
                if matches!(
                    *e,
                    ProvisionError::Conflict { .. } | ProvisionError::NothingSelected { .. }
                ) =>
            {
                tracing::warn!(namespace, error = %e, "not injecting");
                (
                    Verdict::unchanged().warn(format!("pull-secret-injector: {e}")),
                    "conflict",
                )
            }
            Ok(Ok(Err(e))) => {
                if started.elapsed() >= SLOW_FAILURE {
                    self.failed_recently.insert(subject.key(), ()).await;
                }
                tracing::warn!(namespace, error = %e, "pull Secret not ready at admission; retrying in the background");
                self.request_retry(namespace);
                (Verdict::patched(patch).warn(format!("pull-secret-injector: Secret {secret} is not ready yet ({e}); it is retried in the background")), "not_ready")
            }
            Ok(Err(join_error)) => {
                tracing::error!(namespace, error = %join_error, "provisioning task failed");
                self.request_retry(namespace);
                (Verdict::patched(patch).warn(format!("pull-secret-injector: Secret {secret} is not ready yet; it is retried in the background")), "not_ready")
            }
            Err(_elapsed) => {
                self.failed_recently.insert(subject.key(), ()).await;
                tracing::warn!(
                    namespace,
                    budget_ms = self.budget.as_millis() as u64,
                    "pull Secret not ready within the admission budget"
                );
                let warning = format!(
                    "pull-secret-injector: Secret {secret} was not ready within {}ms; it is being provisioned in the background",
                    self.budget.as_millis()
                );
                (Verdict::patched(patch).warn(warning), "not_ready")
            }
        }
    }

    /// Asks this replica's refresher, if it runs one, to try the namespace again soon. (Without
    /// one, the leader's own retries and watches cover it.)
    fn request_retry(&self, namespace: &str) {
        if let Some(tx) = self
            .retry
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let _ = tx.send(namespace.to_string());
        }
    }

    /// Whether the namespace is served. The watch-fed store answers at no cost; a namespace it
    /// does not show as selected (new, or its label just added) is read from the API server.
    async fn opted_in(&self, namespace: &str) -> bool {
        if self.policy.is_excluded(namespace) {
            return false;
        }
        let labels_of = |ns: &Namespace| {
            self.policy
                .eligibility(namespace, ns.metadata.labels.as_ref())
        };
        if let Some(ns) = self.namespaces.get(&ObjectRef::new(namespace)) {
            if labels_of(&ns) == Eligibility::OptedIn {
                return true;
            }
        }
        match Api::<Namespace>::all(self.client.clone())
            .get_opt(namespace)
            .await
        {
            Ok(Some(ns)) => labels_of(&ns) == Eligibility::OptedIn,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(namespace, error = %crate::kube_error_message(&e), "cannot read namespace; not injecting");
                false
            }
        }
    }
}
