//! The background refresher: a controller over Namespaces that keeps every opted-in namespace's
//! Secret present, intact and renewed before it expires, attaches it to existing
//! ServiceAccounts, and cleans up after a namespace opts out.
//!
//! It is woken by namespace changes (labels added or removed), by changes to managed Secrets
//! (deleted or edited), by admissions that could not finish, and by its own requeue at each
//! Secret's renewal time.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::watched::Watched;
use crate::config::InjectMode;
use crate::core::accounts::Write;
use crate::core::namespaces::{Eligibility, NamespacePolicy};
use crate::core::patch;
use crate::core::subject::{IdentityScope, Subject};
use crate::secret::layout::{self, Seen, MANAGED_BY_LABEL, MANAGER};
use crate::secret::provisioner::{Known, ProvisionError, Provisioner};
use crate::secret::renewal;
use crate::settings::Settings;
use crate::slim::{self, Slim, Slimmed};

/// How long to wait before looking again at a namespace whose Secret belongs to someone else.
const CONFLICT_RECHECK: Duration = Duration::from_secs(60);
/// When to look again at a namespace waiting for its ServiceAccount, should the watch not wake
/// it first; a namespace still waiting then is reported.
const ACCOUNT_RECHECK: Duration = Duration::from_secs(300);

pub(crate) struct Refresher {
    controller: Controller<Namespace>,
    context: Arc<Context>,
    /// The pull-secret-updater compatibility controller, when configured: leader-only too.
    updater: Option<crate::compat::updater::Updater>,
    /// The watches that feed `Context::secrets` and `Context::accounts`, and wake the
    /// namespaces whose objects change. They run beside the controller rather than as its
    /// trigger streams: the controller stops polling its triggers while all its reconciles are
    /// busy, and the reconciles wait for the first full lists.
    watches: Vec<futures::future::BoxFuture<'static, ()>>,
}

