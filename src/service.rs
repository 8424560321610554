//! The running service, assembled: the webhook server, the one Namespace watch every replica
//! reads, and the refresher (in this replica when it leads), all handed the same settings.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admission::{coarse_timer, server, webhook};
use crate::cluster::Events;
use crate::compat::updater;
use crate::metrics;
use crate::refresh::leadership::{self, Inbox};
use crate::refresh::refresher::{self, Refresher};
use crate::secret::provisioner::Provisioner;
use crate::settings::Settings;
use crate::sources;
use crate::tls::{self, ReloadingCert};

/// How long in-flight admissions get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Waits for a store's first full list. Polled on a short timer: the store's readiness signal
/// wakes only its most recent waiter.
async fn wait_until_ready<K>(store: &reflector::Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            Ok(ready) => return ready.is_ok(),
            Err(_) => continue,
        }
    }
}

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
    Http(#[from] sources::http::HttpClientError),
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
        let events = Events::new(client.clone(), settings.instance.clone());
        let (stop, stopped) = watch::channel(false);
        let inbox = Inbox::default();
        let (namespaces, ready, tasks) = Self::watch_namespaces(&client, &inbox, &stopped);
        let mut background = Vec::from(tasks);

        let http = sources::http::HttpClient::new(&config.http)?;
        let provisioner = Arc::new(Provisioner::new(
            client.clone(),
            http.clone(),
            namespaces.clone(),
            settings.clone(),
            events.clone(),
            metrics.clone(),
        ));
        let (c, s, p, store, m) = (
            client.clone(),
            settings.clone(),
            provisioner.clone(),
            namespaces.clone(),
            metrics.clone(),
        );
        let make_refresher = move |feeds: leadership::Feeds| {
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
        });
        let handle = axum_server::Handle::new();
        let mut server = axum_server::from_tcp_rustls(listener, tls)
            .map_err(listen_error)?
            .handle(handle.clone());
        // A client that trickles its headers is cut off (HTTP/1; HTTP/2 has its own keep-alive).
        server
            .http_builder()
            .http1()
            .timer(timer)
            .header_read_timeout(admission.read_timeout);
        let server = server.serve(server::router(state).into_make_service());
        let server = tokio::spawn(server);
        tracing::info!(%local_addr, "serving admission webhook over TLS");
        Ok(Self {
            local_addr,
            ready,
            handle,
            stop,
            server,
            background,
        })
    }

    /// The one Namespace watch: every replica reads it to answer "opted in?" without an API
    /// call, and the refresher, where it runs, is fed its changes through the inbox. Returns the
    /// store, the readiness flag (set once the watch has listed), and the two tasks behind them.
    fn watch_namespaces(
        client: &kube::Client,
        inbox: &Inbox,
        stopped: &watch::Receiver<bool>,
    ) -> (
        reflector::Store<Namespace>,
        Arc<AtomicBool>,
        [JoinHandle<()>; 2],
    ) {
        let (namespaces, writer) = reflector::store();
        let inbox = inbox.clone();
        let watch = reflector::reflector(
            writer,
            watcher(
                Api::<Namespace>::all(client.clone()),
                watcher::Config::default(),
            )
            .modify(refresher::slim_namespace),
        )
        .backoff(crate::cluster::WatchBackoff::default())
        .scan(Vec::new(), move |relisted, event| {
            // The reflector fills the store from a (re)list only at its end: what the list
            // shows is passed on then, or the refresher would look for it in a store that does
            // not have it yet and drop it (a namespace created while the watch was down).
            match event {
                Ok(watcher::Event::Apply(ns)) => inbox.namespace_changed(Arc::new(ns)),
                Ok(watcher::Event::Init) => relisted.clear(),
                Ok(watcher::Event::InitApply(ns)) => relisted.push(Arc::new(ns)),
                Ok(watcher::Event::InitDone) => {
                    for ns in relisted.drain(..) {
                        inbox.namespace_changed(ns);
                    }
                }
                Ok(watcher::Event::Delete(_)) | Err(_) => {}
            }
            futures::future::ready(Some(()))
        })
        .for_each(|()| futures::future::ready(()));
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
            if wait_until_ready(&store).await {
                flag.store(true, Ordering::Release);
                tracing::info!("namespace watch synced; ready");
            }
        });
        (namespaces, ready, [watch, readiness])
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

    /// Runs until the server stops by itself (an error) or `signal` resolves.
    pub async fn run_until(
        self,
        signal: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let Self {
            handle,
            stop,
            mut server,
            background,
            ..
        } = self;
        let result = tokio::select! {
            result = &mut server => Some(result),
            _ = signal => None,
        };
        let result = match result {
            Some(r) => r,
            None => {
                tracing::info!("shutting down: finishing in-flight admissions");
                handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
                server.await
            }
        };
        Self::stop_background(stop, background).await;
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
