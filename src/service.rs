//! The running service, assembled: the webhook server, the one Namespace watch every replica
//! reads, and the refresher (in this replica when it leads), all handed the same settings.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use futures::StreamExt;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admission::{bytes, server, webhook};
use crate::cluster::Events;
use crate::compat::updater;
use crate::connections;
use crate::metrics;
use crate::refresh::inbox::{Feeds, Inbox};
use crate::refresh::leadership;
use crate::refresh::refresher::{self, Refresher};
use crate::secret::provisioner::Provisioner;
use crate::settings::Settings;
use crate::slim::Slim;
use crate::tls::{self, ReloadingCert};
use crate::{coarse_timer, http};

/// How long in-flight admissions get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Http(#[from] http::HttpClientError),
}

/// A running service: the webhook server, the namespace watch it reads, and the refresher
/// (in this replica when it leads).
pub struct Service {
    pub local_addr: SocketAddr,
    ready: Arc<AtomicBool>,
    handle: axum_server::Handle<SocketAddr>,
    stop: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    background: Vec<JoinHandle<()>>,
    shutdown_delay: Duration,
}

impl Service {
    /// Loads the certificate, binds the listener and starts serving and refreshing.
    pub async fn start(settings: Settings, client: kube::Client) -> Result<Self, StartError> {
        let settings = Arc::new(settings);
        let config = &settings.config;
        let cert = Arc::new(ReloadingCert::load(
            &config.tls.cert_file,
            &config.tls.key_file,
        )?);
        let tls = RustlsConfig::from_config(Arc::new(tls::server_config(cert)?));
        let listen_error = |source| StartError::Listen {
            addr: config.listen,
            source,
        };
        let listener = std::net::TcpListener::bind(config.listen).map_err(listen_error)?;
        let local_addr = listener.local_addr().map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;

        let metrics = Arc::new(metrics::Metrics::default());
        metrics.set_renewal_ceiling(config.refresh.max_mints_per_second);
        metrics.set_mint_rate(crate::secret::capacity::pacing_rate(
            0.0,
            config.refresh.max_mints_per_second,
        ));
        let events = Events::new(client.clone(), settings.instance.clone());
        let (stop, stopped) = watch::channel(false);
        let inbox = Inbox::default();
        let (namespaces, writer) = reflector::store();

        if config.admission.mode == crate::config::AdmissionMode::Policy {
            let client = client.clone();
            tokio::spawn(async move { crate::cluster::check_policy_api(&client).await });
        }
        let http = http::HttpClient::new(&config.http, &settings.proxy)?;
        let provisioner = Arc::new(Provisioner::new(
            client.clone(),
            http.clone(),
            namespaces.clone(),
            settings.clone(),
            events.clone(),
            metrics.clone(),
        ));
        let namespace_watch = Arc::new(webhook::NamespaceWatch::default());
        let (ready, tasks) = Self::watch_namespaces(
            &client,
            writer,
            namespaces.clone(),
            namespace_watch.clone(),
            &inbox,
            provisioner.clone(),
            &stopped,
        );
        let mut background = Vec::from(tasks);
        let (c, s, p, store, m) = (
            client.clone(),
            settings.clone(),
            provisioner.clone(),
            namespaces.clone(),
            metrics.clone(),
        );
        let make_refresher = move |feeds: Feeds| {
            let updater = s.config.pull_secret_updater.clone().map(|u| {
                updater::Updater::new(c.clone(), http.clone(), u, events.clone(), m.clone())
            });
            Refresher::new(
                c.clone(),
                s.clone(),
                p.clone(),
                store.clone(),
                feeds.namespaces,
                feeds.retry,
                updater,
            )
        };
        background.push(tokio::spawn(leadership::run(
            client.clone(),
            settings.election.clone(),
            make_refresher,
            inbox.clone(),
            stopped,
        )));

        let webhook = webhook::Webhook::new(
            client,
            settings.clone(),
            namespaces,
            namespace_watch,
            provisioner,
            inbox,
            metrics.clone(),
        );
        // Client read deadlines are armed for every request, so they run on a cheap, coarse timer.
        let timer = coarse_timer::CoarseTimer::start(Duration::from_millis(100));
        let admission = settings.admission();
        let state = Arc::new(server::AppState {
            webhook,
            ready: ready.clone(),
            max_body_bytes: admission.max_body_bytes,
            read_timeout: admission.read_timeout,
            timer: timer.clone(),
            metrics,
            body_bytes: bytes::ByteBudget::new(
                admission.max_bytes_in_flight,
                admission.max_body_bytes,
                admission.bytes_in_flight_per_peer(),
            ),
        });
        let handle = axum_server::Handle::new();
        let limits = admission.connection_limits();
        let server = connections::serve(
            listener,
            tls,
            "webhook",
            limits,
            admission.read_timeout,
            timer,
            handle.clone(),
            server::router(state),
        )
        .map_err(listen_error)?;
        let server = tokio::spawn(server);
        tracing::info!(%local_addr, "serving admission webhook over TLS");
        Ok(Self {
            local_addr,
            ready,
            handle,
            stop,
            server,
            background,
            shutdown_delay: admission.shutdown_delay,
        })
    }