struct Context {
    settings: Arc<Settings>,
    provisioner: Arc<Provisioner>,
    /// The managed Secrets as last watched (a renewal writes over the version seen).
    secrets: Arc<Watched<Seen>>,
    /// Every ServiceAccount as last watched: whether it references its pull Secret. `None`
    /// when ServiceAccounts are never needed (`inject: matchingImages`, one Secret per
    /// namespace).
    accounts: Option<Arc<Watched<bool>>>,
    /// Reconciles to run now: when a failing namespace recovers, the others failing are tried
    /// at once instead of at the end of their backoff (a token endpoint came back).
    nudge: mpsc::UnboundedSender<String>,
    /// Namespaces waiting for the ServiceAccount their Secret is minted for, seen at a recheck.
    waiting: std::sync::Mutex<std::collections::HashSet<String>>,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub(crate) struct ReconcileError(#[from] Arc<ProvisionError>);

impl Refresher {
    /// A refresher over `namespaces`, the store of the one Namespace watch that every replica
    /// runs; `changed` carries that watch's namespaces as they change (and all of them when it
    /// lists), `retry` the namespaces admissions could not finish.
    pub(crate) fn new(
        client: Client,
        settings: Arc<Settings>,
        provisioner: Arc<Provisioner>,
        namespaces: Store<Namespace>,
        changed: mpsc::UnboundedReceiver<Arc<Namespace>>,
        retry: mpsc::UnboundedReceiver<String>,
        updater: Option<crate::compat::updater::Updater>,
    ) -> Self {
        let (touched, touched_namespaces) = mpsc::unbounded_channel();
        let secrets = Arc::new(Watched::default());
        // By name as well as label: RBAC can then grant access to Secrets of this one name only
        // (`resourceNames`), never to the other Secrets of opted-in namespaces.
        let by_label = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGER}"));
        let secret_config = match settings.scope() {
            IdentityScope::Namespace => {
                by_label.fields(&format!("metadata.name={}", settings.secret_name()))
            }
            // One Secret per ServiceAccount: names vary, so by label only.
            IdentityScope::ServiceAccount => by_label,
        };
        let mut watches = vec![follow(
            Api::all(client.clone()),
            secret_config,
            secrets.clone(),
            layout::seen,
            Some((
                touched.clone(),
                Box::new(|_: &Secret| true) as Wakes<Secret>,
            )),
            None,
            provisioner.clone(),
        )];
        // ServiceAccounts: which ones lack the Secret (created before the namespace opted in,
        // or while the webhook was down), and per ServiceAccount, whose Secrets to keep. In
        // that scope a new ServiceAccount starts a reconcile (it needs a Secret of its own);
        // otherwise ServiceAccounts are attached when their namespace is next reconciled.
        // With one Secret per namespace, the ServiceAccounts the sources mint for: a namespace
        // just opted in waits on this watch for them (the controller manager makes `default`
        // some time after the namespace) instead of failing TokenRequests in a backoff.
        let minting: Vec<String> = match settings.scope() {
            IdentityScope::Namespace => {
                let mut names: Vec<String> = settings
                    .registries()
                    .iter()
                    .filter_map(|r| r.source.token_request().map(|(sa, _)| sa.to_string()))
                    .collect();
                names.sort();
                names.dedup();
                names
            }
            IdentityScope::ServiceAccount => Vec::new(),
        };
        let writes_accounts = settings.inject() == InjectMode::Always
            && settings.service_accounts().refresher_writes().is_some();
        let accounts = (settings.scope() == IdentityScope::ServiceAccount
            || writes_accounts
            || !minting.is_empty())
        .then(|| {
            let accounts = Arc::new(Watched::default());
            let settings = settings.clone();
            let scope = settings.scope();
            let applies = writes_accounts
                && settings.service_accounts().refresher_writes() == Some(Write::ServerSideApply);
            let (store, policy) = (namespaces.clone(), settings.policy.clone());
            let attached = move |sa: &ServiceAccount| {
                let subject =
                    settings.subject_for(&sa.namespace().unwrap_or_default(), &sa.name_any());
                let secret = settings.secret_of(&subject);
                patch::for_service_account(&serde_json::to_value(sa).unwrap_or_default(), &secret)
                    .0
                    .is_empty()
            };
            // `serviceAccounts: apply` patches no ServiceAccount at admission: one created
            // without the Secret, or whose Secret a GitOps tool's apply took back, starts a
            // reconcile that applies it (one whose list such a tool declares is planned to
            // nothing, so this ends there).
            let is_attached = attached.clone();
            let opted_in = move |ns: &str| {
                store.get(&ObjectRef::new(ns)).is_some_and(|n| {
                    policy.eligibility(ns, n.metadata.labels.as_ref()) == Eligibility::OptedIn
                })
            };
            // Per ServiceAccount every one starts a reconcile; per namespace only those
            // the sources mint for.
            let wakes = move |sa: &ServiceAccount| {
                scope == IdentityScope::ServiceAccount
                    || minting.iter().any(|m| sa.metadata.name.as_ref() == Some(m))
                    || (applies
                        && !is_attached(sa)
                        && opted_in(&sa.namespace().unwrap_or_default()))
            };
            let wake = Some((touched, Box::new(wakes) as Wakes<ServiceAccount>));
            // Per ServiceAccount, a deleted one's Secret goes with it (its owner): what is
            // remembered about it goes too, or its expiry would stay in the metrics and
            // count down to a false alert.
            let gone = (scope == IdentityScope::ServiceAccount).then(|| {
                let provisioner = provisioner.clone();
                Box::new(move |namespace: &str, name: &str| {
                    let (p, subject) = (
                        provisioner.clone(),
                        Subject::service_account(namespace, name),
                    );
                    tokio::spawn(async move { p.forget(&subject).await });
                }) as Gone
            });
            watches.push(follow(
                Api::all(client.clone()),
                watcher::Config::default(),
                accounts.clone(),
                attached,
                wake,
                gone,
                provisioner.clone(),
            ));
            accounts
        });
        if let Some(accounts) = &accounts {
            let accounts = accounts.clone();
            provisioner.watch_service_accounts(Box::new(move |namespace, name| {
                accounts
                    .is_synced()
                    .then(|| accounts.get(namespace, name).is_some())
            }));
        }
        // Renewals needing more mints than the ceiling allows: told while it lasts.
        watches.push(super::capacity::watch(
            client.clone(),
            settings.clone(),
            provisioner.clone(),
        ));
        // Pods admitted without the Secret: counted and told; with evictStuckPods, those stuck
        // pulling are evicted once the Secret exists (or told to be recreated).
        watches.push(super::slipped::follow(
            client.clone(),
            settings.clone(),
            namespaces.clone(),
            provisioner.clone(),
            secrets.clone(),
        ));
        let (nudge, nudged) = mpsc::unbounded_channel();
        let (listed_retry, retry_now) = mpsc::unbounded_channel();
        let p = provisioner.clone();
        watches.push(Box::pin(await_listed(
            retry,
            namespaces.clone(),
            move |ns: &str| p.failures().in_backoff(ns),
            listed_retry,
        )));
        let by_name = futures::stream::select(
            UnboundedReceiverStream::new(retry_now),
            UnboundedReceiverStream::new(nudged),
        );
        let triggers =
            futures::stream::select(by_name, UnboundedReceiverStream::new(touched_namespaces))
                .map(|ns| ObjectRef::<Namespace>::new(&ns));
        // Every namespace once the store has listed them (a new leader looks at all), then each
        // as the shared watch sees it change. The full list is sent from beside the controller,
        // like the watches: a stream the controller polls would only start when it is polled.
        let (seed, seeded) = mpsc::unbounded_channel();
        let store = namespaces.clone();
        watches.push(Box::pin(async move {
            // Not `store.wait_until_ready()` alone: the store's readiness signal wakes only its
            // latest waiter, and the controller waits on the same store.
            if crate::cluster::wait_until_ready(&store).await {
                for ns in store.state() {
                    let _ = seed.send(ns);
                }
            }
            std::future::pending::<()>().await
        }));
        let namespace_events = futures::stream::select(
            UnboundedReceiverStream::new(seeded),
            UnboundedReceiverStream::new(changed),
        );
        let controller = Controller::for_shared_stream(namespace_events, namespaces)
            .with_config(ControllerConfig::default().concurrency(RECONCILES_AT_ONCE))
            .reconcile_on(triggers);
        let context = Arc::new(Context {
            settings,
            provisioner,
            secrets,
            accounts,
            nudge,
            waiting: Default::default(),
        });
        Self {
            controller,
            context,
            updater,
            watches,
        }
    }

    /// Runs until `shutdown` resolves.
    pub(crate) async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) {
        use futures::FutureExt;
        let shutdown = shutdown.shared();
        // Expiry figures come from the replica that renews: one that stops refreshing would
        // report ever-shrinking times for Secrets another replica now keeps fresh.
        let _refreshing = Refreshing::start(self.context.provisioner.clone());
        let namespaces = self
            .controller
            .graceful_shutdown_on(shutdown.clone())
            .run(reconcile, error_policy, self.context)
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "reconcile did not complete");
                }
            });
        let refresh = async move {
            match self.updater {
                Some(updater) => {
                    tokio::join!(namespaces, updater.run(shutdown));
                }
                None => namespaces.await,
            }
        };
        // The watches never end by themselves: they stop when the refresher does, or with it
        // when it is aborted.
        tokio::select! {
            () = refresh => {}
            _ = futures::future::join_all(self.watches) => {}
        }
    }
}

