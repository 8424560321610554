//! The async shell around [`decide`]: it looks up the namespace's facts, runs the decision, and
//! when the decision is to provision, makes sure of the Secret within the admission budget.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};

use super::decide::{decide, invalid_names, Decision, NamespaceFacts, Outcome};
use super::review::{self, Review, ReviewError, Verdict};
use crate::cluster::KubeError;
use crate::core::namespaces::Eligibility;
use crate::core::subject::Subject;
use crate::metrics::Metrics;
use crate::refresh::inbox::Inbox;
use crate::secret::pacer::Caller;
use crate::secret::provisioner::{ProvisionError, Provisioner};
use crate::secret::renewal;
use crate::settings::Settings;

pub struct Webhook {
    client: Client,
    settings: Arc<Settings>,
    namespaces: Store<Namespace>,
    namespace_watch: Arc<NamespaceWatch>,
    provisioner: Arc<Provisioner>,
    /// Namespaces whose Secret could not be made during an admission: the refresher retries.
    inbox: Inbox,
    metrics: Arc<Metrics>,
}

/// The least a slow admission-time failure stops further admission-time attempts for that
/// Secret: while a token endpoint hangs, admissions answer at once instead of each waiting the
/// budget again.
const FAILURE_HOLD: Duration = Duration::from_secs(5);
/// A failure that took this long is an endpoint worth not waiting on again at once.
const SLOW_FAILURE: Duration = Duration::from_secs(1);

/// How long admissions stop trying a Secret after their `attempt`-th failure in a row. A
/// first quick failure is not held: it is most often a ServiceAccount created a moment later
/// (the namespace's `default`, whose own admission comes first), and the next admission then
/// succeeds. From the second on, quick failures back off as the refresher does (exponential
/// from 1 s to a minute, scaled by `spread`): otherwise each Pod created in a namespace whose
/// source fails at once would cost a mint slot and an Event. A slow failure holds at least
/// [`FAILURE_HOLD`].
pub(crate) fn failure_hold(attempt: u32, slow: bool, spread: f64) -> Duration {
    if slow {
        renewal::retry_delay(attempt, spread).max(FAILURE_HOLD)
    } else if attempt <= 1 {
        Duration::ZERO
    } else {
        renewal::retry_delay(attempt - 1, spread)
    }
}

/// How long an admission waits for the Namespace watch to show its namespace opted in: the
/// API server sends a review only once its own view has the namespace opted in, and this
/// service's watch follows the same changes moments later.
const WATCH_LAG: Duration = Duration::from_secs(1);

/// How current the Namespace watch (which fills the store) is, and a signal at each change it
/// applied: an admission that does not find its namespace opted in waits on it.
#[derive(Default)]
pub struct NamespaceWatch {
    changed: tokio::sync::Notify,
    /// Listed, and no error since: a namespace it lacks does not exist (or only for as long as
    /// the watch lags).
    current: AtomicBool,
}

impl NamespaceWatch {
    /// The watch applied a change (or completed a list) to the store.
    pub(crate) fn applied(&self) {
        self.current.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// The watch failed: until it applies a change again, the API server is asked instead.
    pub(crate) fn failed(&self) {
        self.current.store(false, Ordering::Release);
    }

    fn is_current(&self) -> bool {
        self.current.load(Ordering::Acquire)
    }
}

impl Webhook {
    pub fn new(
        client: Client,
        settings: Arc<Settings>,
        namespaces: Store<Namespace>,
        namespace_watch: Arc<NamespaceWatch>,
        provisioner: Arc<Provisioner>,
        inbox: Inbox,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            settings,
            namespaces,
            namespace_watch,
            provisioner,
            inbox,
            metrics,
        }
    }

    /// Answers one AdmissionReview body. Only an unreadable body is an error.
    pub async fn review(&self, body: &[u8]) -> Result<Vec<u8>, ReviewError> {
        let started = Instant::now();
        let review = match review::decode(body) {
            Ok(r) => r,
            Err(e) => {
                self.metrics.admission("other", "invalid");
                return Err(e);
            }
        };
        let (verdict, outcome) = self.answer(&review, body).await;
        let kind = review.request.target().map_or("other", |t| t.as_str());
        self.metrics.admission(kind, outcome.as_str());
        self.metrics
            .admission_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(review::encode(&review, &verdict))
    }

