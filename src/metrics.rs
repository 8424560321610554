//! Prometheus metrics, served at `/metrics`. Label values are fixed words (kinds, outcomes,
//! source names): never a namespace's Secret, a token or anything else from a request.

use std::collections::HashMap;
use std::sync::Mutex;

use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

use crate::secret::capacity::{self, Load, Tracked};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `Pod`, `ServiceAccount` or `other`.
    pub kind: &'static str,
    /// `patched`, `unchanged`, `not_ready` (patched with a warning), `conflict`, `invalid`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MintLabels {
    pub source: &'static str,
    /// `ok` or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    /// `hit` or `miss`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct WriterLabels {
    /// `provisioner` (the managed pull Secrets) or `pull_secret_updater`.
    pub writer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct EvictionLabels {
    /// One of [`EVICTION_OUTCOMES`].
    pub outcome: &'static str,
}

/// The outcomes of [`Metrics::pod_evictions`]: `evicted`; `disruption_budget` (a
/// PodDisruptionBudget allows no disruption now: tried again later); `gone` (the Pod went
/// meanwhile, or its name is another Pod's); `failed` (any other refusal, logged).
pub(crate) const EVICTION_OUTCOMES: [&str; 4] = ["evicted", "disruption_budget", "gone", "failed"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    /// `Secret` or `ServiceAccount`.
    pub kind: String,
}

/// The writers of [`Metrics::secret_write_skipped`].
pub(crate) const WRITERS: [&str; 2] = ["provisioner", "pull_secret_updater"];

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

pub struct Metrics {
    registry: Registry,
    pub admissions: Family<AdmissionLabels, Counter>,
    pub admission_seconds: Histogram,
    pub mints: Family<MintLabels, Counter>,
    pub mint_seconds: Histograms<SourceLabels>,
    pub cache: Family<CacheLabels, Counter>,
    pub renewal_failures: Counter,
    /// Secret writes left out because what would be written is what is stored: a renewal
    /// loop shows here rather than as writes to etcd.
    secret_writes_skipped: Family<WriterLabels, Counter>,
    /// Pods of opted-in namespaces that run without their pull Secret (admitted unpatched).
    pub pods_without_pull_secret: Gauge,
    /// `MissingPullSecret` Events recorded on such Pods.
    pub missing_pull_secret_events: Counter,
    /// Evictions of such Pods stuck pulling (`remediation.mode: evictStuckPods`), by outcome.
    pub(crate) pod_evictions: Family<EvictionLabels, Counter>,
    /// `RecreatePod` Events on stuck Pods nothing would recreate (never evicted).
    pub(crate) recreate_pod_events: Counter,
    managed_secrets: Gauge,
    earliest_expiry_seconds: Gauge<f64, AtomicU64>,
    /// Renewal capacity (`secret::capacity`): what the Secrets kept need, what was done, the
    /// ceiling, and how far behind renewals are.
    renewals_needed_per_second: Gauge<f64, AtomicU64>,
    renewals: Counter,
    renewal_ceiling_per_second: Gauge<f64, AtomicU64>,
    mint_rate_per_second: Gauge<f64, AtomicU64>,
    renewal_backlog: Gauge,
    renewal_oldest_overdue_seconds: Gauge<f64, AtomicU64>,
    /// Each Secret's renewal times, by subject key, as last written or adopted here.
    expiries: Mutex<HashMap<String, Tracked>>,
    /// Whether this replica's refresher runs: only then are expiries tracked.
    refreshing: std::sync::atomic::AtomicBool,
    /// Per watch the refresher reads (`Secret`, `ServiceAccount`): 1 while its view is
    /// complete. Reconciles wait for the first list, so 0 for long stops all renewals.
    watch_synced: Family<KindLabels, Gauge>,
}

