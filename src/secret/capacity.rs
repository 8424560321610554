//! Renewal capacity: whether `refresh.maxMintsPerSecond` keeps up with the Secrets kept. Each
//! Secret is renewed once per renewal interval (from a credential's issue to its renewal time,
//! [`renewal::Schedule`]), so the population needs the sum of `1 / interval` renewals per
//! second; above the ceiling, renewals slip until Secrets expire. Pure: the refresher, the
//! metrics and `status` feed it what they know and say what it finds.
//!
//! [`renewal::Schedule`]: super::renewal::Schedule

use std::collections::BTreeSet;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::layout::Issued;
use super::renewal::Schedule;

/// The share of the ceiling left for what else takes mint slots (admissions, opt-ins,
/// restores, retries): renewals that need more than the rest are short.
pub(crate) const HEADROOM: f64 = 0.1;

/// The shortest renewal interval counted: the refresher looks at a namespace again no sooner
/// than a second later, whatever a degenerate credential (no lifetime) says.
const SHORTEST_INTERVAL: SignedDuration = SignedDuration::from_secs(1);

/// What renewal needs to know of one kept Secret.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Tracked {
    /// When it is next due: the earliest renewal time of its credentials.
    pub renew_at: Timestamp,
    /// When its first credential expires.
    pub expires_at: Timestamp,
    /// The renewals per second it takes.
    pub per_second: f64,
    /// The newest issue time of its credentials: a later one is a new version.
    pub newest_issue: Timestamp,
}

impl Tracked {
    /// `issued` as `schedule` renews it. Credentials minted together share a lifetime and are
    /// renewed by one write; each distinct lifetime is a write of its own, once per interval.
    pub(crate) fn of(issued: &Issued, schedule: &Schedule) -> Self {
        let lifetimes: BTreeSet<(Timestamp, Timestamp)> = issued
            .registries
            .values()
            .map(|l| (l.issued_at, l.expires_at))
            .collect();
        let mut renew_at = None::<Timestamp>;
        let mut per_second = 0.0;
        for l in issued.registries.values() {
            let due = schedule.renew_at(l);
            renew_at = Some(renew_at.map_or(due, |r| r.min(due)));
        }
        for (issued_at, expires_at) in &lifetimes {
            let l = super::layout::Lifetime {
                issued_at: *issued_at,
                expires_at: *expires_at,
            };
            let interval = schedule.renew_at(&l).duration_since(*issued_at);
            per_second += 1.0 / interval.max(SHORTEST_INTERVAL).as_secs_f64();
        }
        Self {
            renew_at: renew_at.unwrap_or(issued.issued_at),
            expires_at: issued.expires_at,
            per_second,
            newest_issue: lifetimes
                .iter()
                .map(|(i, _)| *i)
                .max()
                .unwrap_or(issued.issued_at),
        }
    }
}

/// The renewal load of the Secrets kept, at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Load {
    pub secrets: usize,
    /// Renewals per second the Secrets need.
    pub needed_per_second: f64,
    /// Secrets past their renewal time.
    pub backlog: usize,
    /// How long the most overdue of them has been due (zero with no backlog).
    pub oldest_overdue: Duration,
    /// When the first credential expires, if any Secret is kept.
    pub earliest_expiry: Option<Timestamp>,
}

pub(crate) fn load<'a>(kept: impl IntoIterator<Item = &'a Tracked>, now: Timestamp) -> Load {
    let mut load = Load::default();
    let mut oldest_due: Option<Timestamp> = None;
    for t in kept {
        load.secrets += 1;
        load.needed_per_second += t.per_second;
        if t.renew_at <= now {
            load.backlog += 1;
            oldest_due = Some(oldest_due.map_or(t.renew_at, |o| o.min(t.renew_at)));
        }
        load.earliest_expiry = Some(
            load.earliest_expiry
                .map_or(t.expires_at, |e| e.min(t.expires_at)),
        );
    }
    load.oldest_overdue = oldest_due
        .map(|due| super::renewal::until(now, due))
        .unwrap_or_default();
    load
}