/// Marks the metrics as kept by a running refresher, until dropped (also when aborted).
struct Refreshing(Arc<Provisioner>);

impl Refreshing {
    fn start(provisioner: Arc<Provisioner>) -> Self {
        provisioner.metrics().set_refreshing(true);
        Self(provisioner)
    }
}

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.0.metrics().set_refreshing(false);
    }
}

/// Reconciles running at once. Most of them wait for a mint slot or for the client's rate limit,
/// which serve in order (renewals earliest lapse first, the rest in arrival order). Namespaces
/// due beyond this bound wait in kube-runtime's scheduler, which hands them out in no
/// particular order (a hash set): with 16, a namespace could wait out a whole opt-in burst of
/// thousands while later ones went first. The bound keeps the futures of a backlog of 100,000
/// from being held at once.
const RECONCILES_AT_ONCE: u16 = 1024;

/// How long a retry waits for its namespace to appear in the store.
const RETRY_WAIT: Duration = Duration::from_secs(120);
/// Retries waiting at most at once (names come from admissions).
const RETRIES_WAITING: usize = 1024;

/// Passes on the retries of namespaces the store holds, and holds back the others until it
/// does (a namespace created while the watch was catching up, e.g. after an API server
/// restart) instead of handing them to the controller, which drops what its store lacks.
/// Retries of namespaces whose reconcile is `backing_off` are dropped: the controller tries
/// them when their backoff ends, and an admission's retry must not cut it short.
async fn await_listed(
    mut retry: mpsc::UnboundedReceiver<String>,
    store: Store<Namespace>,
    backing_off: impl Fn(&str) -> bool,
    ready: mpsc::UnboundedSender<String>,
) {
    let mut waiting = std::collections::HashMap::<String, tokio::time::Instant>::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            name = retry.recv() => match name {
                Some(name) if backing_off(&name) => {
                    tracing::debug!(namespace = %name, "retry asked while backing off; left to the backoff");
                }
                Some(name) if waiting.len() < RETRIES_WAITING || waiting.contains_key(&name) => {
                    waiting.entry(name).or_insert_with(tokio::time::Instant::now);
                }
                Some(name) => tracing::debug!(namespace = %name, "too many retries waiting; dropped"),
                None => return,
            },
            _ = tick.tick() => {}
        }
        waiting.retain(|name, since| {
            if store.get(&ObjectRef::new(name)).is_some() {
                let _ = ready.send(name.clone());
                false
            } else {
                since.elapsed() < RETRY_WAIT
            }
        });
    }
}