fn latency_histogram() -> Histogram {
    // 100 µs to about 6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pull_secret_injector");
        let admissions = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "admissions",
            "Admission reviews answered, by object kind and outcome",
            admissions.clone(),
        );
        let admission_seconds = latency_histogram();
        registry.register(
            "admission_duration_seconds",
            "Time to answer an admission review",
            admission_seconds.clone(),
        );
        let mints = Family::<MintLabels, Counter>::default();
        registry.register(
            "mints",
            "Credentials minted, by token source and outcome",
            mints.clone(),
        );
        let mint_seconds: Histograms<SourceLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "mint_duration_seconds",
            "Time to mint one credential, by token source",
            mint_seconds.clone(),
        );
        let cache = Family::<CacheLabels, Counter>::default();
        registry.register(
            "cache_lookups",
            "Admission-time lookups of a namespace's fresh Secret",
            cache.clone(),
        );
        let renewal_failures = Counter::default();
        registry.register(
            "renewal_failures",
            "Background reconciles that failed (retried with backoff)",
            renewal_failures.clone(),
        );
        registry.register(
            "api_throttled",
            "Answers 429 (too many requests) from the API server, each waited out before any \
             request of the client is sent again",
            crate::api_client::THROTTLED.clone(),
        );
        registry.register(
            "events_dropped",
            "Kubernetes Events not recorded because more were due at once than the Event budget \
             allows (what they said is logged)",
            crate::cluster::EVENTS_DROPPED.clone(),
        );
        let secret_writes_skipped = Family::<WriterLabels, Counter>::default();
        registry.register(
            "secret_writes_skipped",
            "Secret writes not sent because the Secret already holds exactly that, by writer",
            secret_writes_skipped.clone(),
        );
        // Present from the start, so that a rate over them reads 0 rather than nothing.
        for writer in WRITERS {
            let _ = secret_writes_skipped.get_or_create(&WriterLabels { writer });
        }
        let pods_without_pull_secret = Gauge::default();
        registry.register(
            "pods_without_pull_secret",
            "Pods in opted-in namespaces admitted without the pull Secret (not finished, seen by the refresher)",
            pods_without_pull_secret.clone(),
        );
        let missing_pull_secret_events = Counter::default();
        registry.register(
            "missing_pull_secret_events",
            "MissingPullSecret Events recorded on Pods admitted without the pull Secret",
            missing_pull_secret_events.clone(),
        );
        let managed_secrets = Gauge::default();
        registry.register(
            "managed_secrets",
            "Pull Secrets this replica wrote or adopted and still manages",
            managed_secrets.clone(),
        );
        let earliest_expiry_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "earliest_expiry_seconds",
            "Seconds until the earliest managed credential expires (negative: already expired)",
            earliest_expiry_seconds.clone(),
        );
        let renewals_needed_per_second = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "renewals_needed_per_second",
            "Renewals per second the managed Secrets need: the sum over them of one per renewal interval",
            renewals_needed_per_second.clone(),
        );
        let renewals = Counter::default();
        registry.register(
            "renewals",
            "Managed Secrets seen replaced by a version with newly minted credentials",
            renewals.clone(),
        );
        let renewal_ceiling_per_second = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "renewal_ceiling_per_second",
            "Mints per second this replica allows (refresh.maxMintsPerSecond), shared by renewals and admissions",
            renewal_ceiling_per_second.clone(),
        );
        let mint_rate_per_second = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "mint_rate_per_second",
            "Mints per second this replica paces at now: the renewal need with a margin, between 20/s and the ceiling",
            mint_rate_per_second.clone(),
        );
        let renewal_backlog = Gauge::default();
        registry.register(
            "renewal_backlog",
            "Managed Secrets past their renewal time",
            renewal_backlog.clone(),
        );
        let renewal_oldest_overdue_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "renewal_oldest_overdue_seconds",
            "How long the managed Secret longest past its renewal time has been due (0: none is)",
            renewal_oldest_overdue_seconds.clone(),
        );
        let pod_evictions = Family::<EvictionLabels, Counter>::default();
        for outcome in EVICTION_OUTCOMES {
            let _ = pod_evictions.get_or_create(&EvictionLabels { outcome });
        }
        registry.register(
            "pod_evictions",
            "Evictions of Pods admitted without the pull Secret and stuck pulling (remediation.mode evictStuckPods), by outcome",
            pod_evictions.clone(),
        );
        let recreate_pod_events = Counter::default();
        registry.register(
            "recreate_pod_events",
            "Events telling to recreate a stuck Pod without the pull Secret that no controller would recreate (never evicted)",
            recreate_pod_events.clone(),
        );
        let watch_synced = Family::<KindLabels, Gauge>::default();
        registry.register(
            "watch_synced",
            "1 while the refresher's watch of this kind holds a complete list; reconciles wait for its first list",
            watch_synced.clone(),
        );
        Self {
            registry,
            admissions,
            admission_seconds,
            mints,
            mint_seconds,
            cache,
            renewal_failures,
            secret_writes_skipped,
            pods_without_pull_secret,
            missing_pull_secret_events,
            pod_evictions,
            recreate_pod_events,
            managed_secrets,
            earliest_expiry_seconds,
            renewals_needed_per_second,
            renewals,
            renewal_ceiling_per_second,
            mint_rate_per_second,
            renewal_backlog,
            renewal_oldest_overdue_seconds,
            expiries: Mutex::default(),
            refreshing: Default::default(),
            watch_synced,
        }
    }
}

