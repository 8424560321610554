//! The webhook's budget of request-body bytes held at once (`admission.maxBytesInFlight`) and
//! each peer's share of it (`maxBytesInFlightPerPeer`). Bytes are taken as they arrive, never
//! as a `Content-Length` declares them, so a request that sends nothing holds nothing; and a
//! peer that sends bodies it never finishes holds at most its share, so the API server's
//! reviews find room beside it.
//!
//! Taking bytes as they come means requests hold part of their body while they wait for room
//! for the rest: with the budget spread over many such requests, none could finish. So one
//! body's worth (`maxBodyBytes`) is kept aside for one request at a time, the first to wait:
//! it takes the rest of its body from there, past its peer's share, and finishes; then the
//! next waiting request takes its turn.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub(crate) struct ByteBudget {
    /// All of the budget but the reserve.
    shared: Arc<Semaphore>,
    /// One body's worth, for the request whose turn it is.
    reserve: Arc<Semaphore>,
    turn: Arc<Semaphore>,
    per_peer: usize,
    /// A peer's share, while it holds or waits for bytes; dropped when it does neither.
    peers: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
}

/// The bytes one request holds, given back when dropped.
pub(crate) struct Held {
    budget: Arc<ByteBudget>,
    peer: IpAddr,
    /// From the peer's share and from the shared budget, as many of each.
    shared: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    /// The turn, and what it took from the reserve.
    turn: Option<(OwnedSemaphorePermit, Option<OwnedSemaphorePermit>)>,
}

impl ByteBudget {
    /// `total` bytes at most, of which `max_body` are the reserve (`total >= max_body`), and
    /// `per_peer` of the rest for any one peer.
    pub(crate) fn new(total: usize, max_body: usize, per_peer: usize) -> Arc<Self> {
        let reserve = max_body.min(total);
        Arc::new(Self {
            shared: Arc::new(Semaphore::new(total - reserve)),
            reserve: Arc::new(Semaphore::new(reserve)),
            turn: Arc::new(Semaphore::new(1)),
            per_peer,
            peers: Mutex::default(),
        })
    }

    /// An empty holding for a request from `peer`.
    pub(crate) fn holding(self: &Arc<Self>, peer: IpAddr) -> Held {
        Held {
            budget: self.clone(),
            peer,
            shared: None,
            turn: None,
        }
    }

    fn share(&self, peer: IpAddr) -> Arc<Semaphore> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_peer)))
            .clone()
    }
}

impl Held {
    /// Takes `n` more bytes (at most a body's worth in all): at once when there is room, else
    /// waiting up to `wait` for room or for the turn. `false` when neither came.
    pub(crate) async fn take(&mut self, n: usize, wait: Duration) -> bool {
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        if let Some((_, taken)) = self.turn.as_mut() {
            return add(
                taken,
                self.budget.reserve.clone().try_acquire_many_owned(n).ok(),
            );
        }
        let share = self.budget.share(self.peer);
        if let Ok(mine) = share.clone().try_acquire_many_owned(n) {
            if let Ok(all) = self.budget.shared.clone().try_acquire_many_owned(n) {
                self.add_shared(mine, all);
                return true;
            }
        }
        let shared = self.budget.shared.clone();
        let room = async move {
            let mine = share.acquire_many_owned(n).await.ok()?;
            let all = shared.acquire_many_owned(n).await.ok()?;
            Some((mine, all))
        };
        let turn = self.budget.turn.clone().acquire_owned();
        let waited = tokio::time::timeout(wait, async {
            tokio::select! {
                biased;
                room = room => room.map(Ok),
                turn = turn => turn.ok().map(Err),
            }
        });
        match waited.await {
            Ok(Some(Ok((mine, all)))) => {
                self.add_shared(mine, all);
                true
            }
            Ok(Some(Err(turn))) => {
                let mut taken = None;
                let ok = add(
                    &mut taken,
                    self.budget.reserve.clone().try_acquire_many_owned(n).ok(),
                );
                self.turn = Some((turn, taken));
                ok
            }
            _ => false,
        }
    }