/// The mint rate the pacer starts at, and never goes below (unless the ceiling is lower):
/// enough for a burst of opt-ins to be served in seconds, little enough for any API server.
pub(crate) const FLOOR_PER_SECOND: f64 = 20.0;

/// How far above the need the pacer runs, so that due renewals do not queue (each waits for its
/// slot only briefly and is written well before `renewBefore / 2` of its credential remains),
/// with room for admissions and retries.
pub(crate) const PACING_MARGIN: f64 = 0.25;

/// The mint rate to pace at: the need with its margin, at least the floor, at most the ceiling
/// (`refresh.maxMintsPerSecond`, which protects the API server and the registries).
pub(crate) fn pacing_rate(needed: f64, ceiling: f64) -> f64 {
    (needed * (1.0 + PACING_MARGIN))
        .max(FLOOR_PER_SECOND)
        .min(ceiling)
}

/// Whether the ceiling keeps up with the need.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Verdict {
    Enough,
    /// The renewals need more than the ceiling leaves them (all but [`HEADROOM`]).
    Short {
        needed: f64,
        ceiling: f64,
        /// The lowest whole ceiling that would do.
        enough_at: f64,
    },
}

pub(crate) fn verdict(needed: f64, ceiling: f64) -> Verdict {
    if needed > ceiling * (1.0 - HEADROOM) {
        Verdict::Short {
            needed,
            ceiling,
            enough_at: (needed / (1.0 - HEADROOM)).ceil().max(1.0),
        }
    } else {
        Verdict::Enough
    }
}

/// One line on the renewals, for `status` and the Event: need, ceiling, what to do when short,
/// and the backlog.
pub(crate) fn summary(load: &Load, ceiling: f64) -> String {
    let mut line = format!(
        "need {:.1}/s for {} Secrets, ceiling {ceiling}/s (refresh.maxMintsPerSecond)",
        load.needed_per_second, load.secrets
    );
    if let Verdict::Short { enough_at, .. } = verdict(load.needed_per_second, ceiling) {
        line.push_str(&format!(
            ": too low, Secrets will expire; raise refresh.maxMintsPerSecond to at least \
             {enough_at} or lengthen the token lifetime"
        ));
    }
    match load.backlog {
        0 => line.push_str("; none overdue"),
        n => line.push_str(&format!(
            "; {n} past their renewal time, the oldest by {}",
            crate::ops::status::human(load.oldest_overdue.as_secs() as i64)
        )),
    }
    line
}

/// How often a warning about short capacity is repeated while it lasts.
pub(crate) const REPEAT: SignedDuration = SignedDuration::from_mins(5);

/// What to say about the capacity now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Say {
    Nothing,
    /// Short, and not said lately: a warning (`again`: this shortage was already told).
    Short {
        again: bool,
    },
    /// No longer short, after a shortage that was told.
    Recovered,
}

/// Says so when capacity runs short, again at most every [`REPEAT`] while it lasts, and once
/// when it recovers. A need hovering at the ceiling cannot make it say more: a shortage that
/// starts within [`REPEAT`] of the last warning waits for its turn like a lasting one.
#[derive(Clone, Debug, Default)]
pub(crate) struct Alarm {
    short: bool,
    /// Whether the current shortage was told.
    told: bool,
    last_warning: Option<Timestamp>,
}

impl Alarm {
    pub(crate) fn observe(&mut self, short: bool, now: Timestamp) -> Say {
        let was_short = std::mem::replace(&mut self.short, short);
        if !short {
            let told = std::mem::take(&mut self.told);
            return if was_short && told {
                Say::Recovered
            } else {
                Say::Nothing
            };
        }
        let due = self
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= REPEAT);
        if !due {
            return Say::Nothing;
        }
        self.last_warning = Some(now);
        let again = was_short && self.told;
        self.told = true;
        Say::Short { again }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::subject::Subject;
    use crate::secret::layout::Lifetime;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn secret(registries: &[(&str, i64, i64)]) -> Issued {
        Issued {
            issued_at: at(registries.iter().map(|r| r.1).min().unwrap()),
            expires_at: at(registries.iter().map(|r| r.2).min().unwrap()),
            content_sha256: String::new(),
            registries: registries
                .iter()
                .map(|(h, i, e)| {
                    (
                        h.to_string(),
                        Lifetime {
                            issued_at: at(*i),
                            expires_at: at(*e),
                        },
                    )
                })
                .collect(),
        }
    }

