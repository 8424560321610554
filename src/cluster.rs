//! What every part that writes to the API server shares: its errors as an operator needs them,
//! a write that never overwrites a concurrent one, and the Warning Events users read with
//! `kubectl get events`.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::Client;

/// A failed API call. Displays as the server's message and status, nothing more; the error
/// itself stays reachable as the source, so that callers can match on its status code.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{}", describe(.0))]
pub struct KubeError(#[source] Arc<kube::Error>);

impl From<kube::Error> for KubeError {
    fn from(e: kube::Error) -> Self {
        Self(Arc::new(e))
    }
}

fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

/// The version of a stored object that a write replaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub resource_version: String,
    /// Sent too: should the object have been deleted and made again, the write is refused
    /// even were the version to match.
    pub uid: Option<String>,
}

impl Stamp {
    /// `None` for an object the API server has not stored (no resourceVersion).
    pub fn of(meta: &ObjectMeta) -> Option<Self> {
        Some(Self {
            resource_version: meta.resource_version.clone()?,
            uid: meta.uid.clone(),
        })
    }
}

/// Writes `secret` over the version `at` (read, or as watched): created if there was none,
/// otherwise replaced at exactly that version, so a concurrent writer makes this fail with 409
/// instead of being overwritten.
pub(crate) async fn create_or_replace(
    api: &Api<Secret>,
    at: Option<&Stamp>,
    mut secret: Secret,
) -> kube::Result<Secret> {
    let params = PostParams::default();
    match at {
        None => api.create(&params, &secret).await,
        Some(at) => {
            secret.metadata.resource_version = Some(at.resource_version.clone());
            secret.metadata.uid = at.uid.clone();
            let name = secret.metadata.name.clone().unwrap_or_default();
            api.replace(&name, &params, &secret).await
        }
    }
}

/// The `reportingController` of the service's Events (`status` shows only those).
pub(crate) const REPORTING_CONTROLLER: &str = "pull-secret-injector";

/// The service's Warning Events, reported under one controller name and this replica's
/// identity.
#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
    budget: Arc<std::sync::Mutex<crate::api_client::Bucket>>,
}

/// Events recorded per second at most, after a burst of [`EVENT_BURST`]; those beyond are
/// dropped and counted ([`EVENTS_DROPPED`]), as client-go's event recorder drops spam. Events
/// share the client's rate limit with the Secret writes: without a budget of their own, a few
/// thousand namespaces warned about together (an opt-in burst whose ServiceAccounts come
/// slowly) queued ahead of the writes for seconds. What each Event says is also logged.
const EVENTS_PER_SECOND: f64 = 5.0;
const EVENT_BURST: u32 = 100;

/// Events not recorded because the budget was spent. One count per process.
pub(crate) static EVENTS_DROPPED: std::sync::LazyLock<
    prometheus_client::metrics::counter::Counter,
> = std::sync::LazyLock::new(Default::default);

impl Events {
    pub fn new(client: Client, instance: Option<String>) -> Self {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.into(),
            instance,
        };
        let budget = crate::api_client::Bucket::new(
            EVENTS_PER_SECOND,
            EVENT_BURST,
            tokio::time::Instant::now(),
        );
        Self {
            recorder: Recorder::new(client, reporter),
            budget: Arc::new(std::sync::Mutex::new(budget)),
        }
    }

    /// Records a Warning about `regarding`. A failure to record is logged, not returned: an
    /// Event is a courtesy, never a reason to fail the work it describes.
    pub(crate) async fn warn(
        &self,
        regarding: &ObjectReference,
        action: &str,
        reason: &str,
        note: &str,
    ) {
        let within = self
            .budget
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .try_take(tokio::time::Instant::now());
        if !within {
            EVENTS_DROPPED.inc();
            tracing::debug!(
                namespace = regarding.namespace.as_deref().unwrap_or_default(),
                reason,
                "event not recorded: too many at once"
            );
            return;
        }
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            // The API server refuses notes over 1 kB.
            note: Some(note.chars().take(1000).collect()),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, regarding).await {
            tracing::warn!(
                namespace = regarding.namespace.as_deref().unwrap_or_default(),
                error = %KubeError::from(e),
                "could not record event"
            );
        }
    }
}

/// A reference to a core/v1 object, for an Event about it.
pub(crate) fn reference(kind: &str, namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some(kind.into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        ..Default::default()
    }
}

/// Waits for a store's first full list. Polled on a short timer: the store's readiness signal
/// wakes only its most recent waiter (the refresher and its controller wait on the same store).
pub(crate) async fn wait_until_ready<K>(store: &kube::runtime::reflector::Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(
            std::time::Duration::from_millis(100),
            store.wait_until_ready(),
        )
        .await
        {
            Ok(ready) => return ready.is_ok(),
            Err(_) => continue,
        }
    }
}

/// The backoff of this service's watches: 250 ms doubling up to 5 s, from the start again after
/// the first event that gets through. kube's default grows to 30 s and resets only after two
/// quiet minutes, so a watch that failed a few times while the API server restarted stayed
/// blind for half a minute after it was back: to namespaces opted in meanwhile, too.
#[derive(Clone, Debug)]
pub(crate) struct WatchBackoff {
    next: std::time::Duration,
}

impl WatchBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(250);
    const MAX: std::time::Duration = std::time::Duration::from_secs(5);
}

impl Default for WatchBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

