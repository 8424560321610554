//! Spaces out mints: one slot every `1/rate` seconds, so Secrets falling due together never
//! flood the API server or a token endpoint. Two kinds of caller share the slots: admissions
//! waiting for their Secret, and the refresher renewing. A slot is given to a caller only when
//! it comes up, and while both kinds wait they take turns; so a burst of renewals queued first
//! cannot make an admission wait behind all of them, and a namespace whose admissions keep
//! failing cannot take the renewals' slots. Either kind has every slot while the other has
//! none waiting. Within a kind, renewals go earliest lapse first (a credential that runs out
//! sooner is renewed sooner, when renewals fall behind), admissions in arrival order.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Who asks for a mint slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Caller {
    /// An admission waiting for its Secret.
    Admission,
    /// The refresher (renewal, restore, opt-in), or anything else in the background.
    Refresher,
}

impl Caller {
    fn index(self) -> usize {
        match self {
            Self::Admission => 0,
            Self::Refresher => 1,
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Admission => Self::Refresher,
            Self::Refresher => Self::Admission,
        }
    }
}

/// Which kind of caller the next slot goes to: the one whose turn it is, unless none of that
/// kind waits.
fn served_next(turn: Caller, admissions_waiting: bool, refresher_waiting: bool) -> Option<Caller> {
    let waiting = |c: Caller| match c {
        Caller::Admission => admissions_waiting,
        Caller::Refresher => refresher_waiting,
    };
    [turn, turn.other()].into_iter().find(|c| waiting(*c))
}

pub(crate) struct MintPacer {
    /// The time between slots, in nanoseconds: set anew as the renewal need changes.
    interval: AtomicU64,
    state: Mutex<State>,
}

struct State {
    /// When the next slot comes up.
    next: Instant,
    /// Waiters per kind (by `Caller::index`), first served first: by when the credential
    /// they renew lapses (in ms since the epoch; an arrival's own time when nothing stored
    /// lasts), then in arrival order; each with its own wake-up. Only the first of each queue
    /// can be served next, so only they are woken when a slot is taken, a waiter leaves or the
    /// rate changes: a backlog of a thousand waiters costs two wake-ups per slot, not a thousand.
    queues: [BTreeMap<Place, Arc<Notify>>; 2],
    /// The kind served first when both wait.
    turn: Caller,
    last_ticket: u64,
}

impl MintPacer {
    pub(crate) fn new(per_second: f64) -> Self {
        Self {
            interval: AtomicU64::new(interval_nanos(per_second)),
            state: Mutex::new(State {
                next: Instant::now(),
                queues: [BTreeMap::new(), BTreeMap::new()],
                turn: Caller::Admission,
                last_ticket: 0,
            }),
        }
    }

    /// Slots per second from now on (the next slot already set keeps its time).
    pub(crate) fn set_rate(&self, per_second: f64) {
        self.interval
            .store(interval_nanos(per_second), Ordering::Relaxed);
        self.lock().wake_heads();
    }

    /// Slots per second now.
    pub(crate) fn rate(&self) -> f64 {
        1e9 / self.interval.load(Ordering::Relaxed) as f64
    }

    fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval.load(Ordering::Relaxed))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for this caller's slot. `lapses_at`: when the credentials to renew run out
    /// (`None`: nothing usable is stored, so now). Admissions pass `None`, and are served in
    /// arrival order.
    pub(crate) async fn wait(&self, caller: Caller, lapses_at: Option<jiff::Timestamp>) {
        let lapses = lapses_at
            .unwrap_or_else(jiff::Timestamp::now)
            .as_millisecond();
        let woken = Arc::new(Notify::new());
        let ticket = {
            let mut s = self.lock();
            s.last_ticket += 1;
            let ticket = (lapses, s.last_ticket);
            s.queues[caller.index()].insert(ticket, woken.clone());
            // A new head (an earlier lapse than the waiting head's) must look at the slot.
            s.wake_heads();
            ticket
        };
        // Leaves the queue if this wait is dropped before its slot (a cancelled reconcile).
        let mut queued = Queued {
            pacer: self,
            caller,
            ticket,
            served: false,
        };
        loop {
            let wake_at = {
                let mut s = self.lock();
                let now = Instant::now();
                let first = s.queues[caller.index()].keys().next() == Some(&ticket);
                let turn = served_next(s.turn, !s.queues[0].is_empty(), !s.queues[1].is_empty());
                if first && turn == Some(caller) {
                    if s.next <= now {
                        // A waiter woken a little late keeps the cadence; after a pause the
                        // cadence starts again now, with no catching up.
                        let interval = self.interval();
                        let slot = if s.next + interval > now { s.next } else { now };
                        s.next = slot + interval;
                        s.queues[caller.index()].remove(&ticket);
                        s.turn = caller.other();
                        queued.served = true;
                        s.wake_heads();
                        return;
                    }
                    Some(s.next)
                } else {
                    None
                }
            };
            // A wake-up sent since the look above is kept (`notify_one` stores it): none is lost.
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = woken.notified() => {}
                    }
                }
                None => woken.notified().await,
            }
        }
    }
}