    fn schedule(ns: &str) -> Schedule {
        Schedule::for_subject(&Subject::namespace(ns), None)
    }

    #[test]
    fn a_secret_of_one_hour_tokens_needs_a_renewal_every_0_58_to_0_67_of_an_hour() {
        // Default margin: a third of the lifetime, moved earlier by up to a quarter of it.
        for ns in ["a", "b", "team-a", "team-b"] {
            let t = Tracked::of(&secret(&[("r.example", 0, 3600)]), &schedule(ns));
            let interval = 1.0 / t.per_second;
            assert!((2100.0..=2400.0).contains(&interval), "{ns}: {interval}");
            let due = t.renew_at.duration_since(at(0)).as_secs_f64();
            assert!((due - interval).abs() < 1e-6, "{ns}: due at {due}");
            assert_eq!((t.expires_at, t.newest_issue), (at(3600), at(0)));
        }
    }

    #[test]
    fn credentials_minted_together_are_one_renewal_and_apart_are_one_each() {
        let s = schedule("ns");
        let one = Tracked::of(&secret(&[("a.example", 0, 3600)]), &s);
        let together = Tracked::of(
            &secret(&[("a.example", 0, 3600), ("b.example", 0, 3600)]),
            &s,
        );
        assert_eq!(together.per_second, one.per_second);
        // A 600 s credential beside the hour-long one: two writes, each on its own cycle.
        let apart = Tracked::of(
            &secret(&[("a.example", 0, 3600), ("b.example", 100, 700)]),
            &s,
        );
        let short = Tracked::of(&secret(&[("b.example", 100, 700)]), &s);
        assert!((apart.per_second - (one.per_second + short.per_second)).abs() < 1e-12);
        assert_eq!(
            apart.renew_at, short.renew_at,
            "due when its first credential is"
        );
        assert_eq!((apart.expires_at, apart.newest_issue), (at(700), at(100)));
        // No lifetime at all: counted as a renewal a second, not infinitely many.
        let none = Tracked::of(&secret(&[("a.example", 50, 50)]), &s);
        assert_eq!(none.per_second, 1.0);
    }

    fn tracked(renew_at: i64, expires_at: i64, per_second: f64) -> Tracked {
        Tracked {
            renew_at: at(renew_at),
            expires_at: at(expires_at),
            per_second,
            newest_issue: at(0),
        }
    }

    #[test]
    fn load_sums_the_need_and_finds_the_backlog_and_the_earliest_expiry() {
        let now = at(1000);
        // (kept, needed, backlog, oldest overdue s, earliest expiry)
        type Case = (Vec<Tracked>, f64, usize, u64, Option<i64>);
        let cases: Vec<Case> = vec![
            (vec![], 0.0, 0, 0, None),
            (vec![tracked(2000, 3000, 0.5)], 0.5, 0, 0, Some(3000)),
            // Due this very second counts as due, as the renewal plan does.
            (vec![tracked(1000, 3000, 0.5)], 0.5, 1, 0, Some(3000)),
            (
                vec![
                    tracked(1200, 1500, 0.25),
                    tracked(400, 1100, 0.25),
                    tracked(900, 900, 1.0),
                ],
                1.5,
                2,
                600,
                Some(900),
            ),
        ];
        for (kept, needed, backlog, overdue, earliest) in cases {
            let l = load(&kept, now);
            assert_eq!(l.secrets, kept.len());
            assert!((l.needed_per_second - needed).abs() < 1e-12, "{l:?}");
            assert_eq!(l.backlog, backlog, "{l:?}");
            assert_eq!(l.oldest_overdue, Duration::from_secs(overdue), "{l:?}");
            assert_eq!(l.earliest_expiry, earliest.map(at), "{l:?}");
        }
    }