    async fn answer(&self, review: &Review, body: &[u8]) -> (Verdict, Outcome) {
        // Everything the admission waits for (the namespace lookup, the Secret) shares one
        // budget, whatever the API server or a token endpoint does.
        let deadline = tokio::time::Instant::now() + self.settings.admission().budget;
        // Before any lookup: a crafted name must cost no API call, no mint and no state.
        if let Some(why) = invalid_names(review, &self.settings) {
            tracing::debug!("admission with an invalid name; nothing injected");
            return (Verdict::unchanged().warn(why), Outcome::Invalid);
        }
        let req = &review.request;
        let facts = match (req.target(), req.namespace.as_deref()) {
            (Some(_), Some(namespace)) => self.facts(namespace, deadline).await,
            _ => NamespaceFacts::not_served(),
        };
        match decide(review, body, &facts, &self.settings) {
            Decision::Answer(verdict, outcome) => (verdict, outcome),
            Decision::Provision {
                subject,
                secret,
                patch,
            } => {
                tracing::debug!(%subject, ops = patch.0.len(), "admission");
                self.provisioned(&subject, &secret, Verdict::patched(patch), deadline)
                    .await
            }
        }
    }

    /// `patched` once the subject's Secret is there, or with a warning when it is not ready
    /// within the budget; unchanged when the Secret cannot be ours.
    async fn provisioned(
        &self,
        subject: &Subject,
        secret: &str,
        patched: Verdict,
        deadline: tokio::time::Instant,
    ) -> (Verdict, Outcome) {
        let fresh = self.provisioner.is_fresh(subject).await;
        self.metrics.cache_lookup(fresh);
        if fresh {
            return (patched, Outcome::Patched);
        }
        let failures = self.provisioner.failures();
        let key = subject.key();
        let not_ready = |patched: Verdict, why: &str| {
            let warning = format!(
                "pull-secret-injector: Secret {secret} {why}; it is retried in the background"
            );
            (patched.warn(warning), Outcome::NotReady)
        };
        if failures.is_held(&key) {
            return not_ready(
                patched,
                "is not ready yet (provisioning failed moments ago)",
            );
        }
        // Provisioning runs in its own task so that it completes even when this admission stops
        // waiting for it; concurrent admissions join the same attempt.
        let (provisioner, s) = (self.provisioner.clone(), subject.clone());
        let started = Instant::now();
        let attempt = tokio::spawn(async move { provisioner.ensure(&s, Caller::Admission).await });
        let budget = self.settings.admission().budget;
        let namespace = subject.namespace.as_str();
        match tokio::time::timeout_at(deadline, attempt).await {
            Ok(Ok(Ok(_))) => (patched, Outcome::Patched),
            Ok(Ok(Err(e)))
                if matches!(
                    *e,
                    ProvisionError::Conflict { .. } | ProvisionError::NothingSelected { .. }
                ) =>
            {
                tracing::warn!(namespace, error = %e, "not injecting");
                (
                    Verdict::unchanged().warn(format!("pull-secret-injector: {e}")),
                    Outcome::Conflict,
                )
            }
            // Nothing to retry until the ServiceAccount exists; the refresher's ServiceAccount
            // watch starts its Secret then.
            Ok(Ok(Err(e))) if matches!(*e, ProvisionError::NoServiceAccount { .. }) => {
                tracing::debug!(namespace, error = %e, "not provisioning at admission");
                not_ready(patched, &format!("is not ready yet ({e})"))
            }
            Ok(Ok(Err(e))) => {
                let attempt = failures.admission_failed(&key);
                let slow = started.elapsed() >= SLOW_FAILURE;
                let hold = failure_hold(attempt, slow, 0.5 + fastrand::f64());
                failures.hold(&key, hold);
                tracing::warn!(namespace, error = %e, attempt, hold_ms = hold.as_millis() as u64, "pull Secret not ready at admission; retrying in the background");
                self.inbox.retry(namespace);
                not_ready(patched, &format!("is not ready yet ({e})"))
            }
            Ok(Err(join_error)) => {
                tracing::error!(namespace, error = %join_error, "provisioning task failed");
                self.inbox.retry(namespace);
                not_ready(patched, "is not ready yet")
            }
            Err(_elapsed) => {
                let attempt = failures.admission_failed(&key);
                failures.hold(&key, failure_hold(attempt, true, 0.5 + fastrand::f64()));
                tracing::warn!(
                    namespace,
                    budget_ms = budget.as_millis() as u64,
                    "pull Secret not ready within the admission budget"
                );
                let warning = format!(
                    "pull-secret-injector: Secret {secret} was not ready within {}ms; it is being \
                     provisioned in the background",
                    budget.as_millis()
                );
                (patched.warn(warning), Outcome::NotReady)
            }
        }
    }

