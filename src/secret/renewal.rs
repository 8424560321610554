//! When to renew. A credential is renewed once less than `renewBefore` of it remains (default: a
//! third of its lifetime), moved earlier by a jitter of up to a quarter of that margin so that
//! Secrets minted together are not all renewed in the same second. The jitter is derived from
//! the Secret's subject (namespace, or namespace and ServiceAccount) and the expiry, not drawn at
//! random: a restarted replica computes the same renewal time for the same Secret, so adoption
//! never re-mints early. [`Schedule`] is the one place that key is chosen.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use crate::core::subject::Subject;
use crate::secret::layout::{Issued, Lifetime};

/// The share of the renewal margin that jitter may add.
const JITTER_SHARE: f64 = 0.25;

fn renew_at(issued: &Lifetime, renew_before: Option<Duration>, key: &str) -> Timestamp {
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

/// What to do with a Secret now, registry by registry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Configured, stored and not yet due: carried over as they are.
    pub keep: Vec<String>,
    /// Configured and missing or due: minted now.
    pub mint: Vec<String>,
    /// Stored but no longer configured: left out of the next version.
    pub drop: Vec<String>,
}

impl Plan {
    /// Nothing to mint and nothing to remove: the stored Secret is adopted as it is.
    pub(crate) fn is_nothing(&self) -> bool {
        self.mint.is_empty() && self.drop.is_empty()
    }
}

/// What to do about a stored Secret now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Decision<'a> {
    /// Nothing is due: keep it as it is until `renew_at`, which is later than now.
    Keep {
        issued: &'a Issued,
        renew_at: Timestamp,
    },
    /// Something to mint or drop: write the next version.
    Write(Plan),
}

/// When one subject's credentials fall due. Whether a Secret must be written now ([`decide`])
/// and until when it counts as fresh ([`next_renewal`]) both read renewal times from here, with
/// one margin and one jitter key, so the two can never disagree: a Secret that one called due
/// and the other fresh would be rewritten unchanged at every look until the two agreed.
///
/// [`decide`]: Schedule::decide
/// [`next_renewal`]: Schedule::next_renewal
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Schedule {
    renew_before: Option<Duration>,
    /// The jitter's key: the subject's own (`ns`, or `ns/sa` per ServiceAccount), so the
    /// Secrets of one namespace's ServiceAccounts are spread too.
    key: String,
}

impl Schedule {
    pub(crate) fn for_subject(subject: &Subject, renew_before: Option<Duration>) -> Self {
        Self {
            renew_before,
            key: subject.key(),
        }
    }

    /// When a credential of this lifetime is due.
    pub(crate) fn renew_at(&self, lifetime: &Lifetime) -> Timestamp {
        renew_at(lifetime, self.renew_before, &self.key)
    }