    /// The one Namespace watch: every replica reads it to answer "opted in?" without an API
    /// call, and the refresher, where it runs, is fed its changes through the inbox. A deleted
    /// namespace (or one gone when the watch relists) is forgotten by the provisioner. Returns
    /// the readiness flag (set once the watch has listed), and the two tasks behind it.
    fn watch_namespaces(
        client: &kube::Client,
        writer: reflector::store::Writer<Namespace>,
        namespaces: reflector::Store<Namespace>,
        namespace_watch: Arc<webhook::NamespaceWatch>,
        inbox: &Inbox,
        provisioner: Arc<Provisioner>,
        stopped: &watch::Receiver<bool>,
    ) -> (Arc<AtomicBool>, [JoinHandle<()>; 2]) {
        let inbox = inbox.clone();
        let policy = provisioner.settings().policy.clone();
        let watch = reflector::reflector(
            writer,
            crate::cluster::watch_from_cache(
                Api::<Slim<Namespace>>::all(client.clone()),
                watcher::Config::default(),
            )
            .map_ok(crate::slim::unwrap)
            .modify(move |ns| refresher::slim_namespace(ns, &policy)),
        )
        .backoff(crate::cluster::WatchBackoff::default())
        .scan(Vec::new(), move |relisted, event| {
            // The reflector fills the store from a (re)list only at its end: what the list
            // shows is passed on then, or the refresher would look for it in a store that does
            // not have it yet and drop it (a namespace created while the watch was down).
            // After a deletion or a relist, namespaces gone from the store are forgotten.
            // The reflector has applied the event to the store by now: admissions waiting on
            // the watch look again.
            match &event {
                Ok(
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
                ) => namespace_watch.applied(),
                Ok(_) => {}
                Err(_) => namespace_watch.failed(),
            }
            let forget = match event {
                Ok(watcher::Event::Apply(ns)) => {
                    inbox.namespace_changed(Arc::new(ns));
                    false
                }
                Ok(watcher::Event::Init) => {
                    relisted.clear();
                    false
                }
                Ok(watcher::Event::InitApply(ns)) => {
                    relisted.push(Arc::new(ns));
                    false
                }
                Ok(watcher::Event::InitDone) => {
                    for ns in relisted.drain(..) {
                        inbox.namespace_changed(ns);
                    }
                    true
                }
                Ok(watcher::Event::Delete(_)) => true,
                Err(_) => false,
            };
            futures::future::ready(Some(forget))
        })
        .for_each(move |forget| {
            let provisioner = provisioner.clone();
            async move {
                if forget {
                    provisioner.forget_gone().await
                }
            }
        });
        let mut until_stopped = stopped.clone();
        let watch = tokio::spawn(async move {
            tokio::select! {
                _ = watch => {}
                _ = until_stopped.wait_for(|s| *s) => {}
            }
        });
        let ready = Arc::new(AtomicBool::new(false));
        let (flag, store) = (ready.clone(), namespaces.clone());
        let readiness = tokio::spawn(async move {
            if crate::cluster::wait_until_ready(&store).await {
                flag.store(true, Ordering::Release);
                tracing::info!("namespace watch synced; ready");
            }
        });
        (ready, [watch, readiness])
    }

    /// Whether `/readyz` answers 200: the namespace watch has synced.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Stops accepting connections, lets in-flight admissions finish, stops the refresher and
    /// releases the Lease.
    pub async fn shutdown(self) {
        let Self {
            handle,
            stop,
            server,
            background,
            ..
        } = self;
        handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
        let _ = server.await;
        Self::stop_background(stop, background).await;
    }

    /// Runs until the server stops by itself (an error) or `signal` resolves. Then: `/readyz`
    /// fails and the refresher stops (releasing the Lease, so another replica takes over at
    /// once) while reviews are still answered for `admission.shutdownDelay`, the time the API
    /// server takes to stop routing to this Pod; then in-flight admissions get to finish.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let Self {
            ready,
            handle,
            stop,
            mut server,
            background,
            shutdown_delay,
            ..
        } = self;
        let ended = tokio::select! {
            result = &mut server => Some(result),
            _ = signal => None,
        };
        if ended.is_none() {
            ready.store(false, Ordering::Release);
            tracing::info!(
                delay = ?shutdown_delay,
                "shutting down: still answering while the API server stops routing here"
            );
        }
        let background = tokio::spawn(Self::stop_background(stop, background));
        let result = match ended {
            Some(r) => r,
            None => tokio::select! {
                result = &mut server => result,
                _ = tokio::time::sleep(shutdown_delay) => {
                    tracing::info!("shutting down: finishing in-flight admissions");
                    handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
                    server.await
                }
            },
        };
        let _ = background.await;
        result.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }

    async fn stop_background(stop: watch::Sender<bool>, background: Vec<JoinHandle<()>>) {
        let _ = stop.send(true);
        for mut task in background {
            // The refresher gets its own grace inside; this bounds everything else.
            if tokio::time::timeout(
                leadership::REFRESHER_GRACE + Duration::from_secs(6),
                &mut task,
            )
            .await
            .is_err()
            {
                task.abort();
            }
        }
    }
}