    fn add_shared(&mut self, mine: OwnedSemaphorePermit, all: OwnedSemaphorePermit) {
        match self.shared.as_mut() {
            Some((m, a)) => {
                m.merge(mine);
                a.merge(all);
            }
            None => self.shared = Some((mine, all)),
        }
    }
}

/// Merges `more` into `taken`; `false` if there was none.
fn add(taken: &mut Option<OwnedSemaphorePermit>, more: Option<OwnedSemaphorePermit>) -> bool {
    let Some(more) = more else { return false };
    match taken {
        Some(t) => t.merge(more),
        None => *taken = Some(more),
    }
    true
}

impl Drop for Held {
    fn drop(&mut self) {
        self.shared = None;
        self.turn = None;
        // The map's is the last reference: nobody holds or waits for this peer's bytes.
        let mut peers = self.budget.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers
            .get(&self.peer)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            peers.remove(&self.peer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
    const SHORT: Duration = Duration::from_millis(50);

    fn in_use(budget: &ByteBudget, total: usize) -> usize {
        total - budget.shared.available_permits() - budget.reserve.available_permits()
    }

    #[tokio::test]
    async fn one_peer_holds_its_share_and_the_turn_at_most_and_another_still_finds_room() {
        // 80 shared, 50 of them for any one peer, 20 in reserve.
        let budget = ByteBudget::new(100, 20, 50);
        let mut a1 = budget.holding(A);
        assert!(a1.take(40, SHORT).await);
        let mut a2 = budget.holding(A);
        assert!(a2.take(10, SHORT).await);
        // A's share is spent: the first of its requests to wait gets the turn and the reserve...
        let mut a3 = budget.holding(A);
        assert!(a3.take(15, SHORT).await);
        assert!(a3.take(5, SHORT).await);
        // ...and no more than a body's worth of it.
        assert!(!a3.take(1, SHORT).await);
        // The next waits, and without room in time gets none.
        assert!(!budget.holding(A).take(1, SHORT).await);
        // B takes the rest of the shared budget beside it.
        let mut b = budget.holding(B);
        assert!(b.take(30, SHORT).await);
        assert_eq!(in_use(&budget, 100), 100);
        // What one request gives back, another of the same peer can take.
        drop(a1);
        assert!(budget.holding(A).take(40, SHORT).await);
    }

    /// Bytes taken as they come: five requests that each hold part of their body while they
    /// wait for room for the rest, in a budget that cannot hold two whole bodies, all finish.
    #[tokio::test]
    async fn requests_holding_part_of_their_bodies_all_finish() {
        let budget = ByteBudget::new(30, 20, 30);
        let requests = (0..5).map(|_| {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut held = budget.holding(A);
                for _ in 0..4 {
                    if !held.take(5, Duration::from_secs(10)).await {
                        return false;
                    }
                    tokio::task::yield_now().await;
                }
                true
            })
        });
        let done =
            tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(requests))
                .await
                .expect("no request waits forever");
        assert!(done.into_iter().all(|r| r.unwrap()));
        assert_eq!(in_use(&budget, 30), 0);
    }

    #[tokio::test]
    async fn a_waiting_request_gets_room_when_another_gives_it_back() {
        let budget = ByteBudget::new(10, 10, 10);
        let mut first = budget.holding(A);
        assert!(first.take(10, SHORT).await);
        let waiting = {
            let budget = budget.clone();
            tokio::spawn(async move {
                let mut second = budget.holding(B);
                second.take(5, Duration::from_secs(10)).await
            })
        };
        tokio::time::sleep(SHORT).await;
        drop(first);
        assert!(waiting.await.unwrap());
    }

    #[tokio::test]
    async fn peers_with_nothing_held_leave_no_state() {
        let budget = ByteBudget::new(120, 20, 50);
        for i in 0..100u8 {
            let mut held = budget.holding(IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 0, i)));
            assert!(held.take(10, SHORT).await);
        }
        let mut waiting = budget.holding(A);
        assert!(waiting.take(50, SHORT).await);
        assert!(budget.holding(A).take(1, SHORT).await, "the turn");
        drop(waiting);
        assert!(budget.peers.lock().unwrap().is_empty());
        assert_eq!(in_use(&budget, 120), 0);
    }
}