impl Metrics {
    // Labels are static words: no allocation on the admission path.
    pub fn admission(&self, kind: &'static str, outcome: &'static str) {
        self.admissions
            .get_or_create(&AdmissionLabels { kind, outcome })
            .inc();
    }

    pub(crate) fn pod_evicted(&self, outcome: &'static str) {
        self.pod_evictions
            .get_or_create(&EvictionLabels { outcome })
            .inc();
    }

    pub fn cache_lookup(&self, hit: bool) {
        self.cache
            .get_or_create(&CacheLabels {
                result: if hit { "hit" } else { "miss" },
            })
            .inc();
    }

    pub fn mint(&self, source: &'static str, ok: bool, seconds: f64) {
        self.mints
            .get_or_create(&MintLabels {
                source,
                outcome: if ok { "ok" } else { "error" },
            })
            .inc();
        self.mint_seconds
            .get_or_create(&SourceLabels { source })
            .observe(seconds);
    }

    /// A Secret write left out: it would have stored what is already stored.
    pub(crate) fn secret_write_skipped(&self, writer: &'static str) {
        self.secret_writes_skipped
            .get_or_create(&WriterLabels { writer })
            .inc();
    }

    /// Whether the refresher's watch of `kind` holds a complete list.
    pub(crate) fn watch_synced(&self, kind: &str, synced: bool) {
        self.watch_synced
            .get_or_create(&KindLabels {
                kind: kind.to_string(),
            })
            .set(i64::from(synced));
    }

    /// Starts or stops tracking expiries; stopping forgets them (`managed_secrets` reads 0).
    pub(crate) fn set_refreshing(&self, refreshing: bool) {
        let mut expiries = self.expiries.lock().unwrap_or_else(|p| p.into_inner());
        self.refreshing
            .store(refreshing, std::sync::atomic::Ordering::Release);
        if !refreshing {
            expiries.clear();
        }
    }

    /// The mints per second allowed: set once, from the configuration.
    pub(crate) fn set_mint_rate(&self, per_second: f64) {
        self.mint_rate_per_second.set(per_second);
    }

    pub(crate) fn set_renewal_ceiling(&self, per_second: f64) {
        self.renewal_ceiling_per_second.set(per_second);
    }

