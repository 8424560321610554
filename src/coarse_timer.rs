//! A coarse timer for the webhook server's client read deadlines (hyper's header-read timeout
//! and the body-read timeout in `server`).
//!
//! Both are armed for every request (hyper's each time a keep-alive connection waits for its
//! next request). With tokio's timer each arming registers with the runtime's time driver, and
//! when another worker is parked on the driver, that worker is woken to take the new deadline:
//! at one request in flight this cost a quarter of the throughput (hack/bench,
//! bench-results/HISTORY.md). A slow client does not need a precise deadline, so here a sleeper
//! only records its deadline and waker in a shared table, and one task sweeps the table every
//! tick: a deadline fires at most one tick late, and arming or dropping a sleeper wakes no
//! thread.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

#[derive(Clone)]
pub(crate) struct CoarseTimer {
    table: Arc<Table>,
}

#[derive(Default)]
struct Table {
    next_id: AtomicU64,
    sleepers: Mutex<HashMap<u64, (Instant, Waker)>>,
}

impl Table {
    fn sleepers(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Instant, Waker)>> {
        // The table holds no invariant a panicking holder could break halfway.
        self.sleepers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Wakes and forgets every sleeper whose deadline has passed. The wakers run after the
    /// lock is released: a woken task may poll its sleeper at once.
    fn sweep(&self, now: Instant) {
        let mut due = Vec::new();
        self.sleepers().retain(|_, (deadline, waker)| {
            let keep = *deadline > now;
            if !keep {
                due.push(waker.clone());
            }
            keep
        });
        due.into_iter().for_each(Waker::wake);
    }
}

impl CoarseTimer {
    /// Starts the sweeping task on the current tokio runtime. It ends once the timer and every
    /// sleeper made from it are dropped.
    pub(crate) fn start(tick: Duration) -> Self {
        let table = Arc::new(Table::default());
        let weak: Weak<Table> = Arc::downgrade(&table);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let Some(table) = weak.upgrade() else { return };
                table.sweep(Instant::now());
            }
        });
        Self { table }
    }

    fn sleeper(&self, deadline: Instant) -> CoarseSleep {
        CoarseSleep {
            deadline,
            id: self.table.next_id.fetch_add(1, Ordering::Relaxed),
            registered: false,
            table: self.table.clone(),
        }
    }
}

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.sleeper(Instant::now() + duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(self.sleeper(deadline))
    }
}

struct CoarseSleep {
    deadline: Instant,
    id: u64,
    registered: bool,
    table: Arc<Table>,
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if Instant::now() >= this.deadline {
            if this.registered {
                this.table.sleepers().remove(&this.id);
                this.registered = false;
            }
            return Poll::Ready(());
        }
        let mut sleepers = this.table.sleepers();
        match sleepers.get_mut(&this.id) {
            Some((_, waker)) if waker.will_wake(cx.waker()) => {}
            Some((_, waker)) => *waker = cx.waker().clone(),
            None => {
                sleepers.insert(this.id, (this.deadline, cx.waker().clone()));
            }
        }
        this.registered = true;
        Poll::Pending
    }
}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        if self.registered {
            self.table.sleepers().remove(&self.id);
        }
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test]
    async fn a_sleeper_fires_within_a_tick_of_its_deadline_and_not_before() {
        let timer = CoarseTimer::start(Duration::from_millis(20));
        let started = Instant::now();
        tokio::time::timeout(
            Duration::from_secs(10),
            timer.sleep(Duration::from_millis(100)),
        )
        .await
        .expect("the sleeper fires");
        let slept = started.elapsed();
        assert!(slept >= Duration::from_millis(100), "woke early: {slept:?}");
        assert!(
            timer.table.sleepers().is_empty(),
            "a fired sleeper is forgotten"
        );
    }

    #[tokio::test]
    async fn a_dropped_sleeper_leaves_nothing_behind() {
        let timer = CoarseTimer::start(Duration::from_millis(20));
        let mut sleep = timer.sleep(Duration::from_secs(60));
        let waker = futures::task::noop_waker();
        assert!(sleep
            .as_mut()
            .poll(&mut Context::from_waker(&waker))
            .is_pending());
        assert_eq!(timer.table.sleepers().len(), 1);
        drop(sleep);
        assert!(timer.table.sleepers().is_empty());
    }

    #[test]
    fn a_sweep_wakes_only_what_is_due() {
        let table = Table::default();
        let now = Instant::now();
        let waker = futures::task::noop_waker();
        table
            .sleepers()
            .insert(1, (now - Duration::from_millis(1), waker.clone()));
        table
            .sleepers()
            .insert(2, (now + Duration::from_secs(5), waker));
        table.sweep(now);
        assert_eq!(table.sleepers().keys().copied().collect::<Vec<_>>(), [2]);
    }
}
