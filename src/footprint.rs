//! What the service keeps per Secret and per namespace, filled without a cluster: for the
//! benchmark's `caches` item, which counts the bytes each structure holds with a million
//! entries. Each function returns the filled structure, to be measured and dropped.

use std::any::Any;
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::runtime::reflector;
use kube::runtime::watcher::Event;

use crate::core::subject::Subject;
use crate::metrics::Metrics;
use crate::refresh::watched::Watched;
use crate::secret::capacity::Tracked;
use crate::secret::failures::Failures;
use crate::secret::layout::{Assessment, Issued};
use crate::secret::provisioner::Provisioner;
use crate::settings::{Environment, Settings};

/// A filled structure, held until dropped.
pub type Held = Box<dyn Any + Send>;

/// The `i`-th namespace's name: as long as a typical team namespace (13 characters).
pub fn namespace(i: usize) -> String {
    format!("team-{i:08}")
}

/// What a Secret with one registry's credential records: its lifetime and content hash.
pub fn issued(now: Timestamp) -> Issued {
    let mut issued = Issued::single(
        "registry.example.com",
        now,
        now + SignedDuration::from_hours(1),
    );
    issued.content_sha256 = "0123456789abcdef".repeat(4);
    issued
}

fn object<K: kube::Resource<DynamicType = ()> + Default>(namespace: &str, name: &str) -> K {
    let mut object = K::default();
    object.meta_mut().namespace = Some(namespace.to_string());
    object.meta_mut().name = Some(name.to_string());
    object
}

/// The provisioner's cache: `n` Secrets adopted (`Fresh`: what was written and when it is due),
/// with everything settled. `config` is a valid configuration (one registry).
pub async fn fresh_cache(n: usize, config: crate::config::Config) -> Held {
    let settings = Arc::new(Settings::new(config, &Environment::default()).expect("settings"));
    let client = kube::Client::try_from(kube::Config::new(
        "https://127.0.0.1:1".parse().expect("a URL"),
    ))
    .expect("a client (never used)");
    let http = crate::http::HttpClient::new(&settings.config.http, &Default::default())
        .expect("an HTTP client (never used)");
    let provisioner = Provisioner::new(
        client.clone(),
        http,
        reflector::store().0,
        settings,
        crate::cluster::Events::new(client, None),
        Arc::new(Metrics::default()),
    );
    let now = Timestamp::now();
    for i in 0..n {
        provisioner
            .remember(&Subject::namespace(&namespace(i)), issued(now))
            .await;
    }
    let kept = provisioner.settle_cache().await;
    assert_eq!(kept, n as u64, "every entry kept");
    Box::new(provisioner)
}

/// The refresher's view of the managed Secrets: `n` intact ones.
pub fn secret_view(n: usize) -> Held {
    let view = Watched::<Assessment>::default();
    let now = Timestamp::now();
    for i in 0..n {
        let secret: Secret = object(&namespace(i), "pull-secret");
        view.apply(&Event::InitApply(secret), |_| {
            Assessment::Intact(issued(now))
        });
    }
    view.apply(&Event::<Secret>::InitDone, |_| Assessment::Missing);
    Box::new(view)
}

/// The refresher's view of the ServiceAccounts: `n` namespaces' `default`.
pub fn account_view(n: usize) -> Held {
    let view = Watched::<bool>::default();
    for i in 0..n {
        let sa: ServiceAccount = object(&namespace(i), "default");
        view.apply(&Event::InitApply(sa), |_| true);
    }
    view.apply(&Event::<ServiceAccount>::InitDone, |_| true);
    Box::new(view)
}

/// The metrics' record of each Secret kept (renewal and expiry times).
pub fn expiry_records(n: usize) -> Held {
    let metrics = Metrics::default();
    metrics.set_refreshing(true);
    let now = Timestamp::now();
    for i in 0..n {
        let tracked = Tracked {
            renew_at: now + SignedDuration::from_mins(40),
            expires_at: now + SignedDuration::from_hours(1),
            per_second: 1.0 / 2250.0,
            newest_issue: now,
        };
        metrics.secret_written(&namespace(i), tracked);
    }
    Box::new(metrics)
}

/// What went wrong lately: `n` namespaces each with a failed reconcile (the worst case: all
/// failing at once; when nothing fails it holds nothing).
pub fn failure_records(n: usize) -> Held {
    let failures = Failures::default();
    for i in 0..n {
        failures.reconcile_failed(&namespace(i));
    }
    Box::new(failures)
}

/// The Namespace store every replica reads: `n` opted-in namespaces as the watch keeps them
/// (name and the selector's label).
pub fn namespace_store(n: usize) -> Held {
    let (store, mut writer) = reflector::store::<Namespace>();
    writer.apply_watcher_event(&Event::Init);
    for i in 0..n {
        let mut ns: Namespace = object("", &namespace(i));
        ns.metadata.namespace = None;
        ns.metadata.labels = Some(
            [(
                "pull-secret-injector.io/inject".to_string(),
                "enabled".to_string(),
            )]
            .into(),
        );
        writer.apply_watcher_event(&Event::InitApply(ns));
    }
    writer.apply_watcher_event(&Event::InitDone);
    assert_eq!(store.state().len(), n);
    Box::new((store, writer))
}

/// The refresher's controller with `n` namespaces reconciled, each requeued at its renewal
/// time an hour away: what it keeps per namespace (its schedule), beside the store it reads.
pub async fn controller_schedule(n: usize) -> Held {
    use futures::StreamExt;
    use kube::runtime::controller::{Action, Controller};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let (store, mut writer) = reflector::store::<Namespace>();
    writer.apply_watcher_event(&Event::Init);
    let namespaces: Vec<Arc<Namespace>> = (0..n)
        .map(|i| {
            let mut ns: Namespace = object("", &namespace(i));
            ns.metadata.namespace = None;
            Arc::new(ns)
        })
        .collect();
    for ns in &namespaces {
        writer.apply_watcher_event(&Event::InitApply(ns.as_ref().clone()));
    }
    writer.apply_watcher_event(&Event::InitDone);
    let done = Arc::new(AtomicUsize::new(0));
    // The stream stays open, as the watch's does: the controller stops when it ends.
    let events = futures::stream::iter(namespaces).chain(futures::stream::pending());
    let controller = Controller::for_shared_stream(events, store)
        .run(
            |_, done: Arc<AtomicUsize>| async move {
                done.fetch_add(1, Ordering::Relaxed);
                Ok::<_, std::convert::Infallible>(Action::requeue(std::time::Duration::from_secs(
                    3600,
                )))
            },
            |_, _, _| Action::await_change(),
            done.clone(),
        )
        .for_each(|_| futures::future::ready(()));
    let running = tokio::spawn(controller);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    while done.load(Ordering::Relaxed) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "reconciled {} of {n}",
            done.load(Ordering::Relaxed)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The writer lives as long as the controller, as in the service.
    struct Running(
        tokio::task::JoinHandle<()>,
        #[allow(dead_code)] reflector::store::Writer<Namespace>,
    );
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    Box::new(Running(running, writer))
}
