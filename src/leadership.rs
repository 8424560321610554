//! Which replica refreshes. Every replica answers admissions; the background refresher runs in
//! one replica at a time, the holder of a Lease (kube-lease-manager). When the holder dies, the
//! Lease expires and another replica takes over within the lease duration; on shutdown the
//! holder releases it at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::{mpsc, watch};

use crate::reconciler::Refresher;

/// Where admissions send namespaces to retry: the running refresher's channel, if this replica
/// runs one.
pub type RetrySlot = Arc<Mutex<Option<mpsc::UnboundedSender<String>>>>;

#[derive(Clone, Debug)]
pub struct Election {
    pub lease_name: String,
    pub namespace: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_grace: Duration,
}

/// How long a stopping refresher gets to finish in-flight reconciles.
pub const REFRESHER_GRACE: Duration = Duration::from_secs(10);

/// Runs refreshers made by `make` while this replica should refresh (always, without an
/// election), until `stop` turns true.
pub async fn run(
    client: Client,
    election: Option<Election>,
    make: impl Fn(mpsc::UnboundedReceiver<String>) -> Refresher,
    retry: RetrySlot,
    mut stop: watch::Receiver<bool>,
) {
    let Some(election) = election else {
        let term = Term::start(&make, &retry);
        let _ = stop.wait_for(|s| *s).await;
        term.end(&retry).await;
        return;
    };
    let mut backoff = Duration::from_secs(1);
    let manager = loop {
        let built = LeaseManagerBuilder::new(client.clone(), &election.lease_name)
            .with_namespace(&election.namespace)
            .with_identity(&election.identity)
            .with_duration(election.lease_duration.as_secs())
            .with_grace(election.renew_grace.as_secs())
            .build()
            .await;
        match built {
            Ok(m) => break m,
            Err(e) => {
                tracing::warn!(error = %e, lease = %election.lease_name, "cannot set up leader election; retrying");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(Duration::from_secs(30)),
                }
            }
        }
    };
    let (mut leading, lease_task) = manager.watch().await;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            r = leading.wait_for(|l| *l) => if r.is_err() { break },
        }
        tracing::info!(identity = %election.identity, lease = %election.lease_name, "became the leader: refreshing");
        let term = Term::start(&make, &retry);
        let lost = tokio::select! {
            _ = stop.wait_for(|s| *s) => false,
            r = leading.wait_for(|l| !*l) => r.is_ok(),
        };
        term.end(&retry).await;
        if !lost {
            break;
        }
        tracing::warn!(identity = %election.identity, "lost the lease: stopped refreshing");
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

/// One refresher, running until ended.
struct Term {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Term {
    fn start(
        make: &impl Fn(mpsc::UnboundedReceiver<String>) -> Refresher,
        retry: &RetrySlot,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        *retry.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        let (stop, mut stopped) = watch::channel(false);
        let refresher = make(rx);
        let task = tokio::spawn(refresher.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        Self { stop, task }
    }

    /// The controller's graceful shutdown waits for in-flight reconciles, but not while it is
    /// still waiting for its first list (an unreachable API server): abort it after the grace.
    async fn end(mut self, retry: &RetrySlot) {
        *retry.lock().unwrap_or_else(|p| p.into_inner()) = None;
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