    /// Whether the namespace is served, and the registries it selects (as the watch last saw its
    /// annotation). The watch-fed store answers at no cost. A namespace it does not show opted
    /// in (new, or its label just added) is waited for, up to [`WATCH_LAG`]: a review names
    /// any namespace it likes, and asking the API server about each would let callers spend
    /// its requests. Only while the watch has not listed, or has failed since, is the API
    /// server asked instead. Either way within the budget.
    async fn facts(&self, namespace: &str, deadline: tokio::time::Instant) -> NamespaceFacts {
        let policy = &self.settings.policy;
        if policy.is_excluded(namespace) {
            return NamespaceFacts::not_served();
        }
        let opted_in = |ns: &Namespace| {
            policy.eligibility(namespace, ns.metadata.labels.as_ref()) == Eligibility::OptedIn
        };
        let watched_opted_in = || {
            self.namespaces
                .get(&ObjectRef::new(namespace))
                .is_some_and(|ns| opted_in(&ns))
        };
        let opted_in = if watched_opted_in() {
            true
        } else if self.namespace_watch.is_current() {
            let until = deadline.min(tokio::time::Instant::now() + WATCH_LAG);
            loop {
                let changed = self.namespace_watch.changed.notified();
                tokio::pin!(changed);
                // Registered before looking, so a change applied meanwhile is not missed.
                changed.as_mut().enable();
                if watched_opted_in() {
                    break true;
                }
                tokio::select! {
                    () = &mut changed => {}
                    () = tokio::time::sleep_until(until) => {
                        tracing::debug!(namespace, "namespace not opted in as watched; not injecting");
                        break false;
                    }
                }
            }
        } else {
            let api = Api::<Namespace>::all(self.client.clone());
            match tokio::time::timeout_at(deadline, api.get_opt(namespace)).await {
                Ok(Ok(Some(ns))) => opted_in(&ns),
                Ok(Ok(None)) => false,
                Ok(Err(e)) => {
                    tracing::warn!(namespace, error = %KubeError::from(e), "cannot read namespace; not injecting");
                    false
                }
                // Unconfirmed within the budget: not served, so it gets no mint slot.
                Err(_elapsed) => {
                    tracing::warn!(namespace, "namespace not confirmed by the API server within the admission budget; not injecting");
                    false
                }
            }
        };
        NamespaceFacts {
            opted_in,
            selection: self.provisioner.selection_from_store(namespace),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_failed_admissions_back_off_like_the_refresher_and_slow_ones_hold_longer() {
        let s = |d: Duration| d.as_secs_f64();
        // (attempt, slow, spread) → seconds held
        let cases = [
            (1, false, 1.0, 0.0),
            (2, false, 1.0, 1.0),
            (3, false, 1.0, 2.0),
            (5, false, 1.0, 8.0),
            (5, false, 0.5, 4.0),
            (20, false, 1.0, 60.0),
            (1, true, 1.0, 5.0),
            (4, true, 1.0, 8.0),
            (20, true, 1.5, 90.0),
        ];
        for (attempt, slow, spread, held) in cases {
            assert_eq!(
                s(failure_hold(attempt, slow, spread)),
                held,
                "attempt {attempt}, slow {slow}, spread {spread}"
            );
        }
    }
}