    /// Records a Secret's renewal times (by subject key), where this replica refreshes (a
    /// Secret an admission writes elsewhere is adopted by the refreshing replica's watch). A
    /// newer version of one already recorded is a renewal.
    pub(crate) fn secret_written(&self, key: &str, tracked: Tracked) {
        if !self.refreshing.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let previous = self
            .expiries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string(), tracked);
        if previous.is_some_and(|p| p.newest_issue < tracked.newest_issue) {
            self.renewals.inc();
        }
    }

    pub(crate) fn secret_released(&self, key: &str) {
        self.expiries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Forgets the Secrets whose key `keep` refuses (their namespace is gone).
    pub(crate) fn retain_secrets(&self, keep: impl Fn(&str) -> bool) {
        self.expiries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|k, _| keep(k));
    }

    /// The renewal load of the Secrets recorded (none unless refreshing).
    pub(crate) fn renewal_load(&self, now: Timestamp) -> Load {
        let expiries = self.expiries.lock().unwrap_or_else(|p| p.into_inner());
        capacity::load(expiries.values(), now)
    }

    /// The Prometheus text exposition, with the gauges computed now.
    pub fn encode(&self) -> String {
        let now = Timestamp::now();
        let load = self.renewal_load(now);
        self.managed_secrets.set(load.secrets as i64);
        let earliest = load
            .earliest_expiry
            .map(|t| t.duration_since(now).as_secs_f64());
        self.earliest_expiry_seconds.set(earliest.unwrap_or(0.0));
        self.renewals_needed_per_second.set(load.needed_per_second);
        self.renewal_backlog.set(load.backlog as i64);
        self.renewal_oldest_overdue_seconds
            .set(load.oldest_overdue.as_secs_f64());
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::SignedDuration;

    /// A Secret issued at `issued` (seconds from the test's start), due at `due`, expiring at
    /// `expires`, renewed `per_second`.
    fn tracked(issued: i64, due: i64, expires: i64, per_second: f64) -> Tracked {
        static START: std::sync::OnceLock<Timestamp> = std::sync::OnceLock::new();
        let now = *START.get_or_init(Timestamp::now);
        Tracked {
            newest_issue: now + SignedDuration::from_secs(issued),
            renew_at: now + SignedDuration::from_secs(due),
            expires_at: now + SignedDuration::from_secs(expires),
            per_second,
        }
    }

    fn sample(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn exposition_has_every_family_and_fixed_labels() {
        let m = Metrics::default();
        m.set_refreshing(true);
        m.admission("Pod", "patched");
        m.cache_lookup(true);
        m.mint("kubernetes", true, 0.004);
        m.secret_written("team-a", tracked(-3000, 200, 600, 0.0004));
        let text = m.encode();
        for needle in [
            r#"pull_secret_injector_admissions_total{kind="Pod",outcome="patched"} 1"#,
            r#"pull_secret_injector_cache_lookups_total{result="hit"} 1"#,
            r#"pull_secret_injector_mints_total{source="kubernetes",outcome="ok"} 1"#,
            "pull_secret_injector_mint_duration_seconds_bucket",
            "pull_secret_injector_admission_duration_seconds_count 0",
            "pull_secret_injector_managed_secrets 1",
            "pull_secret_injector_renewal_failures_total 0",
            "pull_secret_injector_pods_without_pull_secret 0",
            "pull_secret_injector_missing_pull_secret_events_total 0",
            r#"pull_secret_injector_pod_evictions_total{outcome="evicted"} 0"#,
            r#"pull_secret_injector_pod_evictions_total{outcome="disruption_budget"} 0"#,
            r#"pull_secret_injector_pod_evictions_total{outcome="gone"} 0"#,
            r#"pull_secret_injector_pod_evictions_total{outcome="failed"} 0"#,
            "pull_secret_injector_recreate_pod_events_total 0",
            r#"pull_secret_injector_secret_writes_skipped_total{writer="provisioner"} 0"#,
            r#"pull_secret_injector_secret_writes_skipped_total{writer="pull_secret_updater"} 0"#,
            "pull_secret_injector_renewals_total 0",
            "pull_secret_injector_renewal_backlog 0",
            "pull_secret_injector_renewal_oldest_overdue_seconds 0",
            "pull_secret_injector_renewals_needed_per_second 0.0004",
            "pull_secret_injector_renewal_ceiling_per_second 0",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        let earliest: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("pull_secret_injector_earliest_expiry_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((590.0..=600.0).contains(&earliest), "{earliest}");
        assert!(!text.contains("team-a"), "no namespace names in labels");
    }

    #[test]
    fn expiries_are_kept_only_while_refreshing() {
        let m = Metrics::default();
        let soon = tracked(0, 400, 600, 0.001);
        let managed = |m: &Metrics| {
            m.encode()
                .lines()
                .find_map(|l| l.strip_prefix("pull_secret_injector_managed_secrets "))
                .map(str::to_string)
        };
        m.secret_written("team-a", soon);
        assert_eq!(
            managed(&m).as_deref(),
            Some("0"),
            "not refreshing: not tracked"
        );
        m.set_refreshing(true);
        m.secret_written("team-a", soon);
        m.secret_written("team-b", soon);
        assert_eq!(managed(&m).as_deref(), Some("2"));
        m.set_refreshing(false);
        assert_eq!(managed(&m).as_deref(), Some("0"), "stopping forgets them");
    }

    #[test]
    fn renewal_capacity_figures_follow_the_secrets_kept() {
        let m = Metrics::default();
        m.set_renewal_ceiling(20.0);
        m.set_refreshing(true);
        // Two Secrets due later, two overdue (by 30 s and 90 s), one of them already expired.
        m.secret_written("team-a", tracked(-100, 2000, 3000, 0.5));
        m.secret_written("team-b", tracked(-100, 2000, 3000, 0.25));
        m.secret_written("team-c", tracked(-3000, -30, 500, 0.125));
        m.secret_written("team-d/builder", tracked(-700, -90, -5, 0.125));
        let text = m.encode();
        assert_eq!(
            sample(&text, "pull_secret_injector_renewals_needed_per_second"),
            1.0
        );
        assert_eq!(
            sample(&text, "pull_secret_injector_renewal_ceiling_per_second"),
            20.0
        );
        assert_eq!(sample(&text, "pull_secret_injector_renewal_backlog"), 2.0);
        let overdue = sample(&text, "pull_secret_injector_renewal_oldest_overdue_seconds");
        assert!((89.0..=91.0).contains(&overdue), "{overdue}");
        let earliest = sample(&text, "pull_secret_injector_earliest_expiry_seconds");
        assert!((-6.0..=-4.0).contains(&earliest), "{earliest}");
        assert_eq!(sample(&text, "pull_secret_injector_renewals_total"), 0.0);
        // Renewed: a newer version of team-c. Seen again as it is, or first seen: no renewal.
        m.secret_written("team-c", tracked(0, 2000, 3000, 0.125));
        m.secret_written("team-a", tracked(-100, 2000, 3000, 0.5));
        m.secret_written("team-e", tracked(0, 2000, 3000, 0.5));
        let text = m.encode();
        assert_eq!(sample(&text, "pull_secret_injector_renewals_total"), 1.0);
        assert_eq!(sample(&text, "pull_secret_injector_renewal_backlog"), 1.0);
        assert_eq!(
            sample(&text, "pull_secret_injector_renewals_needed_per_second"),
            1.5
        );
        // A replica that stops refreshing reports nothing to renew.
        m.set_refreshing(false);
        let text = m.encode();
        assert_eq!(
            sample(&text, "pull_secret_injector_renewals_needed_per_second"),
            0.0
        );
        assert_eq!(sample(&text, "pull_secret_injector_renewal_backlog"), 0.0);
        assert!(!text.contains("team-"), "no namespace names in labels");
    }

    #[test]
    fn the_grafana_dashboard_queries_only_exported_metrics() {
        let m = Metrics::default();
        // Families appear once they have a sample.
        m.admission("Pod", "patched");
        m.cache_lookup(false);
        m.mint("kubernetes", true, 0.01);
        let text = m.encode();
        let exported: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let dashboard: serde_json::Value =
            serde_json::from_str(include_str!("../deploy/grafana/pull-secret-injector.json"))
                .unwrap();
        let mut queried = 0;
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                let expr = target["expr"].as_str().unwrap();
                for word in expr
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .filter(|w| w.starts_with("pull_secret_injector_"))
                {
                    let family = ["_total", "_bucket", "_count", "_sum"]
                        .iter()
                        .fold(word, |w, s| w.strip_suffix(s).unwrap_or(w));
                    assert!(
                        exported.contains(&family),
                        "dashboard queries {word}, which is not exported: {exported:?}"
                    );
                    queried += 1;
                }
            }
        }
        assert!(queried >= 8);
    }
}