/// Told (namespace, name) of each object that left a watched view.
type Gone = Box<dyn Fn(&str, &str) + Send>;

/// Which changed objects wake their namespace.
type Wakes<K> = Box<dyn Fn(&K) -> bool + Send>;

/// Folds a watch of `K` (decoded slim, from the API server's cache) into `view`, names each
/// touched object's namespace on `touched`, if given (after `view` shows the change), and tells
/// `gone`, if given, each object that left the view (deleted, or missing from a relist).
/// `pull_secret_injector_watch_synced{kind}` says whether the view is complete.
fn follow<K, S>(
    api: Api<Slim<K>>,
    config: watcher::Config,
    view: Arc<Watched<S>>,
    summarise: impl Fn(&K) -> S + Send + 'static,
    touched: Option<(mpsc::UnboundedSender<String>, Wakes<K>)>,
    gone: Option<Gone>,
    provisioner: Arc<Provisioner>,
) -> futures::future::BoxFuture<'static, ()>
where
    K: Slimmed + kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + 'static,
    S: Clone + Send + Sync + 'static,
{
    use futures::{FutureExt, TryStreamExt};
    let kind = K::kind(&());
    provisioner.metrics().watch_synced(&kind, false);
    crate::cluster::watch_from_cache(api, config)
        .map_ok(slim::unwrap)
        .backoff(crate::cluster::WatchBackoff::default())
        .for_each(move |event| {
            match event {
                Ok(event) => {
                    let left = view.apply(&event, &summarise);
                    if matches!(event, watcher::Event::Init | watcher::Event::InitDone) {
                        provisioner.metrics().watch_synced(&kind, view.is_synced());
                    }
                    if let Some(gone) = &gone {
                        for (namespace, name) in &left {
                            gone(namespace, name);
                        }
                    }
                    if let Some((touched, wakes)) = &touched {
                        let changed = match &event {
                            watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o) if wakes(o) => o.namespace(),
                            _ => None,
                        };
                        let namespaces: std::collections::BTreeSet<String> =
                            changed.into_iter().chain(left.into_iter().map(|(ns, _)| ns)).collect();
                        for ns in namespaces {
                            let _ = touched.send(ns);
                        }
                    }
                }
                // Until this watch has listed once, reconciles wait for it; a lasting failure
                // here (most likely a missing RBAC rule) holds every namespace back.
                Err(e) if !view.has_listed() => tracing::warn!(error = %e, %kind, "watch cannot list; reconciles wait for its first list; retrying"),
                Err(e) => tracing::warn!(error = %e, %kind, "watch failed; retrying"),
            }
            futures::future::ready(())
        })
        .boxed()
}

