//! pull-secret-injector: a mutating admission webhook and a background refresher that keep one
//! short-lived registry pull Secret in every opted-in namespace and attach it to Pods and
//! ServiceAccounts.
//!
//! Follow a request: [`server`] (HTTP) → [`webhook`] (namespace check, budget) → [`admission`]
//! (wire format, decision) → [`patch`]. Follow a token: [`token`] (sources) → [`provisioner`]
//! (cache, single flight, writes) → [`pull_secret`] (the Secret's layout) → [`renewal`] (when
//! to renew) ← [`reconciler`] (the background refresher, which reads Secrets and ServiceAccounts
//! through [`watched`] views).
#![forbid(unsafe_code)]

pub mod admission;
pub mod certs;
pub mod coarse_timer;
pub mod config;
pub mod images;
pub mod leadership;
pub mod metrics;
pub mod patch;
pub mod provisioner;
pub mod pull_secret;
pub mod reconciler;
pub mod renewal;
pub mod selector;
pub mod server;
pub mod status;
pub mod subject;
pub mod tls;
pub mod token;
pub mod token_server;
pub mod updater;
pub mod watched;
pub mod webhook;

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

use crate::config::Config;
use crate::leadership::{Election, RetrySlot};
use crate::provisioner::Provisioner;
use crate::reconciler::Refresher;
use crate::selector::NamespacePolicy;
use crate::tls::ReloadingCert;

/// An API error as an operator needs it: the server's message and status, nothing more.
pub fn kube_error_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

/// Writes `secret` where `stored` was read: created if there was none, otherwise replaced at
/// exactly the version read, so a concurrent writer makes this fail with 409 instead of being
/// overwritten.
pub async fn create_or_replace(
    api: &Api<k8s_openapi::api::core::v1::Secret>,
    stored: Option<&k8s_openapi::api::core::v1::Secret>,
    mut secret: k8s_openapi::api::core::v1::Secret,
) -> kube::Result<k8s_openapi::api::core::v1::Secret> {
    let params = kube::api::PostParams::default();
    match stored {
        None => api.create(&params, &secret).await,
        Some(old) => {
            secret.metadata.resource_version = old.metadata.resource_version.clone();
            let name = secret.metadata.name.clone().unwrap_or_default();
            api.replace(&name, &params, &secret).await
        }
    }
}

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
    #[error("leaderElection: no namespace for the Lease (set leaderElection.namespace, ownNamespace or $POD_NAMESPACE)")]
    LeaseNamespace,
    #[error("{0}")]
    Http(#[from] token::http::HttpClientError),
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
    pub async fn start(config: Config, client: kube::Client) -> Result<Self, StartError> {
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

        let own_namespace = config
            .own_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok());
        let election = match &config.leader_election {
            None => None,
            Some(le) => Some(Election {
                lease_name: le.lease_name.clone(),
                namespace: le
                    .namespace
                    .clone()
                    .or_else(|| own_namespace.clone())
                    .ok_or(StartError::LeaseNamespace)?,
                identity: std::env::var("POD_NAME")
                    .unwrap_or_else(|_| format!("pull-secret-injector-{:016x}", fastrand::u64(..))),
                lease_duration: le.lease_duration,
                renew_grace: le.renew_grace,
            }),
        };
        let policy = NamespacePolicy::new(
            config.namespace_selector.clone(),
            own_namespace.as_deref(),
            &config.excluded_namespaces,
        );
        let metrics = Arc::new(metrics::Metrics::default());
        let (stop, stopped) = watch::channel(false);
        let mut background = Vec::new();

        // Every replica watches namespaces to answer "opted in?" without an API call.
        let (namespaces, writer) = reflector::store();
        let http = token::http::HttpClient::new(&config.http)?;
        let provisioner = Arc::new(Provisioner::new(
            client.clone(),
            http,
            namespaces.clone(),
            &config,
            metrics.clone(),
        ));
        let namespace_watch = reflector::reflector(
            writer,
            watcher(
                Api::<Namespace>::all(client.clone()),
                watcher::Config::default(),
            )
            .modify(reconciler::slim_namespace),
        )
        .default_backoff()
        .for_each(|_| futures::future::ready(()));
        let mut until_stopped = stopped.clone();
        background.push(tokio::spawn(async move {
            tokio::select! {
                _ = namespace_watch => {}
                _ = until_stopped.wait_for(|s| *s) => {}
            }
        }));
        let ready = Arc::new(AtomicBool::new(false));
        let (flag, store) = (ready.clone(), namespaces.clone());
        background.push(tokio::spawn(async move {
            if wait_until_ready(&store).await {
                flag.store(true, Ordering::Release);
                tracing::info!("namespace watch synced; ready");
            }
        }));

        let retry: RetrySlot = Arc::default();
        let (c, p, pol, upd, m) = (
            client.clone(),
            provisioner.clone(),
            policy.clone(),
            config.pull_secret_updater.clone(),
            metrics.clone(),
        );
        let make_refresher = move |retries| {
            let updater = upd
                .clone()
                .map(|u| updater::Updater::new(c.clone(), p.http().clone(), u, m.clone()));
            Refresher::new(c.clone(), pol.clone(), p.clone(), retries, updater)
        };
        background.push(tokio::spawn(leadership::run(
            client.clone(),
            election,
            make_refresher,
            retry.clone(),
            stopped,
        )));

        let webhook = webhook::Webhook::new(
            client,
            policy,
            namespaces,
            provisioner,
            config.admission.budget,
            retry,
            metrics.clone(),
        );
        // Client read deadlines are armed for every request, so they run on a cheap, coarse timer.
        let timer = coarse_timer::CoarseTimer::start(Duration::from_millis(100));
        let state = Arc::new(server::AppState {
            webhook,
            ready: ready.clone(),
            max_body_bytes: config.admission.max_body_bytes,
            read_timeout: config.admission.read_timeout,
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
            .header_read_timeout(config.admission.read_timeout);
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
