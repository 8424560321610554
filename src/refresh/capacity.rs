//! Paces mints at what the Secrets kept need (`secret::capacity::pacing_rate`), and says so,
//! loudly, while they need more renewals per second than `refresh.maxMintsPerSecond` allows:
//! renewals would slip until Secrets expire, with nothing failing. Runs beside the refresher, so only where it runs: a warning in the log when it
//! starts (again every few minutes while it lasts, `secret::capacity::Alarm`), a Warning Event
//! on this replica's Pod, and a line when it recovers. The metrics say it at every scrape.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::api::{Api, ListParams};
use kube::Client;

use crate::cluster;
use crate::secret::capacity::{self, Alarm, Say, Verdict};
use crate::secret::provisioner::Provisioner;
use crate::settings::Settings;

/// How often the load is looked at: it moves with the population, slowly.
const CHECK_EVERY: Duration = Duration::from_secs(30);

pub(crate) fn watch(
    client: Client,
    settings: Arc<Settings>,
    provisioner: Arc<Provisioner>,
) -> futures::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        let mut alarm = Alarm::default();
        // Not at once: a new refresher is still adopting the Secrets it keeps.
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + CHECK_EVERY, CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pod: Option<ObjectReference> = None;
        loop {
            tick.tick().await;
            let now = Timestamp::now();
            // The pacer's rate, from the same setting.
            let ceiling = settings.config.refresh.max_mints_per_second;
            let load = provisioner.metrics().renewal_load(now);
            provisioner.set_mint_rate(capacity::pacing_rate(load.needed_per_second, ceiling));
            let enough_at = match capacity::verdict(load.needed_per_second, ceiling) {
                Verdict::Short { enough_at, .. } => Some(enough_at),
                Verdict::Enough => None,
            };
            match (alarm.observe(enough_at.is_some(), now), enough_at) {
                (Say::Nothing, _) | (Say::Short { .. }, None) => {}
                (Say::Short { again }, Some(enough_at)) => {
                    tracing::warn!(
                        needed_per_second = load.needed_per_second,
                        ceiling_per_second = ceiling,
                        secrets = load.secrets,
                        backlog = load.backlog,
                        oldest_overdue_s = load.oldest_overdue.as_secs(),
                        again,
                        "renewals need more mints per second than refresh.maxMintsPerSecond \
                         allows: Secrets will expire; raise it to at least {enough_at} or \
                         lengthen the token lifetime"
                    );
                    let regarding = match &pod {
                        Some(known) => Some(known.clone()),
                        None => own_pod(&client, &settings).await,
                    };
                    // Kept once its uid is known; looked up again at the next warning if not.
                    if regarding.as_ref().is_some_and(|p| p.uid.is_some()) {
                        pod.clone_from(&regarding);
                    }
                    if let Some(regarding) = &regarding {
                        let note = capacity::summary(&load, ceiling);
                        provisioner
                            .events()
                            .warn(regarding, "Renew", "RenewalCapacityShort", &note)
                            .await;
                    }
                }
                (Say::Recovered, _) => tracing::info!(
                    needed_per_second = load.needed_per_second,
                    ceiling_per_second = ceiling,
                    secrets = load.secrets,
                    "renewal capacity suffices again"
                ),
            }
        }
    })
}

/// A reference to this replica's Pod, with its uid when a list can say it (`kubectl describe
/// pod` shows only Events that carry it); `None` outside a Pod.
async fn own_pod(client: &Client, settings: &Settings) -> Option<ObjectReference> {
    let (namespace, name) = settings.own_pod.as_ref()?;
    let mut reference = cluster::reference("Pod", namespace, name);
    let lp = ListParams::default().fields(&format!("metadata.name={name}"));
    match Api::<Pod>::namespaced(client.clone(), namespace)
        .list_metadata(&lp)
        .await
    {
        Ok(list) => reference.uid = list.items.into_iter().find_map(|p| p.metadata.uid),
        Err(e) => {
            tracing::debug!(error = %cluster::KubeError::from(e), "cannot look up this replica's Pod; its Event goes without uid")
        }
    }
    Some(reference)
}