/// Keeps of a Namespace (decoded slim: name, labels, deletion, its registry selection) only
/// what deciding about it needs: the labels `policy` reads, and not the uid or resourceVersion
/// (the watch has read that by now). With thousands of namespaces, the rest would be most of
/// the memory.
pub(crate) fn slim_namespace(ns: &mut Namespace, policy: &NamespacePolicy) {
    let meta = &mut ns.metadata;
    meta.uid = None;
    meta.resource_version = None;
    if let Some(labels) = meta.labels.as_mut() {
        labels.retain(|key, _| policy.reads_label(key));
    }
    if meta.labels.as_ref().is_some_and(|l| l.is_empty()) {
        meta.labels = None;
    }
}

/// Whether `view` holds a full list, waiting for its first one however long that takes: at
/// start-up a namespace not yet in the view is not read from the API server one by one (the
/// list may take a while with 100,000 Secrets); during a later relist the answer is `false`
/// and callers ask the API server, as renewals must not wait on a watch that is down.
async fn listed<S: Clone>(view: &Watched<S>) -> bool {
    view.first_list().await
}

impl Context {
    /// A namespace whose Secret waits for its ServiceAccount: not a failure (no backoff, no
    /// failure count), as a new namespace's `default` comes a little after the namespace.
    /// Told at the first wait, warned about (log and Event) when still waiting at the recheck.
    fn wait_for_account(&self, namespace: &str, account: &str) {
        let again = !self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(namespace.to_string());
        if !again {
            tracing::debug!(
                namespace,
                service_account = account,
                "waiting for the ServiceAccount the pull Secret is minted for"
            );
            return;
        }
        tracing::warn!(namespace, service_account = account, "the ServiceAccount the pull Secret is minted for does not exist; the Secret is written when it does");
        let note = format!(
            "ServiceAccount {account} does not exist in this namespace; its pull Secret is minted \
             for it and is written once it exists"
        );
        let (provisioner, regarding) = (
            self.provisioner.clone(),
            crate::cluster::reference("Namespace", namespace, namespace),
        );
        tokio::spawn(async move {
            provisioner
                .events()
                .warn(&regarding, "Provision", "ServiceAccountMissing", &note)
                .await
        });
    }

    fn done_waiting(&self, namespace: &str) {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(namespace);
    }

    /// The subject's Secret as watched. A Secret not seen before the first list completes may
    /// simply not be listed yet: wait for the list rather than read each one.
    async fn watched(&self, subject: &Subject) -> Known {
        let name = self.settings.secret_of(subject);
        let seen = match self.secrets.get(&subject.namespace, &name) {
            Some(seen) => Some(seen),
            None if listed(&self.secrets).await => self.secrets.get(&subject.namespace, &name),
            None => return Known::Unknown,
        };
        seen.map_or(Known::Absent, Known::Seen)
    }

    /// Whether every ServiceAccount of the namespace references its Secret, as watched: then
    /// there is nothing to list or patch.
    async fn accounts_attached(&self, namespace: &str) -> bool {
        match &self.accounts {
            Some(accounts) => {
                listed(accounts).await && accounts.all_in(namespace, |attached| *attached)
            }
            None => false,
        }
    }

