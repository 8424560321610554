//! Keeps one pull Secret per opted-in namespace filled with fresh credentials. This is where a
//! token goes from its source into the Secret: mint every configured registry's credential,
//! build the Secret (`layout`), write it, and remember it in an expiry-aware cache until it
//! is due for renewal (`renewal`).
//!
//! The cache is what keeps admissions cheap: while a namespace's entry is fresh, an admission
//! makes no API call at all, and concurrent admissions in a cold namespace share one mint
//! (moka's `try_get_with` runs a single initialiser per key).

mod accounts;

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, ListParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::Client;
use moka::future::Cache;
use moka::Expiry;

pub(crate) use super::error::ProvisionError;
use super::failures::Failures;
use super::layout::{self, Assessment, Issued, Seen, Version};
use super::pacer::{Caller, MintPacer};
use super::renewal;
use super::write;
use crate::cluster::{self, Events};
use crate::core::credential::Credential;
use crate::core::namespaces::{self, Selection};
use crate::core::patch;
use crate::core::subject::{IdentityScope, Subject};
use crate::http::HttpClient;
use crate::metrics::Metrics;
use crate::settings::Settings;
use crate::sources::MintContext;

/// A namespace's Secret as last written or adopted, and when it is due.
#[derive(Clone, Debug)]
pub(crate) struct Fresh {
    pub issued: Issued,
    pub renew_at: Timestamp,
}

pub struct Provisioner {
    client: Client,
    settings: Arc<Settings>,
    /// The watched namespaces, for their registry selection annotation.
    namespaces: Store<Namespace>,
    http: HttpClient,
    cache: Cache<String, Fresh>,
    events: Events,
    metrics: Arc<Metrics>,
    pacer: MintPacer,
    failures: Failures,
    /// ServiceAccounts an admission found missing lately (`ns/sa`), so that reviews naming
    /// them again cost no GET. Briefly, and only for admissions: the refresher acts on
    /// ServiceAccounts its watch has seen, and its lookup clears an entry.
    absent_accounts: Cache<String, ()>,
    /// With one Secret per namespace, whether the refresher's ServiceAccount watch holds
    /// `namespace/name` (`None` until it has listed): a renewal waits for the ServiceAccount it
    /// mints for instead of spending a mint slot on a TokenRequest the API server answers 404.
    watched_accounts: std::sync::OnceLock<AccountView>,
}

/// What the refresher's watch knows of a subject's Secret.
#[derive(Clone, Debug)]
pub(crate) enum Known {
    /// Nothing (the watch has not listed, or is listing again): the API server is asked.
    Unknown,
    /// The watch has listed and holds no managed Secret of that name.
    Absent,
    Seen(Seen),
}

/// The stored Secret a provisioning starts from.
#[derive(Debug)]
enum Stored {
    /// Read from the API server; `None`: there is none.
    Read(Option<Box<Secret>>),
    /// As the refresher's watch last saw it, with no credentials; `None`: there is none.
    Watched(Option<Seen>),
}

impl Stored {
    fn assessment(&self) -> Assessment {
        match self {
            Stored::Read(secret) => layout::assess(secret.as_deref()),
            Stored::Watched(seen) => seen
                .as_ref()
                .map_or(Assessment::Missing, |s| s.assessment.clone()),
        }
    }

    fn is_watched(&self) -> bool {
        matches!(self, Stored::Watched(_))
    }

    /// The version a write replaces; `None`: a write creates.
    fn version(&self) -> Option<Version> {
        match self {
            Stored::Read(secret) => secret.as_deref().and_then(Version::of),
            Stored::Watched(seen) => seen.as_ref().and_then(|s| s.version.clone()),
        }
    }

    /// The credentials it holds, to carry over into the next version (none when watched).
    fn carried(&self) -> std::collections::BTreeMap<String, Credential> {
        match self {
            Stored::Read(Some(secret)) => match layout::assess(Some(secret)) {
                Assessment::Intact(issued) => layout::stored_credentials(secret, &issued),
                _ => Default::default(),
            },
            _ => Default::default(),
        }
    }
}

/// What a round of mints gave, by registry host: the credentials, and the failures.
type Minted = (Vec<(String, Credential)>, Vec<(String, ProvisionError)>);

/// Whether the ServiceAccount `(namespace, name)` exists as watched; `None` when not known.
pub(crate) type AccountView = Box<dyn Fn(&str, &str) -> Option<bool> + Send + Sync>;