impl Iterator for WatchBackoff {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<Self::Item> {
        let now = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        // Up to a quarter less, so that many watches failing together do not retry together.
        Some(now.mul_f64(1.0 - fastrand::f64() / 4.0))
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// A watch whose (re)lists the API server answers from its watch cache where it can: a
/// streaming list (a watch that starts with the objects there are, `sendInitialEvents` at
/// resourceVersion 0; on by default from 1.34), which also holds no page of objects at once.
/// Where the server refuses one (its `WatchList` feature off, as by default in 1.33): pages of
/// 500, as before; on 1.33 the first page comes from the cache (a consistent read) and the
/// others from etcd. Not `resourceVersion=0` unpaged: one response with every object, Pods
/// of a whole cluster included.
pub(crate) fn watch_from_cache<K>(
    api: Api<K>,
    config: watcher::Config,
) -> futures::stream::BoxStream<'static, watcher::Result<watcher::Event<K>>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    use futures::StreamExt;
    let paged = config.clone();
    let mut current = watcher(api.clone(), config.streaming_lists()).boxed();
    let mut streaming = true;
    futures::stream::poll_fn(move |cx| loop {
        match futures::ready!(current.poll_next_unpin(cx)) {
            Some(Err(e)) if streaming && streaming_refused(&e) => {
                tracing::info!(kind = %K::kind(&Default::default()), "the API server offers no streaming lists; listing in pages");
                streaming = false;
                current = watcher(api.clone(), paged.clone()).boxed();
            }
            next => return std::task::Poll::Ready(next),
        }
    })
    .boxed()
}

/// Whether a watch failed because the API server does not offer streaming lists: it refuses
/// `sendInitialEvents` as invalid (422) when its `WatchList` feature is off.
fn streaming_refused(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 422)
}

#[cfg(test)]
mod list_tests {
    use super::*;

    #[test]
    fn only_a_refused_streaming_list_falls_back_to_pages() {
        let api = |code: u16| {
            kube::Error::Api(Box::new(
                kube::core::Status::failure("refused", "Invalid").with_code(code),
            ))
        };
        for (error, refused) in [
            (watcher::Error::WatchStartFailed(api(422)), true),
            (watcher::Error::WatchStartFailed(api(403)), false),
            (watcher::Error::WatchStartFailed(api(500)), false),
            (watcher::Error::WatchFailed(api(422)), false),
            (watcher::Error::InitialListFailed(api(422)), false),
        ] {
            assert_eq!(streaming_refused(&error), refused, "{error:?}");
        }
    }
}

#[cfg(test)]
mod backoff_tests {
    use super::WatchBackoff;
    use kube::runtime::utils::Backoff;
    use std::time::Duration;

    #[test]
    fn doubles_up_to_five_seconds_and_starts_again_after_a_reset() {
        let mut b = WatchBackoff::default();
        let delays: Vec<Duration> = (&mut b).take(8).collect();
        let bounds = [250, 500, 1000, 2000, 4000, 5000, 5000, 5000];
        for (d, max) in delays.iter().zip(bounds) {
            let max = Duration::from_millis(max);
            assert!(*d <= max && *d >= max.mul_f64(0.75), "{delays:?}");
        }
        b.reset();
        assert!(b.next().unwrap() <= Duration::from_millis(250));
    }
}

/// The group version and resource policy mode depends on (GA in Kubernetes 1.36).
pub(crate) const POLICY_GROUP_VERSION: &str = "admissionregistration.k8s.io/v1";
pub(crate) const POLICY_RESOURCE: &str = "mutatingadmissionpolicies";

/// Whether a discovery answer for [`POLICY_GROUP_VERSION`] lists MutatingAdmissionPolicy.
pub(crate) fn serves_admission_policies(
    resources: &k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResourceList,
) -> bool {
    resources
        .resources
        .iter()
        .any(|r| r.name == POLICY_RESOURCE)
}

/// Whether the API server serves MutatingAdmissionPolicy v1. A group version it does not
/// serve at all is a plain no.
pub async fn policy_api_served(client: &kube::Client) -> Result<bool, kube::Error> {
    match client.list_api_group_resources(POLICY_GROUP_VERSION).await {
        Ok(list) => Ok(serves_admission_policies(&list)),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// In policy mode the API server adds the Secret; one that does not serve the API adds
/// nothing, silently. Says so, loudly, once at start.
pub(crate) async fn check_policy_api(client: &kube::Client) {
    match policy_api_served(client).await {
        Ok(true) => tracing::info!("policy mode: the API server serves MutatingAdmissionPolicy v1"),
        Ok(false) => tracing::error!(
            "admission.mode is policy, but this API server does not serve {POLICY_RESOURCE} in \
             {POLICY_GROUP_VERSION} (Kubernetes 1.36+): no Pod gets the pull Secret at \
             admission; install the webhook mode instead"
        ),
        Err(e) => tracing::warn!(
            error = %e,
            "policy mode: cannot ask the API server whether it serves MutatingAdmissionPolicy v1"
        ),
    }
}

#[cfg(test)]
mod policy_api_tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{APIResource, APIResourceList};

    #[test]
    fn policy_mode_needs_mutating_admission_policies_in_v1() {
        let list = |names: &[&str]| APIResourceList {
            group_version: POLICY_GROUP_VERSION.into(),
            resources: names
                .iter()
                .map(|n| APIResource {
                    name: n.to_string(),
                    ..Default::default()
                })
                .collect(),
        };
        for (names, served) in [
            (
                &[
                    "mutatingwebhookconfigurations",
                    "validatingadmissionpolicies",
                ][..],
                false,
            ),
            (
                &[
                    "mutatingadmissionpolicies",
                    "mutatingadmissionpolicybindings",
                ][..],
                true,
            ),
            (&[][..], false),
        ] {
            assert_eq!(serves_admission_policies(&list(names)), served, "{names:?}");
        }
    }
}