/// A waiter's place in its queue: (lapse time in ms, arrival number).
type Place = (i64, u64);

impl State {
    /// Wakes the first waiter of each kind to look again whose turn it is.
    fn wake_heads(&self) {
        for queue in &self.queues {
            if let Some(head) = queue.values().next() {
                head.notify_one();
            }
        }
    }
}

fn interval_nanos(per_second: f64) -> u64 {
    (1e9 / per_second.max(0.001)).max(1.0) as u64
}

struct Queued<'a> {
    pacer: &'a MintPacer,
    caller: Caller,
    ticket: Place,
    served: bool,
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        if !self.served {
            let mut s = self.pacer.lock();
            s.queues[self.caller.index()].remove(&self.ticket);
            s.wake_heads();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn turns_alternate_while_both_wait_and_either_has_every_slot_alone() {
        use Caller::*;
        // (turn, admissions waiting, refresher waiting) → served
        let cases = [
            (Admission, true, true, Some(Admission)),
            (Refresher, true, true, Some(Refresher)),
            (Admission, false, true, Some(Refresher)),
            (Refresher, true, false, Some(Admission)),
            (Admission, false, false, None),
        ];
        for (turn, a, r, expected) in cases {
            assert_eq!(served_next(turn, a, r), expected, "{turn:?} {a} {r}");
        }
    }

    /// When each of `callers` got its slot, seconds after the start, in slot order.
    async fn slots(pacer: Arc<MintPacer>, callers: Vec<(Caller, Duration)>) -> Vec<(Caller, f64)> {
        let start = Instant::now();
        let waits = callers.into_iter().map(|(caller, arrives)| {
            let p = pacer.clone();
            tokio::spawn(async move {
                tokio::time::sleep(arrives).await;
                p.wait(caller, None).await;
                (caller, start.elapsed().as_secs_f64())
            })
        });
        let mut got: Vec<(Caller, f64)> = futures::future::join_all(waits)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        got.sort_by(|a, b| a.1.total_cmp(&b.1));
        got
    }

    #[tokio::test(start_paused = true)]
    async fn the_pacer_turns_a_burst_into_a_steady_rate() {
        let pacer = Arc::new(MintPacer::new(4.0));
        let got = slots(pacer, vec![(Caller::Refresher, Duration::ZERO); 9]).await;
        // 9 callers at 4 per second: slots at 0, 0.25, ..., 2.0 seconds.
        let at: Vec<f64> = got.iter().map(|(_, t)| *t).collect();
        assert_eq!(at, (0..9).map(|i| i as f64 * 0.25).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn admissions_are_not_queued_behind_a_burst_of_renewals() {
        let pacer = Arc::new(MintPacer::new(10.0));
        // 40 renewals fall due at once; 3 admissions arrive a moment later.
        let mut callers = vec![(Caller::Refresher, Duration::ZERO); 40];
        callers.extend([(Caller::Admission, Duration::from_millis(1)); 3]);
        let got = slots(pacer, callers).await;
        let admissions: Vec<usize> = got
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| *c == Caller::Admission)
            .map(|(i, _)| i)
            .collect();
        // Slot 0 went to a renewal before they came; then every other slot is theirs.
        assert_eq!(admissions, [1, 3, 5]);
        assert_eq!(got.len(), 43);
        let last = got.last().unwrap().1;
        assert!((last - 4.2).abs() < 1e-9, "43 slots at 10/s: {last}");
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_are_not_starved_by_admissions() {
        let pacer = Arc::new(MintPacer::new(10.0));
        // A stream of admissions (a namespace whose mints keep failing, say), and 5 renewals.
        let mut callers: Vec<(Caller, Duration)> = (0..50)
            .map(|i| (Caller::Admission, Duration::from_millis(20 * i)))
            .collect();
        callers.extend([(Caller::Refresher, Duration::from_millis(5)); 5]);
        let got = slots(pacer, callers).await;
        let renewals: Vec<usize> = got
            .iter()
            .enumerate()
            .filter(|(_, (c, _))| *c == Caller::Refresher)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(renewals, [1, 3, 5, 7, 9]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_leaves_its_place() {
        let pacer = Arc::new(MintPacer::new(1.0));
        pacer.wait(Caller::Refresher, None).await; // the slot at 0 is taken
        let p = pacer.clone();
        let gone = tokio::spawn(async move { p.wait(Caller::Admission, None).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        gone.abort();
        let _ = gone.await;
        let got = slots(pacer, vec![(Caller::Refresher, Duration::ZERO)]).await;
        // The next slot, at 1 s, goes to the caller still waiting.
        assert_eq!(got.len(), 1);
        assert!((got[0].1 - 0.9).abs() < 1e-9, "{got:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_falling_behind_go_earliest_lapse_first() {
        let pacer = Arc::new(MintPacer::new(1.0));
        pacer.wait(Caller::Refresher, None).await; // the slot at 0 is taken
        let now = jiff::Timestamp::now();
        let minutes = |m: i64| Some(now + jiff::SignedDuration::from_mins(m));
        // Queued in this order while the next slot is a second away.
        let due = [
            ("in 30 min", minutes(30)),
            ("in 5 min", minutes(5)),
            ("nothing stored", None),
            ("in 10 min", minutes(10)),
            ("lapsed", minutes(-1)),
        ];
        let served = Arc::new(Mutex::new(Vec::new()));
        let waits: Vec<_> = due
            .into_iter()
            .map(|(what, lapses)| {
                let (p, served) = (pacer.clone(), served.clone());
                tokio::spawn(async move {
                    p.wait(Caller::Refresher, lapses).await;
                    served.lock().unwrap().push(what);
                })
            })
            .collect();
        futures::future::join_all(waits).await;
        assert_eq!(
            *served.lock().unwrap(),
            [
                "lapsed",
                "nothing stored",
                "in 5 min",
                "in 10 min",
                "in 30 min"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_of_a_thousand_is_served_earliest_lapse_first_at_the_rate() {
        let pacer = Arc::new(MintPacer::new(100.0));
        pacer.wait(Caller::Refresher, None).await; // the slot at 0 is taken
        let now = jiff::Timestamp::now();
        let served = Arc::new(Mutex::new(Vec::new()));
        // Queued in scrambled order of lapse (the controller hands them over in any order).
        let waits: Vec<_> = (0..1000u64)
            .map(|i| {
                let lapse = (i * 7919) % 1000;
                let (p, served) = (pacer.clone(), served.clone());
                tokio::spawn(async move {
                    let at = now + jiff::SignedDuration::from_secs(lapse as i64);
                    p.wait(Caller::Refresher, Some(at)).await;
                    served.lock().unwrap().push(lapse);
                })
            })
            .collect();
        let start = Instant::now();
        futures::future::join_all(waits).await;
        assert_eq!(*served.lock().unwrap(), (0..1000).collect::<Vec<_>>());
        let took = start.elapsed().as_secs_f64();
        assert!((took - 10.0).abs() < 0.011, "1000 slots at 100/s: {took}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_rate_applies_from_the_next_slot() {
        let pacer = Arc::new(MintPacer::new(1.0));
        pacer.wait(Caller::Refresher, None).await; // slot 0; the next is at 1 s
        pacer.set_rate(4.0);
        assert_eq!(pacer.rate(), 4.0);
        let got = slots(pacer, vec![(Caller::Refresher, Duration::ZERO); 3]).await;
        let at: Vec<f64> = got.iter().map(|(_, t)| *t).collect();
        assert_eq!(at, [1.0, 1.25, 1.5]);
    }
}