/// How long an admission trusts that a ServiceAccount does not exist.
const ABSENT_ACCOUNT_TTL: Duration = Duration::from_secs(10);
/// ServiceAccounts remembered as missing at most (names come from reviews).
const ABSENT_ACCOUNTS_KEPT: u64 = 10_000;

/// Cache entries live until their renewal time, so an entry that is present is fresh.
struct UntilRenewal;

impl Expiry<String, Fresh> for UntilRenewal {
    fn expire_after_create(&self, _: &String, value: &Fresh, _: Instant) -> Option<Duration> {
        Some(renewal::until(value.renew_at, Timestamp::now()))
    }
}

impl Provisioner {
    pub fn new(
        client: Client,
        http: HttpClient,
        namespaces: Store<Namespace>,
        settings: Arc<Settings>,
        events: Events,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            pacer: MintPacer::new(super::capacity::pacing_rate(
                0.0,
                settings.config.refresh.max_mints_per_second,
            )),
            client,
            settings,
            namespaces,
            http,
            cache: Cache::builder().expire_after(UntilRenewal).build(),
            events,
            metrics,
            failures: Failures::default(),
            absent_accounts: Cache::builder()
                .time_to_live(ABSENT_ACCOUNT_TTL)
                .max_capacity(ABSENT_ACCOUNTS_KEPT)
                .build(),
            watched_accounts: std::sync::OnceLock::new(),
        }
    }

    /// Hands over the refresher's ServiceAccount watch (once; later calls are ignored).
    pub(crate) fn watch_service_accounts(&self, view: AccountView) {
        let _ = self.watched_accounts.set(view);
    }

    /// With one Secret per namespace: a ServiceAccount that a due registry mints for and that
    /// the watch, having listed, does not hold. Admissions are not held back (the watch may lag
    /// a ServiceAccount just created, and the TokenRequest is the authority).
    fn missing_account(
        &self,
        subject: &Subject,
        caller: Caller,
        hosts: &[String],
    ) -> Option<String> {
        if subject.service_account.is_some() || caller != Caller::Refresher {
            return None;
        }
        let view = self.watched_accounts.get()?;
        self.settings
            .registries()
            .iter()
            .filter(|r| hosts.contains(&r.host))
            .filter_map(|r| r.source.token_request().map(|(sa, _)| sa))
            .find(|sa| view(&subject.namespace, sa) == Some(false))
            .map(str::to_string)
    }

    /// Paces mints at `per_second` from now on (the refresher follows the renewal need).
    pub(crate) fn set_mint_rate(&self, per_second: f64) {
        self.pacer.set_rate(per_second);
        self.metrics.set_mint_rate(self.pacer.rate());
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The Warning Events recorder, shared with the refresher's Pod watch.
    pub(crate) fn events(&self) -> &Events {
        &self.events
    }

    /// What went wrong lately, per Secret: shared with the admission shell and the refresher.
    pub(crate) fn failures(&self) -> &Failures {
        &self.failures
    }

    /// The subject's Secret, fresh. Answers from the cache when it can (no I/O); otherwise one
    /// caller per subject provisions and the others wait for its result. `caller` says whose
    /// turn at the mint pacer it takes.
    pub(crate) async fn ensure(
        &self,
        subject: &Subject,
        caller: Caller,
    ) -> Result<Fresh, Arc<ProvisionError>> {
        self.ensure_from(subject, caller, None).await
    }

    /// [`ensure`](Self::ensure), provisioning from `stored` when given instead of reading it.
    async fn ensure_from(
        &self,
        subject: &Subject,
        caller: Caller,
        stored: Option<Stored>,
    ) -> Result<Fresh, Arc<ProvisionError>> {
        self.cache
            .try_get_with(subject.key(), self.provision(subject, caller, stored))
            .await
    }

    /// Like [`ensure`](Self::ensure), but first checks the stored Secret against the cache, so a
    /// Secret that was deleted or edited since it was written is noticed and restored.
    /// `known` is the Secret as the refresher's watch last saw it: when it confirms the cache,
    /// or can be adopted as it is, the Secret is not read; a renewal writes over the version
    /// watched, unread (a write that loses a race reads it then).
    pub(crate) async fn ensure_verified(
        &self,
        subject: &Subject,
        known: Known,
    ) -> Result<Fresh, Arc<ProvisionError>> {
        let namespace = subject.namespace.as_str();
        let key = subject.key();
        let mut from = match known {
            Known::Unknown => None,
            Known::Absent => Some(Stored::Watched(None)),
            Known::Seen(seen) => Some(Stored::Watched(Some(seen))),
        };
        let watched = match &from {
            Some(Stored::Watched(Some(seen))) => match &seen.assessment {
                Assessment::Intact(issued) => Some(issued.clone()),
                _ => None,
            },
            _ => None,
        };
        if let Some(cached) = self.cache.get(&key).await {
            let found = match watched {
                Some(issued) if issued == cached.issued => Assessment::Intact(issued),
                // Not seen, or not as written: the watch may lag, so ask the API server.
                _ => {
                    let stored = self.read(subject).await?;
                    let found = layout::assess(stored.as_deref());
                    from = Some(Stored::Read(stored));
                    found
                }
            };
            let selection = self.selection(namespace).await?;
            let selected_as_cached = cached
                .issued
                .registries
                .keys()
                .all(|h| selection.hosts.contains(h))
                && selection
                    .hosts
                    .iter()
                    .all(|h| cached.issued.registries.contains_key(h));
            match found {
                Assessment::Intact(i) if i == cached.issued && selected_as_cached => {
                    return Ok(cached)
                }
                Assessment::Intact(i) if i == cached.issued => {
                    tracing::info!(namespace, registries = ?selection.hosts, "registry selection changed")
                }
                found => {
                    tracing::info!(%subject, ?found, "stored Secret differs from the one written; restoring")
                }
            }
            self.cache.invalidate(&key).await;
        } else if let Some(issued) = watched {
            // Adoption (after a restart or a change of leader) straight from the watch.
            let selection = self.selection(namespace).await?;
            // Unknown or no registries are for `provision` to report.
            if selection.unknown.is_empty() && !selection.hosts.is_empty() {
                let configured: Vec<&str> = selection.hosts.iter().map(String::as_str).collect();
                self.record_stored(subject, Some(&issued));
                if let Ok(fresh) =
                    self.decide(subject, Some(&issued), &configured, Timestamp::now())
                {
                    tracing::debug!(%subject, expires_at = %fresh.issued.expires_at, "adopted the stored Secret as watched");
                    self.failures.provisioned(&key);
                    self.cache.insert(key, fresh.clone()).await;
                    return Ok(fresh);
                }
            }
        }
        self.ensure_from(subject, Caller::Refresher, from).await
    }

    /// Records a Secret known to be fresh (as written by another replica), without reading it.
    pub async fn remember(&self, subject: &Subject, issued: Issued) {
        let selection = self.selection_from_store(&subject.namespace);
        self.record_stored(subject, Some(&issued));
        let fresh = self.fresh(subject, issued, &selection.hosts);
        self.failures.provisioned(&subject.key());
        self.cache.insert(subject.key(), fresh).await;
    }

    /// Finishes the cache's pending bookkeeping; returns how many entries it holds.
    pub(crate) async fn settle_cache(&self) -> u64 {
        self.cache.run_pending_tasks().await;
        self.cache.entry_count()
    }

    /// Whether the subject's entry is cached and fresh: no I/O.
    pub(crate) async fn is_fresh(&self, subject: &Subject) -> bool {
        // contains_key honours expiry and, unlike get, clones nothing.
        self.cache.contains_key(&subject.key())
    }

    /// Whether any Secret of the namespace is cached (it has been served).
    pub(crate) fn has_any(&self, namespace: &str) -> bool {
        match self.settings.scope() {
            // One key per namespace: a lookup, not a scan (this runs for every namespace that
            // is not selected, at every resync).
            IdentityScope::Namespace => self.cache.contains_key(namespace),
            IdentityScope::ServiceAccount => {
                let prefix = format!("{namespace}/");
                self.cache.iter().any(|(k, _)| k.starts_with(&prefix))
            }
        }
    }

    /// Drops everything remembered about namespaces the Namespace watch no longer shows
    /// (deleted, or gone while the watch was down): cache entries, failure counts and their
    /// metrics. State is kept only for namespaces that exist.
    pub(crate) async fn forget_gone(&self) {
        let known = |key: &str| {
            let namespace = key.split('/').next().unwrap_or(key);
            self.namespaces.get(&ObjectRef::new(namespace)).is_some()
        };
        let gone: Vec<String> = self
            .cache
            .iter()
            .map(|(k, _)| k.to_string())
            .filter(|k| !known(k))
            .collect();
        for key in &gone {
            self.cache.invalidate(key).await;
        }
        self.failures.retain(known);
        self.metrics.retain_secrets(known);
        if !gone.is_empty() {
            tracing::debug!(
                secrets = gone.len(),
                "forgot the Secrets of deleted namespaces"
            );
        }
    }

    /// Forgets one subject (its ServiceAccount was deleted, and its Secret with it): cache
    /// entry, failure counts and its expiry in the metrics.
    pub(crate) async fn forget(&self, subject: &Subject) {
        let key = subject.key();
        self.cache.invalidate(&key).await;
        self.failures.forget(&key);
        self.metrics.secret_released(&key);
        tracing::debug!(%subject, "forgot a deleted ServiceAccount's Secret");
    }

    /// Opt-out: forgets the namespace, deletes its Secrets that are ours, and takes back the
    /// references this service added to ServiceAccounts.
    pub(crate) async fn release(&self, namespace: &str) -> Result<(), ProvisionError> {
        let prefix = format!("{namespace}/");
        let keys: Vec<String> = self
            .cache
            .iter()
            .map(|(k, _)| k.to_string())
            .filter(|k| k == namespace || k.starts_with(&prefix))
            .collect();
        for key in keys {
            self.cache.invalidate(&key).await;
            self.metrics.secret_released(&key);
        }
        self.metrics.secret_released(namespace);
        let api = self.secrets(namespace);
        let names = match self.settings.scope() {
            IdentityScope::Namespace => vec![self.settings.secret_name().to_string()],
            IdentityScope::ServiceAccount => {
                let lp = ListParams::default().labels(&format!(
                    "{}={}",
                    layout::MANAGED_BY_LABEL,
                    layout::MANAGER
                ));
                let list =
                    api.list_metadata(&lp)
                        .await
                        .map_err(|e| ProvisionError::ListSecrets {
                            namespace: namespace.into(),
                            source: e.into(),
                        })?;
                list.items
                    .into_iter()
                    .filter_map(|m| m.metadata.name)
                    .collect()
            }
        };
        for name in names {
            let Some(secret) = api
                .get_opt(&name)
                .await
                .map_err(|e| self.api_error("reading", namespace, &name, e))?
            else {
                continue;
            };
            if layout::is_managed(&secret) {
                // Preconditioned on the object we looked at: never delete a Secret replaced since.
                let dp = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: secret.metadata.uid.clone(),
                        resource_version: secret.metadata.resource_version.clone(),
                    }),
                    ..Default::default()
                };
                match api.delete(&name, &dp).await {
                    Ok(_) => {
                        tracing::info!(namespace, secret = %name, "namespace opted out; deleted its pull Secret")
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(self.api_error("deleting", namespace, &name, e)),
                }
            }
        }
        // `serviceAccounts: never` never touches a ServiceAccount, not even to take back.
        if self.settings.service_accounts().detaches() {
            self.for_each_service_account(namespace, patch::remove_from_service_account)
                .await?;
        }
        Ok(())
    }

    /// The registries `namespace` gets, from its annotation as the watch last saw it; a
    /// namespace the watch has not seen yet (just created) is read from the API server.
    async fn selection(&self, namespace: &str) -> Result<Selection, ProvisionError> {
        let configured = self.settings.hosts();
        if let Some(ns) = self.namespaces.get(&ObjectRef::new(namespace)) {
            return Ok(namespaces::registries_for(
                namespaces::registries_annotation(&ns),
                &configured,
            ));
        }
        let ns = Api::<Namespace>::all(self.client.clone())
            .get_opt(namespace)
            .await
            .map_err(|e| ProvisionError::Namespace {
                namespace: namespace.into(),
                source: e.into(),
            })?;
        Ok(namespaces::registries_for(
            ns.as_ref().and_then(namespaces::registries_annotation),
            &configured,
        ))
    }

    /// The registries `namespace` gets, as the watch last saw its annotation (no I/O).
    pub(crate) fn selection_from_store(&self, namespace: &str) -> Selection {
        let configured = self.settings.hosts();
        let ns = self.namespaces.get(&ObjectRef::new(namespace));
        namespaces::registries_for(
            ns.as_deref().and_then(namespaces::registries_annotation),
            &configured,
        )
    }

    fn secrets(&self, namespace: &str) -> Api<Secret> {
        Api::namespaced(self.client.clone(), namespace)
    }

    fn api_error(
        &self,
        action: &'static str,
        namespace: &str,
        name: &str,
        e: kube::Error,
    ) -> ProvisionError {
        ProvisionError::Secret {
            action,
            namespace: namespace.into(),
            name: name.into(),
            source: e.into(),
        }
    }

    /// The subject's Secret as stored now.
    async fn read(&self, subject: &Subject) -> Result<Option<Box<Secret>>, ProvisionError> {
        let name = self.settings.secret_of(subject);
        self.secrets(&subject.namespace)
            .get_opt(&name)
            .await
            .map(|s| s.map(Box::new))
            .map_err(|e| self.api_error("reading", &subject.namespace, &name, e))
    }

    /// Works out from what is stored (`stored`, or else read), registry by registry, what is
    /// still good and what must be minted (`renewal::Schedule::decide`); adopts the Secret when
    /// nothing is due, otherwise mints what is due and writes the next version over the
    /// version it started from. A registry whose source fails keeps its previous credential
    /// while that is unexpired, and does not hold back the others: the Secret is written with
    /// what could be had and retried soon. A write that loses a race with another writer reads
    /// again once.
    async fn provision(
        &self,
        subject: &Subject,
        caller: Caller,
        stored: Option<Stored>,
    ) -> Result<Fresh, ProvisionError> {
        let namespace = subject.namespace.as_str();
        let name = self.settings.secret_of(subject);
        let api = self.secrets(namespace);
        // Per ServiceAccount, one that does not exist gets nothing: no read of its Secret, no
        // mint slot, no TokenRequest and no Event (a crafted review can name any).
        let owner = match &subject.service_account {
            Some(sa) => Some(self.owner(namespace, sa, caller).await?),
            None => None,
        };
        let selected = self.selected(namespace).await?;
        let configured: Vec<&str> = selected.iter().map(String::as_str).collect();
        let mut given = stored;
        let mut raced = false;
        loop {
            let mut stored = match given.take() {
                Some(stored) => stored,
                None => Stored::Read(self.read(subject).await?),
            };
            let previous = match stored.assessment() {
                Assessment::Foreign => return Err(self.foreign(namespace, name).await),
                Assessment::Intact(issued) => Some(issued),
                Assessment::Missing | Assessment::Tampered | Assessment::Outdated => None,
            };
            let now = Timestamp::now();
            self.record_stored(subject, previous.as_ref());
            let plan = match self.decide(subject, previous.as_ref(), &configured, now) {
                Ok(fresh) => {
                    tracing::debug!(%subject, expires_at = %fresh.issued.expires_at, "adopted the stored Secret");
                    self.failures.provisioned(&subject.key());
                    return Ok(fresh);
                }
                Err(plan) => plan,
            };
            // Credentials carried over unrenewed are in the stored Secret only (a watch keeps
            // none): read it for them. A whole renewal needs none.
            if stored.is_watched() && previous.is_some() && !plan.keep.is_empty() {
                continue;
            }
            let (minted, failed) = self
                .mint_due(subject, caller, &plan, previous.as_ref())
                .await?;
            // A registry whose mint failed keeps its stored credential while that lasts.
            let lasting = |(host, _): &(String, ProvisionError)| {
                previous
                    .as_ref()
                    .and_then(|p| p.registries.get(host))
                    .is_some_and(|l| l.expires_at > now)
            };
            if stored.is_watched() && failed.iter().any(lasting) {
                stored = Stored::Read(self.read(subject).await?);
            }
            let carried = stored.carried();
            if !failed.is_empty() {
                let note = write::mint_failed_note(&failed, &carried, now);
                let regarding = cluster::reference("Secret", namespace, &name);
                self.warn(&regarding, "MintFailed", &note).await;
            }
            let dropping = !plan.drop.is_empty();
            let next =
                match write::next_version(&configured, &minted, &failed, carried, dropping, now) {
                    Ok(next) => next,
                    Err(e) => {
                        self.failures.incomplete_write(&subject.key());
                        return Err(e);
                    }
                };
            let (mut secret, issued) = layout::build(namespace, &name, &next.credentials);
            if let Some(owner) = &owner {
                // Owned by its ServiceAccount: deleting the ServiceAccount deletes the Secret.
                secret.metadata.owner_references = Some(vec![owner.clone()]);
            }
            let version = stored.version();
            let written = match &version {
                Some(v) if layout::unchanged(&v.written, &secret) => {
                    // Nothing would change (a source handed back the stored credential, or a
                    // plan asked for a write it should not have): counted, not sent to etcd.
                    self.metrics.secret_write_skipped("provisioner");
                    tracing::debug!(%subject, secret = %name, "the Secret already holds what would be written; not written");
                    Ok(())
                }
                _ => cluster::create_or_replace(&api, version.as_ref().map(|v| &v.stamp), secret)
                    .await
                    .map(drop),
            };
            match written {
                Ok(()) => {
                    if next.failed == 0 {
                        self.failures.complete_write(&subject.key());
                    } else {
                        self.failures.incomplete_write(&subject.key());
                    }
                    self.failures.provisioned(&subject.key());
                    self.record_stored(subject, Some(&issued));
                    let fresh = self.fresh(subject, issued, &configured);
                    tracing::info!(%subject, secret = %name, minted = ?plan.mint, failed = next.failed, expires_at = %fresh.issued.expires_at, renew_at = %fresh.renew_at, "wrote pull Secret");
                    return Ok(fresh);
                }
                // Written (or, for a replace, deleted) by someone else since the version this
                // started from was read or watched: read it, once, and start again from it. A
                // create answered 404 has no namespace to write in: reported as it is.
                Err(kube::Error::Api(s))
                    if (s.code == 409 || (s.code == 404 && version.is_some())) && !raced =>
                {
                    raced = true;
                    tracing::debug!(
                        namespace,
                        code = s.code,
                        "pull Secret changed since it was read or watched; reading it again"
                    );
                }
                Err(kube::Error::Api(s))
                    if s.code == 409 || (s.code == 404 && version.is_some()) =>
                {
                    return Err(ProvisionError::Contended {
                        action: "writing",
                        kind: "Secret",
                        namespace: namespace.into(),
                        name,
                        reason: "conflicting writers",
                    })
                }
                Err(e) => {
                    let action = if version.is_some() {
                        "replacing"
                    } else {
                        "creating"
                    };
                    return Err(self.api_error(action, namespace, &name, e));
                }
            }
        }
    }

    /// The configured registries the namespace selects; what its annotation names wrongly is
    /// reported on the Namespace, and selecting none is an error.
    async fn selected(&self, namespace: &str) -> Result<Vec<String>, ProvisionError> {
        let selection = self.selection(namespace).await?;
        let regarding = cluster::reference("Namespace", namespace, namespace);
        if !selection.unknown.is_empty() {
            let note = format!(
                "annotation {} names registries that are not configured: {}; they are ignored",
                namespaces::REGISTRIES_ANNOTATION,
                selection.unknown.join(", ")
            );
            self.warn(&regarding, "UnknownRegistry", &note).await;
        }
        if selection.hosts.is_empty() {
            let value = self
                .namespaces
                .get(&ObjectRef::new(namespace))
                .as_deref()
                .and_then(namespaces::registries_annotation)
                .unwrap_or_default()
                .to_string();
            let e = ProvisionError::NothingSelected {
                namespace: namespace.into(),
                annotation: namespaces::REGISTRIES_ANNOTATION,
                value,
            };
            self.warn(&regarding, "NoRegistrySelected", &e.to_string())
                .await;
            return Err(e);
        }
        Ok(selection.hosts)
    }

    /// The error, and the Event, for a Secret of our name that someone else owns.
    async fn foreign(&self, namespace: &str, name: String) -> ProvisionError {
        let note = format!(
            "Secret {name} exists and is not managed by pull-secret-injector (label \
             app.kubernetes.io/managed-by); it is not overwritten and is not injected. Rename or \
             delete it, or change secretName."
        );
        let regarding = cluster::reference("Secret", namespace, &name);
        self.warn(&regarding, "SecretNotManaged", &note).await;
        ProvisionError::Conflict {
            namespace: namespace.into(),
            name,
        }
    }

    /// Mints what the plan says is due, taking a mint slot first: what was minted, and what
    /// failed.
    async fn mint_due(
        &self,
        subject: &Subject,
        caller: Caller,
        plan: &renewal::Plan,
        previous: Option<&Issued>,
    ) -> Result<Minted, ProvisionError> {
        if let Some(name) = self.missing_account(subject, caller, &plan.mint) {
            // Not a failure: the ServiceAccount watch wakes the namespace when it appears.
            return Err(ProvisionError::NoServiceAccount {
                namespace: subject.namespace.clone(),
                name,
            });
        }
        if !plan.mint.is_empty() {
            // Renewals falling behind go earliest lapse first; a registry with nothing stored
            // has nothing that lasts.
            let lapses_at = match caller {
                Caller::Admission => None,
                Caller::Refresher => plan
                    .mint
                    .iter()
                    .map(|h| {
                        previous
                            .and_then(|p| p.registries.get(h))
                            .map(|l| l.expires_at)
                    })
                    .collect::<Option<Vec<_>>>()
                    .and_then(|at| at.into_iter().min()),
            };
            self.pacer.wait(caller, lapses_at).await;
        }
        Ok(self.mint_some(subject, &plan.mint).await)
    }

    /// When the subject's credentials fall due: one schedule for the plan and the freshness.
    fn schedule(&self, subject: &Subject) -> renewal::Schedule {
        renewal::Schedule::for_subject(subject, self.settings.renew_before())
    }

    /// What to do about a stored Secret: its cache entry when nothing is due (it covers exactly
    /// the configured registries and none is due yet), otherwise the plan of what to write.
    fn decide(
        &self,
        subject: &Subject,
        stored: Option<&Issued>,
        configured: &[&str],
        now: Timestamp,
    ) -> Result<Fresh, renewal::Plan> {
        match self.schedule(subject).decide(stored, configured, now) {
            renewal::Decision::Keep { issued, renew_at } => Ok(Fresh {
                issued: issued.clone(),
                renew_at,
            }),
            renewal::Decision::Write(plan) => Err(plan),
        }
    }

    /// Records the expiry and renewal times of credentials stored (found, or just written) for
    /// the metrics. Found ones are recorded before any renewal: should it fail, the metrics
    /// still show how long the stored credentials last, and that they are overdue.
    fn record_stored(&self, subject: &Subject, issued: Option<&Issued>) {
        if let Some(issued) = issued {
            let tracked = super::capacity::Tracked::of(issued, &self.schedule(subject));
            self.metrics.secret_written(&subject.key(), tracked);
        }
    }

    /// The renewal time of credentials just written (or known to be stored).
    fn fresh(&self, subject: &Subject, issued: Issued, configured: &[impl AsRef<str>]) -> Fresh {
        let key = subject.key();
        let configured: Vec<&str> = configured.iter().map(AsRef::as_ref).collect();
        let incomplete = self.failures.incomplete(&key);
        let retry = renewal::retry_delay(incomplete.max(1), 0.5 + fastrand::f64());
        let renew_at =
            self.schedule(subject)
                .next_renewal(&issued, &configured, Timestamp::now(), retry);
        Fresh { issued, renew_at }
    }

    /// Mints the credentials of `hosts` concurrently; returns what was minted and what failed.
    async fn mint_some(
        &self,
        subject: &Subject,
        hosts: &[String],
    ) -> (Vec<(String, Credential)>, Vec<(String, ProvisionError)>) {
        let namespace = subject.namespace.as_str();
        let mints = self.settings.registries().iter().filter(|r| hosts.contains(&r.host)).map(|r| async move {
            let started = Instant::now();
            let cx = MintContext { kube: &self.client, http: &self.http, namespace, service_account: subject.service_account.as_deref() };
            let result = r.source.mint(cx, &r.host).await;
            self.metrics.mint(r.source.name(), result.is_ok(), started.elapsed().as_secs_f64());
            tracing::debug!(namespace, registry = %r.host, source = r.source.name(), ok = result.is_ok(), elapsed_ms = started.elapsed().as_millis() as u64, "minted");
            let result = result.map_err(|e| ProvisionError::Mint { registry: r.host.clone(), source: Arc::new(e) });
            (r.host.clone(), result)
        });
        let mut minted = Vec::new();
        let mut failures = Vec::new();
        for (host, result) in futures::future::join_all(mints).await {
            match result {
                Ok(c) => minted.push((host, c)),
                Err(e) => failures.push((host, e)),
            }
        }
        (minted, failures)
    }

    async fn warn(
        &self,
        regarding: &k8s_openapi::api::core::v1::ObjectReference,
        reason: &str,
        note: &str,
    ) {
        self.events.warn(regarding, "Provision", reason, note).await;
    }
}
