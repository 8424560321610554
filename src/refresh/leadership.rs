//! Which replica refreshes. Every replica answers admissions; the background refresher runs in
//! one replica at a time, the holder of a Lease (kube-lease-manager). When the holder dies, the
//! Lease expires and another replica takes over within the lease duration; on shutdown the
//! holder releases it at once, and a waiting replica, which watches the Lease, takes it then
//! (the lease manager alone would look again only when the old term would have expired, so a
//! freshly started replacement Pod would win).

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::watcher;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::{mpsc, watch};

use super::inbox::{Feeds, Inbox};
use super::refresher::Refresher;
use crate::settings::Election;

/// How long a stopping refresher gets to finish in-flight reconciles.
pub(crate) const REFRESHER_GRACE: Duration = Duration::from_secs(10);

/// Runs refreshers made by `make` while this replica should refresh (always, without an
/// election), until `stop` turns true.
pub(crate) async fn run(
    client: Client,
    election: Option<Election>,
    make: impl Fn(Feeds) -> Refresher,
    inbox: Inbox,
    mut stop: watch::Receiver<bool>,
) {
    let Some(election) = election else {
        let term = Term::start(&make, &inbox);
        let _ = stop.wait_for(|s| *s).await;
        term.end(&inbox).await;
        return;
    };
    let Some(manager) = build_manager(&client, &election, &mut stop).await else {
        return;
    };
    let (mut leading, mut lease_task) = manager.watch().await;
    let mut released = watch_released(client.clone(), &election);
    loop {
        let released_now = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = leading.wait_for(|l| *l) => if r.is_err() { break } else { false },
            Some(()) = released.recv() => true,
        };
        if released_now {
            // Not leading, and the holder let go: look now instead of at the old expiry.
            lease_task.abort();
            let Some(manager) = build_manager(&client, &election, &mut stop).await else {
                return;
            };
            (leading, lease_task) = manager.watch().await;
            continue;
        }
        tracing::info!(identity = %election.identity, lease = %election.lease_name, "became the leader: refreshing");
        let term = Term::start(&make, &inbox);
        let lost = tokio::select! {
            _ = stop.wait_for(|s| *s) => false,
            r = leading.wait_for(|l| !*l) => r.is_ok(),
        };
        term.end(&inbox).await;
        if !lost {
            break;
        }
        tracing::warn!(identity = %election.identity, "lost the lease: stopped refreshing");
        // Releases seen while leading say nothing about now.
        while released.try_recv().is_ok() {}
    }
    // Closing the channel makes the lease task release the Lease, so a successor need not wait
    // for it to expire.
    drop(leading);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => tracing::info!(lease = %election.lease_name, "released the lease"),
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "could not release the lease; it expires by itself")
        }
        _ => tracing::warn!("lease task did not finish; the lease expires by itself"),
    }
}

async fn build_manager(
    client: &Client,
    election: &Election,
    stop: &mut watch::Receiver<bool>,
) -> Option<kube_lease_manager::LeaseManager> {
    let mut backoff = Duration::from_secs(1);
    loop {
        let built = LeaseManagerBuilder::new(client.clone(), &election.lease_name)
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(election.lease_duration.as_secs())
            .with_grace(election.renew_grace.as_secs())
            .build()
            .await;
        match built {
            Ok(m) => return Some(m),
            Err(e) => {
                tracing::warn!(error = %e, lease = %election.lease_name, "cannot set up leader election; retrying");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return None,
                    _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(Duration::from_secs(30)),
                }
            }
        }
    }
}

/// Whether a Lease, as last seen, is held by nobody (released on shutdown).
pub(crate) fn is_released(lease: &Lease) -> bool {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_deref())
        .is_none_or(str::is_empty)
}

/// A message each time the Lease is seen held by nobody. Watch errors only delay this: the
/// lease manager still takes an expired Lease on its own schedule.
fn watch_released(client: Client, election: &Election) -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(1);
    let leases: Api<Lease> = Api::namespaced(client, &election.namespace);
    let config =
        watcher::Config::default().fields(&format!("metadata.name={}", election.lease_name));
    tokio::spawn(async move {
        let mut events = std::pin::pin!(watcher(leases, config));
        while let Some(event) = events.next().await {
            let lease = match event {
                Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l)) => l,
                Ok(_) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "Lease watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if is_released(&lease) && tx.try_send(()).is_err() && tx.is_closed() {
                return;
            }
        }
    });
    rx
}

/// One refresher, running until ended.
struct Term {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Term {
    fn start(make: &impl Fn(Feeds) -> Refresher, inbox: &Inbox) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let refresher = make(inbox.open());
        let task = tokio::spawn(refresher.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        Self { stop, task }
    }

    /// The controller's graceful shutdown waits for in-flight reconciles, but not while it is
    /// still waiting for its first list (an unreachable API server): abort it after the grace.
    async fn end(mut self, inbox: &Inbox) {
        inbox.close();
        let _ = self.stop.send(true);
        if tokio::time::timeout(REFRESHER_GRACE, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!("refresher did not stop in time; aborting it");
            self.task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;

    #[test]
    fn a_lease_is_released_when_nobody_holds_it() {
        let lease = |holder: Option<&str>| Lease {
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                ..Default::default()
            }),
            ..Default::default()
        };
        for (holder, released) in [(None, true), (Some(""), true), (Some("replica-a"), false)] {
            assert_eq!(is_released(&lease(holder)), released, "{holder:?}");
        }
        assert!(is_released(&Lease::default()), "no spec at all");
    }
}
