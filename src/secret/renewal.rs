//! When to renew. A credential is renewed once less than `renewBefore` of it remains (default: a
//! third of its lifetime), moved earlier by a jitter of up to a quarter of that margin so that
//! Secrets minted together are not all renewed in the same second. The jitter is derived from
//! the namespace and the expiry, not drawn at random: a restarted replica computes the same
//! renewal time for the same Secret, so adoption never re-mints early.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::secret::layout::{Issued, Lifetime};

/// The share of the renewal margin that jitter may add.
const JITTER_SHARE: f64 = 0.25;

pub fn renew_at(issued: &Lifetime, renew_before: Option<Duration>, key: &str) -> Timestamp {
    let lifetime = issued.expires_at.duration_since(issued.issued_at);
    if lifetime <= SignedDuration::ZERO {
        return issued.issued_at;
    }
    // A source may hand back a credential shorter than `renewBefore` (lifetimes are the
    // source's call): renewing it at once would loop, so it is renewed halfway instead.
    let margin = match renew_before.and_then(|rb| SignedDuration::try_from(rb).ok()) {
        Some(rb) if rb < lifetime => rb,
        Some(_) => lifetime / 2,
        None => lifetime / 3,
    };
    let jitter = margin.mul_f64(JITTER_SHARE * unit_fraction(key, issued.expires_at));
    let at = issued.expires_at - margin - jitter;
    at.max(issued.issued_at)
}

/// What to do with a namespace's Secret now, registry by registry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Configured, stored and not yet due: carried over as they are.
    pub keep: Vec<String>,
    /// Configured and missing or due: minted now.
    pub mint: Vec<String>,
    /// Stored but no longer configured: left out of the next version.
    pub drop: Vec<String>,
}

impl Plan {
    /// Nothing to mint and nothing to remove: the stored Secret is adopted as it is.
    pub fn is_nothing(&self) -> bool {
        self.mint.is_empty() && self.drop.is_empty()
    }
}

/// Which registries of the stored Secret (if usable) are kept, which minted, which dropped.
pub fn plan(
    stored: Option<&Issued>,
    configured: &[&str],
    renew_before: Option<Duration>,
    key: &str,
    now: Timestamp,
) -> Plan {
    let mut plan = Plan::default();
    for host in configured {
        match stored.and_then(|i| i.registries.get(*host)) {
            Some(l) if now < renew_at(l, renew_before, key) => plan.keep.push(host.to_string()),
            _ => plan.mint.push(host.to_string()),
        }
    }
    if let Some(i) = stored {
        plan.drop = i
            .registries
            .keys()
            .filter(|h| !configured.contains(&h.as_str()))
            .cloned()
            .collect();
    }
    plan
}

/// When the Secret next needs work: the earliest renewal among its configured credentials, or
/// `now + retry` if that is sooner and a configured registry is missing from it (its source
/// failed; the others were written meanwhile).
pub fn next_renewal(
    issued: &Issued,
    configured: &[&str],
    renew_before: Option<Duration>,
    key: &str,
    now: Timestamp,
    retry: Duration,
) -> Timestamp {
    let earliest = configured
        .iter()
        .filter_map(|h| issued.registries.get(*h))
        .map(|l| renew_at(l, renew_before, key))
        .min()
        .unwrap_or(now);
    let incomplete = configured
        .iter()
        .any(|h| !issued.registries.contains_key(*h));
    if incomplete {
        let soon = now
            .checked_add(SignedDuration::try_from(retry).unwrap_or(SignedDuration::ZERO))
            .unwrap_or(now);
        earliest.min(soon)
    } else {
        earliest
    }
}