    /// The namespace's ServiceAccounts, as watched when the watch has listed them.
    async fn service_accounts(&self, namespace: &str) -> Result<Vec<String>, ProvisionError> {
        match &self.accounts {
            Some(accounts) if listed(accounts).await => Ok(accounts.names_in(namespace)),
            _ => self.provisioner.service_accounts(namespace).await,
        }
    }
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let name = ns.name_any();
    tracing::trace!(namespace = %name, "reconcile");
    if ns.metadata.deletion_timestamp.is_some() {
        // Deleting the namespace deletes its Secret; writing into it would be refused.
        ctx.done_waiting(&name);
        return Ok(Action::await_change());
    }
    match ctx
        .settings
        .policy
        .eligibility(&name, ns.metadata.labels.as_ref())
    {
        Eligibility::OptedIn => {}
        Eligibility::NotSelected | Eligibility::Excluded => {
            ctx.done_waiting(&name);
            if ctx.secrets.any_in(&name) || ctx.provisioner.has_any(&name) {
                ctx.provisioner
                    .release(&name)
                    .await
                    .map_err(|e| ReconcileError(Arc::new(e)))?;
            }
            return Ok(Action::await_change());
        }
    }
    let subjects = match ctx.settings.scope() {
        IdentityScope::Namespace => vec![Subject::namespace(&name)],
        IdentityScope::ServiceAccount => {
            let accounts = ctx
                .service_accounts(&name)
                .await
                .map_err(|e| ReconcileError(Arc::new(e)))?;
            accounts
                .iter()
                .map(|sa| Subject::service_account(&name, sa))
                .collect()
        }
    };
    // One failing ServiceAccount does not hold back the others; the first error is retried.
    let mut next_renewal: Option<jiff::Timestamp> = None;
    let mut first_error = None;
    for subject in &subjects {
        let watched = ctx.watched(subject).await;
        match ctx.provisioner.ensure_verified(subject, watched).await {
            Ok(fresh) => {
                next_renewal = Some(next_renewal.map_or(fresh.renew_at, |t| t.min(fresh.renew_at)))
            }
            // Its annotation selects no registry: like an opt-out until the annotation changes.
            Err(e) if matches!(*e, ProvisionError::NothingSelected { .. }) => {
                ctx.provisioner
                    .release(&name)
                    .await
                    .map_err(|e| ReconcileError(Arc::new(e)))?;
                return Ok(Action::await_change());
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    // A ServiceAccount deleted while its Secret was looked at: forgotten again, in case the
    // look re-recorded what its deletion had made the watch forget.
    if let Some(accounts) = ctx
        .accounts
        .as_ref()
        .filter(|a| ctx.settings.scope() == IdentityScope::ServiceAccount && a.is_synced())
    {
        for subject in &subjects {
            let sa = subject.service_account.as_deref().unwrap_or_default();
            if accounts.get(&name, sa).is_none() {
                ctx.provisioner.forget(subject).await;
            }
        }
    }
    // With `inject: matchingImages` ServiceAccounts are left alone: the API server would copy
    // their list into every Pod, matching or not.
    // With `serviceAccounts: never` they are never touched.
    let patched = match ctx.settings.inject() {
        _ if ctx.settings.service_accounts().refresher_writes().is_none() => 0,
        InjectMode::Always if ctx.accounts_attached(&name).await => 0,
        InjectMode::Always => ctx
            .provisioner
            .attach_to_service_accounts(&name)
            .await
            .map_err(|e| ReconcileError(Arc::new(e)))?,
        InjectMode::MatchingImages => 0,
    };
    if patched > 0 {
        tracing::info!(namespace = %name, service_accounts = patched, "attached the pull Secret to existing ServiceAccounts");
    }
    if let Some(e) = first_error {
        return Err(e.into());
    }
    ctx.done_waiting(&name);
    let failures = ctx.provisioner.failures();
    // Only a recovery nudges the others: a namespace that fails for its own reasons is not
    // retried every time some other namespace renews.
    let others_failing = if failures.reconcile_succeeded(&name) {
        failures.failing_namespaces()
    } else {
        Vec::new()
    };
    if !others_failing.is_empty() {
        tracing::info!(namespace = %name, others = others_failing.len(), "recovered; retrying the other failing namespaces now");
        for other in others_failing {
            let _ = ctx.nudge.send(other);
        }
    }
    let wait = next_renewal.map_or(Duration::from_secs(3600), |at| {
        renewal::until(at, jiff::Timestamp::now())
    });
    Ok(Action::requeue(wait.max(Duration::from_secs(1))))
}

fn error_policy(ns: Arc<Namespace>, error: &ReconcileError, ctx: Arc<Context>) -> Action {
    let name = ns.name_any();
    if matches!(*error.0, ProvisionError::Conflict { .. }) {
        tracing::warn!(namespace = %name, error = %error, "not managing this namespace's Secret");
        return Action::requeue(CONFLICT_RECHECK);
    }
    if let ProvisionError::NoServiceAccount { name: account, .. } = &*error.0 {
        if ctx.settings.scope() == IdentityScope::Namespace {
            ctx.wait_for_account(&name, account);
            return Action::requeue(ACCOUNT_RECHECK);
        }
    }
    ctx.provisioner.metrics().renewal_failures.inc();
    let attempt = ctx.provisioner.failures().reconcile_failed(&name);
    // The previous Secret, if any, stays in place and keeps serving until it expires.
    let wait = renewal::retry_delay(attempt, 0.5 + fastrand::f64());
    tracing::warn!(namespace = %name, error = %error, attempt, retry_in_ms = wait.as_millis() as u64, "reconcile failed; retrying");
    Action::requeue(wait)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;

    fn namespace(name: &str) -> Namespace {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap()
    }

    #[test]
    fn a_namespace_keeps_the_labels_the_selector_reads() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
        let selector: LabelSelector =
            serde_json::from_value(serde_json::json!({"matchLabels": {"inject": "enabled"}}))
                .unwrap();
        let policy = NamespacePolicy::new(selector, None, &[]);
        let mut ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {
            "name": "team", "uid": "u", "resourceVersion": "5",
            "labels": {"inject": "enabled", "kubernetes.io/metadata.name": "team"},
            "annotations": {"pull-secret-injector.io/registries": "r.example"}}}))
        .unwrap();
        slim_namespace(&mut ns, &policy);
        let expected: Namespace = serde_json::from_value(serde_json::json!({"metadata": {
            "name": "team", "labels": {"inject": "enabled"},
            "annotations": {"pull-secret-injector.io/registries": "r.example"}}}))
        .unwrap();
        assert_eq!(ns, expected);
        let mut other = namespace("other");
        other.metadata.labels = Some([("team".to_string(), "a".to_string())].into());
        slim_namespace(&mut other, &policy);
        assert_eq!(
            other.metadata.labels, None,
            "no label the selector reads: none kept"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_waits_for_its_namespace_to_be_listed() {
        let (store, mut writer) = reflector::store::<Namespace>();
        writer.apply_watcher_event(&watcher::Event::Apply(namespace("known")));
        let (retry, retries) = mpsc::unbounded_channel();
        let (ready, mut passed) = mpsc::unbounded_channel();
        tokio::spawn(await_listed(retries, store, |_: &str| false, ready));

        retry.send("known".to_string()).unwrap();
        retry.send("late".to_string()).unwrap();
        retry.send("never".to_string()).unwrap();
        assert_eq!(passed.recv().await.as_deref(), Some("known"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(
            passed.try_recv().is_err(),
            "nothing passes before it is listed"
        );

        writer.apply_watcher_event(&watcher::Event::Apply(namespace("late")));
        assert_eq!(passed.recv().await.as_deref(), Some("late"));
        // `never` is given up after RETRY_WAIT; listed later, it is not passed on.
        tokio::time::sleep(RETRY_WAIT).await;
        writer.apply_watcher_event(&watcher::Event::Apply(namespace("never")));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(passed.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_of_a_namespace_backing_off_is_left_to_its_backoff() {
        let (store, mut writer) = reflector::store::<Namespace>();
        for name in ["failing", "fine"] {
            writer.apply_watcher_event(&watcher::Event::Apply(namespace(name)));
        }
        let failures = Arc::new(crate::secret::failures::Failures::default());
        failures.reconcile_failed("failing");
        let (retry, retries) = mpsc::unbounded_channel();
        let (ready, mut passed) = mpsc::unbounded_channel();
        let f = failures.clone();
        tokio::spawn(await_listed(
            retries,
            store,
            move |ns: &str| f.in_backoff(ns),
            ready,
        ));
        retry.send("failing".to_string()).unwrap();
        retry.send("fine".to_string()).unwrap();
        assert_eq!(passed.recv().await.as_deref(), Some("fine"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(passed.try_recv().is_err(), "the backoff is not cut short");
        // Once its reconcile succeeds, a retry passes again.
        failures.reconcile_succeeded("failing");
        retry.send("failing".to_string()).unwrap();
        assert_eq!(passed.recv().await.as_deref(), Some("failing"));
    }
}