    #[test]
    fn the_issue_s_estimate_20_per_second_holds_about_45_000_one_hour_secrets() {
        // Spread over namespaces, the jitter averages out: 0.625 of the lifetime per renewal.
        let kept: Vec<Tracked> = (0..45_000)
            .map(|n| {
                Tracked::of(
                    &secret(&[("r.example", 0, 3600)]),
                    &schedule(&format!("ns-{n}")),
                )
            })
            .collect();
        let need = load(&kept, at(0)).needed_per_second;
        assert!((19.5..=20.5).contains(&need), "{need}");
    }

    #[test]
    fn short_when_the_need_takes_more_than_the_ceiling_less_its_headroom() {
        // (needed, ceiling) → short, and the ceiling that would do
        let cases = [
            (0.0, 20.0, None),
            (17.9, 20.0, None),
            (18.0, 20.0, None),
            (18.1, 20.0, Some(21.0)),
            (31.2, 20.0, Some(35.0)),
            (0.5, 0.2, Some(1.0)),
        ];
        for (needed, ceiling, enough_at) in cases {
            let expected = match enough_at {
                None => Verdict::Enough,
                Some(enough_at) => Verdict::Short {
                    needed,
                    ceiling,
                    enough_at,
                },
            };
            assert_eq!(verdict(needed, ceiling), expected, "{needed} of {ceiling}");
        }
    }

    #[test]
    fn the_summary_says_what_to_raise_when_short_and_what_is_overdue() {
        let enough = Load {
            secrets: 10,
            needed_per_second: 0.26,
            ..Load::default()
        };
        assert_eq!(
            summary(&enough, 20.0),
            "need 0.3/s for 10 Secrets, ceiling 20/s (refresh.maxMintsPerSecond); none overdue"
        );
        let short = Load {
            secrets: 70_000,
            needed_per_second: 31.2,
            backlog: 120,
            oldest_overdue: Duration::from_secs(310),
            earliest_expiry: None,
        };
        assert_eq!(
            summary(&short, 20.0),
            "need 31.2/s for 70000 Secrets, ceiling 20/s (refresh.maxMintsPerSecond): too low, \
             Secrets will expire; raise refresh.maxMintsPerSecond to at least 35 or lengthen the \
             token lifetime; 120 past their renewal time, the oldest by 5m"
        );
    }

    #[test]
    fn the_alarm_warns_at_once_then_every_few_minutes_and_tells_the_recovery() {
        use Say::*;
        let mut alarm = Alarm::default();
        // (second, short) → said
        let steps = [
            (0, false, Nothing),
            (30, true, Short { again: false }),
            (60, true, Nothing),
            (300, true, Nothing),
            (330, true, Short { again: true }),
            (360, false, Recovered),
            (390, false, Nothing),
            // Short again soon after a warning: it waits for its turn, and its recovery is not
            // told since it never was.
            (420, true, Nothing),
            (450, false, Nothing),
            (480, true, Nothing),
            (630, true, Short { again: false }),
            (660, false, Recovered),
        ];
        for (second, short, said) in steps {
            assert_eq!(
                alarm.observe(short, at(second)),
                said,
                "at {second}s, short: {short}"
            );
        }
    }

    #[test]
    fn the_pacer_follows_the_need_between_the_floor_and_the_ceiling() {
        // (needed per second, ceiling) -> rate
        let cases = [
            (0.0, 100.0, 20.0),   // a quiet cluster: the floor
            (10.0, 100.0, 20.0),  // 12.5 with the margin: still the floor
            (40.0, 100.0, 50.0),  // 45,000 one-hour Secrets and more: the need plus a quarter
            (90.0, 100.0, 100.0), // the ceiling holds
            (5.0, 2.0, 2.0),      // a ceiling below the floor wins
        ];
        for (needed, ceiling, rate) in cases {
            assert_eq!(pacing_rate(needed, ceiling), rate, "{needed} {ceiling}");
        }
    }
}