    /// Which registries of the stored Secret (if usable) are kept, which minted, which dropped.
    pub(crate) fn plan(
        &self,
        stored: Option<&Issued>,
        configured: &[&str],
        now: Timestamp,
    ) -> Plan {
        let mut plan = Plan::default();
        for host in configured {
            match stored.and_then(|i| i.registries.get(host)) {
                Some(l) if now < self.renew_at(l) => plan.keep.push(host.to_string()),
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

    /// Keep the stored Secret (until when), or write (what).
    pub(crate) fn decide<'a>(
        &self,
        stored: Option<&'a Issued>,
        configured: &[&str],
        now: Timestamp,
    ) -> Decision<'a> {
        let plan = self.plan(stored, configured, now);
        match stored {
            // Every configured registry is stored and not due (`plan`), so the earliest of
            // their renewal times is later than now.
            Some(issued) if plan.is_nothing() => Decision::Keep {
                issued,
                renew_at: self.next_renewal(issued, configured, now, Duration::ZERO),
            },
            _ => Decision::Write(plan),
        }
    }

    /// When the Secret next needs work: the earliest renewal among its configured credentials,
    /// or `now + retry` if that is sooner and a configured registry is missing from it (its
    /// source failed; the others were written meanwhile).
    pub(crate) fn next_renewal(
        &self,
        issued: &Issued,
        configured: &[&str],
        now: Timestamp,
        retry: Duration,
    ) -> Timestamp {
        let earliest = configured
            .iter()
            .filter_map(|h| issued.registries.get(h))
            .map(|l| self.renew_at(l))
            .min()
            .unwrap_or(now);
        let incomplete = configured
            .iter()
            .any(|h| !issued.registries.contains_key(h));
        if incomplete {
            let soon = now
                .checked_add(SignedDuration::try_from(retry).unwrap_or(SignedDuration::ZERO))
                .unwrap_or(now);
            earliest.min(soon)
        } else {
            earliest
        }
    }
}

/// How long until `at`, or zero if it has passed.
pub(crate) fn until(at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// How long to wait before retry number `attempt` (1 for the first) of a failed renewal:
/// exponential from 1 s, capped at 1 minute, scaled by `spread` (drawn from [0.5, 1.5)) so
/// that namespaces failing together do not retry together. The cap bounds how stale a Secret
/// stays after a token endpoint recovers; the mint pacer, not the cap, protects the endpoint
/// when many Secrets fail together.
pub(crate) fn retry_delay(attempt: u32, spread: f64) -> Duration {
    const FIRST: f64 = 1.0;
    const CAP: f64 = 60.0;
    let base = (FIRST * 2f64.powi(attempt.saturating_sub(1).min(16) as i32)).min(CAP);
    Duration::from_secs_f64(base * spread.clamp(0.5, 1.5))
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
        let registries: crate::secret::layout::Registries = registries
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

    fn schedule(subject: &Subject, rb: Option<Duration>) -> Schedule {
        Schedule::for_subject(subject, rb)
    }

    #[test]
    fn plan_mints_only_what_is_missing_or_due_and_drops_what_is_no_longer_configured() {
        let s = schedule(&Subject::namespace("ns"), Some(Duration::from_secs(600)));
        let stored = secret(&[
            ("a.example", 0, 3600),
            ("b.example", 0, 1200),
            ("old.example", 0, 3600),
        ]);
        // At 300 s: b is due from 600 s minus jitter (≤ 150 s), a from 3000 s minus jitter.
        let p = s.plan(
            Some(&stored),
            &["a.example", "b.example", "c.example"],
            at(300),
        );
        assert_eq!(p.keep, ["a.example", "b.example"]);
        assert_eq!(p.mint, ["c.example"]);
        assert_eq!(p.drop, ["old.example"]);
        let p = s.plan(Some(&stored), &["a.example", "b.example"], at(700));
        assert_eq!(
            (p.keep, p.mint),
            (vec!["a.example".to_string()], vec!["b.example".to_string()])
        );
        let p = s.plan(None, &["a.example", "b.example"], at(0));
        assert_eq!(p.mint.len(), 2);
        assert!(p.keep.is_empty() && p.drop.is_empty());
        let p = s.plan(
            Some(&secret(&[("a.example", 0, 3600)])),
            &["a.example"],
            at(10),
        );
        assert!(p.is_nothing());
    }

    #[test]
    fn next_renewal_is_the_earliest_due_or_a_retry_when_a_registry_is_missing() {
        let s = schedule(&Subject::namespace("ns"), Some(Duration::from_secs(600)));
        let stored = secret(&[("a.example", 0, 3600), ("b.example", 0, 1200)]);
        let retry = Duration::from_secs(30);
        let both = s.next_renewal(&stored, &["a.example", "b.example"], at(10), retry);
        assert!((450..=600).contains(&secs(both)), "{both}");
        let missing = s.next_renewal(
            &stored,
            &["a.example", "b.example", "c.example"],
            at(10),
            retry,
        );
        assert_eq!(secs(missing), 40);
        // Only configured registries count: b is no longer configured.
        let only_a = s.next_renewal(&stored, &["a.example"], at(10), retry);
        assert!((2850..=3000).contains(&secs(only_a)), "{only_a}");
    }

    #[test]
    fn decide_keeps_until_the_renewal_time_and_writes_only_with_something_to_do() {
        let rb = Some(Duration::from_secs(480));
        let one = secret(&[("a.example", 0, 600)]);
        let two = secret(&[("a.example", 0, 600), ("b.example", 0, 3600)]);
        let a = ["a.example"];
        let ab = ["a.example", "b.example"];
        let subject = Subject::service_account("ns", "builder");
        let s = schedule(&subject, rb);
        let due = s.renew_at(one.registries.get("a.example").unwrap());
        let keep = |issued, renew_at| Decision::Keep { issued, renew_at };
        let write = |mint: &[&str], drop: &[&str], keep: &[&str]| {
            let v = |h: &[&str]| h.iter().map(|h| h.to_string()).collect::<Vec<_>>();
            Decision::Write(Plan {
                keep: v(keep),
                mint: v(mint),
                drop: v(drop),
            })
        };
        // (stored, configured, now) → decision
        let cases: Vec<(Option<&Issued>, &[&str], Timestamp, Decision)> = vec![
            (None, &a, at(0), write(&a, &[], &[])),
            (Some(&one), &a, at(0), keep(&one, due)),
            (
                Some(&one),
                &a,
                due - SignedDuration::from_secs(1),
                keep(&one, due),
            ),
            (Some(&one), &a, due, write(&a, &[], &[])),
            (Some(&one), &a, at(599), write(&a, &[], &[])),
            // A registry configured since: minted, the other carried over.
            (Some(&one), &ab, at(0), write(&["b.example"], &[], &a)),
            // A registry no longer configured: dropped, with nothing minted.
            (Some(&two), &a, at(0), write(&[], &["b.example"], &a)),
            (Some(&two), &ab, at(0), keep(&two, due)),
        ];
        for (stored, configured, now, expected) in cases {
            assert_eq!(
                s.decide(stored, configured, now),
                expected,
                "{stored:?} {configured:?} at {now}"
            );
        }
    }

    #[test]
    fn what_is_kept_is_fresh_and_what_is_written_changes_at_every_second_in_both_scopes() {
        // The invariant whose breach rewrote ServiceAccounts' Secrets once a second (issue 28):
        // never "nothing to do" together with "no longer fresh".
        let configured = ["a.example", "b.example"];
        for subject in [
            Subject::namespace("team-a"),
            Subject::service_account("team-a", "builder"),
            Subject::service_account("team-a", "default"),
        ] {
            for rb in [
                None,
                Some(Duration::from_secs(480)),
                Some(Duration::from_secs(3000)),
            ] {
                let s = schedule(&subject, rb);
                for expires in [600, 601, 1800, 3600] {
                    let stored = secret(&[("a.example", 0, expires), ("b.example", 5, 3600)]);
                    let mut kept = 0;
                    for now in (0..expires).map(at) {
                        match s.decide(Some(&stored), &configured, now) {
                            Decision::Keep { renew_at, .. } => {
                                assert!(now < renew_at, "{subject} kept past {renew_at} at {now}");
                                kept += 1;
                            }
                            Decision::Write(plan) => assert!(
                                !plan.is_nothing(),
                                "{subject}: a write with nothing to change at {now}"
                            ),
                        }
                    }
                    assert!(kept > 0, "{subject}, {rb:?}, {expires}: never fresh");
                }
            }
        }
    }

    #[test]
    fn each_service_account_has_its_own_jitter() {
        let i = issued(0, 3600);
        let times: std::collections::BTreeSet<Timestamp> = (0..50)
            .map(|n| {
                schedule(
                    &Subject::service_account("team-a", &format!("sa-{n}")),
                    None,
                )
                .renew_at(&i)
            })
            .collect();
        assert!(
            times.len() > 30,
            "only {} distinct renewal times",
            times.len()
        );
        // The namespace scope keeps its key: renewal times of stored Secrets do not move.
        assert_eq!(
            schedule(&Subject::namespace("team-a"), None).renew_at(&i),
            renew_at(&i, None, "team-a")
        );
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