/// How long until `at`, or zero if it has passed.
pub fn until(at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// How long to wait before retry number `attempt` (1 for the first) of a failed renewal:
/// exponential from 1 s, capped at 1 minute, scaled by `spread` (drawn from [0.5, 1.5)) so
/// that namespaces failing together do not retry together. The cap bounds how stale a Secret
/// stays after a token endpoint recovers; the mint pacer, not the cap, protects the endpoint
/// when many Secrets fail together.
pub fn retry_delay(attempt: u32, spread: f64) -> Duration {
    const FIRST: f64 = 1.0;
    const CAP: f64 = 60.0;
    let base = (FIRST * 2f64.powi(attempt.saturating_sub(1).min(16) as i32)).min(CAP);
    Duration::from_secs_f64(base * spread.clamp(0.5, 1.5))
}

/// Spaces out mints: each caller gets the next free slot, `1/rate` seconds after the previous
/// one, and waits for it. A burst of due Secrets becomes a steady stream.
pub struct MintPacer {
    interval: Duration,
    next: tokio::sync::Mutex<tokio::time::Instant>,
}

impl MintPacer {
    pub fn new(per_second: f64) -> Self {
        let interval = Duration::from_secs_f64(1.0 / per_second.max(0.001));
        Self {
            interval,
            next: tokio::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits for this caller's slot.
    pub async fn wait(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let slot = (*next).max(tokio::time::Instant::now());
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// A number in [0, 1) that depends only on its inputs.
fn unit_fraction(key: &str, expires_at: Timestamp) -> f64 {
    // DefaultHasher's algorithm is fixed for a given Rust release, which is all that restarts of
    // the same binary need.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    expires_at.as_second().hash(&mut h);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(issued: i64, expires: i64) -> Lifetime {
        Lifetime {
            issued_at: Timestamp::from_second(issued).unwrap(),
            expires_at: Timestamp::from_second(expires).unwrap(),
        }
    }

    fn secret(registries: &[(&str, i64, i64)]) -> Issued {
        let registries: std::collections::BTreeMap<String, Lifetime> = registries
            .iter()
            .map(|(h, i, e)| (h.to_string(), issued(*i, *e)))
            .collect();
        Issued {
            issued_at: registries.values().map(|l| l.issued_at).min().unwrap(),
            expires_at: registries.values().map(|l| l.expires_at).min().unwrap(),
            content_sha256: String::new(),
            registries,
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn plan_mints_only_what_is_missing_or_due_and_drops_what_is_no_longer_configured() {
        let rb = Some(Duration::from_secs(600));
        let stored = secret(&[
            ("a.example", 0, 3600),
            ("b.example", 0, 1200),
            ("old.example", 0, 3600),
        ]);
        // At 500 s: b is due from 600 s minus jitter (≤ 150 s), a from 3000 s minus jitter.
        let p = plan(
            Some(&stored),
            &["a.example", "b.example", "c.example"],
            rb,
            "ns",
            at(300),
        );
        assert_eq!(p.keep, ["a.example", "b.example"]);
        assert_eq!(p.mint, ["c.example"]);
        assert_eq!(p.drop, ["old.example"]);
        let p = plan(
            Some(&stored),
            &["a.example", "b.example"],
            rb,
            "ns",
            at(700),
        );
        assert_eq!(
            (p.keep, p.mint),
            (vec!["a.example".to_string()], vec!["b.example".to_string()])
        );
        let p = plan(None, &["a.example", "b.example"], rb, "ns", at(0));
        assert_eq!(p.mint.len(), 2);
        assert!(p.keep.is_empty() && p.drop.is_empty());
        let p = plan(
            Some(&secret(&[("a.example", 0, 3600)])),
            &["a.example"],
            rb,
            "ns",
            at(10),
        );
        assert!(p.is_nothing());
    }

    #[test]
    fn next_renewal_is_the_earliest_due_or_a_retry_when_a_registry_is_missing() {
        let rb = Some(Duration::from_secs(600));
        let stored = secret(&[("a.example", 0, 3600), ("b.example", 0, 1200)]);
        let both = next_renewal(
            &stored,
            &["a.example", "b.example"],
            rb,
            "ns",
            at(10),
            Duration::from_secs(30),
        );
        assert!((450..=600).contains(&secs(both)), "{both}");
        let missing = next_renewal(
            &stored,
            &["a.example", "b.example", "c.example"],
            rb,
            "ns",
            at(10),
            Duration::from_secs(30),
        );
        assert_eq!(secs(missing), 40);
        // Only configured registries count: b is no longer configured.
        let only_a = next_renewal(
            &stored,
            &["a.example"],
            rb,
            "ns",
            at(10),
            Duration::from_secs(30),
        );
        assert!((2850..=3000).contains(&secs(only_a)), "{only_a}");
    }

    fn secs(t: Timestamp) -> i64 {
        t.as_second()
    }

    #[test]
    fn default_margin_is_a_third_of_the_lifetime_plus_jitter() {
        let i = issued(0, 3600);
        for ns in ["a", "b", "c", "team-a", "team-b"] {
            let at = secs(renew_at(&i, None, ns));
            // 1200 s margin, up to 300 s jitter
            assert!(
                (3600 - 1200 - 300..=3600 - 1200).contains(&at),
                "{ns}: {at}"
            );
        }
    }

    #[test]
    fn configured_margin_is_honoured() {
        let i = issued(0, 3600);
        let at = secs(renew_at(&i, Some(Duration::from_secs(20 * 60)), "ns"));
        assert!((2100..=2400).contains(&at), "{at}");
    }

    #[test]
    fn margin_longer_than_the_lifetime_renews_halfway_not_at_once() {
        // 600 s lifetime: halfway is 400, minus up to a quarter of the 300 s margin.
        let i = issued(100, 700);
        let at = secs(renew_at(&i, Some(Duration::from_secs(3600)), "ns"));
        assert!((325..=400).contains(&at), "{at}");
    }

    #[test]
    fn jitter_is_stable_and_spreads_namespaces() {
        let i = issued(0, 3600);
        assert_eq!(renew_at(&i, None, "team-a"), renew_at(&i, None, "team-a"));
        let distinct: std::collections::BTreeSet<_> = (0..200)
            .map(|n| secs(renew_at(&i, None, &format!("ns-{n}"))))
            .collect();
        assert!(
            distinct.len() > 120,
            "only {} distinct renewal times",
            distinct.len()
        );
        let spread = distinct.last().unwrap() - distinct.first().unwrap();
        assert!(spread > 250, "renewals spread over only {spread}s of 300s");
    }

    #[test]
    fn retries_back_off_exponentially_up_to_a_cap() {
        let d = |n| retry_delay(n, 1.0).as_secs_f64();
        assert_eq!((d(1), d(2), d(3), d(4)), (1.0, 2.0, 4.0, 8.0));
        assert_eq!(d(6), 32.0);
        assert_eq!(d(7), 60.0);
        assert_eq!(d(1000), 60.0);
        assert_eq!(retry_delay(3, 0.5).as_secs_f64(), 2.0);
        assert_eq!(retry_delay(3, 9.0).as_secs_f64(), 6.0, "spread is clamped");
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_turns_a_burst_into_a_steady_rate() {
        let pacer = std::sync::Arc::new(MintPacer::new(4.0));
        let start = tokio::time::Instant::now();
        let waits = (0..9).map(|_| {
            let p = pacer.clone();
            tokio::spawn(async move {
                p.wait().await;
                start.elapsed()
            })
        });
        let mut at: Vec<Duration> = futures::future::join_all(waits)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        at.sort();
        // 9 callers at 4 per second: slots at 0, 0.25, ..., 2.0 seconds.
        assert_eq!(at.first(), Some(&Duration::ZERO));
        assert_eq!(at.last(), Some(&Duration::from_secs(2)));
        for pair in at.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_millis(250));
        }
    }

    #[test]
    fn until_is_never_negative() {
        let now = Timestamp::from_second(100).unwrap();
        assert_eq!(
            until(Timestamp::from_second(40).unwrap(), now),
            Duration::ZERO
        );
        assert_eq!(
            until(Timestamp::from_second(160).unwrap(), now),
            Duration::from_secs(60)
        );
    }
}
