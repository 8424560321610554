//! pull-secret-injector: a mutating admission webhook and a background refresher that keep one
//! short-lived registry pull Secret in every opted-in namespace and attach it to Pods and
//! ServiceAccounts.
//!
//! Follow a request: [`server`] (HTTP) → [`webhook`] (namespace check, budget) → [`admission`]
//! (wire format, decision) → [`patch`]. Follow a token: [`token`] (sources) → [`provisioner`]
//! (cache, single flight, writes) → [`pull_secret`] (the Secret's layout) → [`renewal`] (when
//! to renew) ← [`reconciler`] (the background refresher).
#![forbid(unsafe_code)]

pub mod admission;
pub mod config;
pub mod patch;
pub mod provisioner;
pub mod pull_secret;
pub mod reconciler;
pub mod renewal;
pub mod selector;
pub mod server;
pub mod token;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum_server::tls_rustls::RustlsConfig;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::provisioner::Provisioner;
use crate::reconciler::Refresher;
use crate::selector::NamespacePolicy;

/// An API error as an operator needs it: the server's message and status, nothing more.
pub fn kube_error_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

/// How long in-flight admissions and reconciles get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The controller's graceful shutdown waits for in-flight reconciles, but not while it is still
/// waiting for its first list (an unreachable API server): abort it after the grace period.
async fn stop_refresher(mut refresher: JoinHandle<()>) {
    if tokio::time::timeout(SHUTDOWN_GRACE, &mut refresher).await.is_err() {
        tracing::warn!("refresher did not stop in time; aborting it");
        refresher.abort();
    }
}

/// Waits for a store's first full list. Polled on a short timer: the store's readiness signal
/// wakes only its most recent waiter, and the controller waits on it too.
async fn wait_until_ready<K>(store: &kube::runtime::reflector::Store<K>) -> bool
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
    #[error("cannot load TLS certificate {cert} / key {key}: {source}")]
    Tls { cert: String, key: String, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
}

/// A running service: the webhook server and the refresher.
pub struct Service {
    pub local_addr: SocketAddr,
    ready: Arc<AtomicBool>,
    handle: axum_server::Handle<SocketAddr>,
    stop: watch::Sender<bool>,
    server: JoinHandle<std::io::Result<()>>,
    refresher: JoinHandle<()>,
}

impl Service {
    /// Loads the certificate, binds the listener and starts serving and refreshing.
    pub async fn start(config: Config, client: kube::Client) -> Result<Self, StartError> {
        let tls = RustlsConfig::from_pem_file(&config.tls.cert_file, &config.tls.key_file).await.map_err(|source| StartError::Tls {
            cert: config.tls.cert_file.display().to_string(),
            key: config.tls.key_file.display().to_string(),
            source,
        })?;
        let listener = std::net::TcpListener::bind(config.listen).map_err(|source| StartError::Listen { addr: config.listen, source })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
        listener.set_nonblocking(true).map_err(|source| StartError::Listen { addr: config.listen, source })?;

        let own_namespace = config.own_namespace.clone().or_else(|| std::env::var("POD_NAMESPACE").ok());
        let policy = NamespacePolicy::new(config.namespace_selector.clone(), own_namespace.as_deref(), &config.excluded_namespaces);
        let provisioner = Arc::new(Provisioner::new(client.clone(), &config));
        let (retry_tx, retry_rx) = mpsc::unbounded_channel();
        let refresher = Refresher::new(client.clone(), policy.clone(), provisioner.clone(), retry_rx);

        let ready = Arc::new(AtomicBool::new(false));
        let (namespaces, secrets) = (refresher.namespaces.clone(), refresher.managed_secrets.clone());
        let flag = ready.clone();
        tokio::spawn(async move {
            if wait_until_ready(&namespaces).await && wait_until_ready(&secrets).await {
                flag.store(true, Ordering::Release);
                tracing::info!("watches synced; ready");
            }
        });

        let webhook = webhook::Webhook::new(client, policy, refresher.namespaces.clone(), provisioner, config.admission.budget, retry_tx);
        let state = Arc::new(server::AppState { webhook, ready: ready.clone(), max_body_bytes: config.admission.max_body_bytes });
        let app = server::router(state);

        let (stop, mut stopped) = watch::channel(false);
        let refresher = tokio::spawn(refresher.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        let handle = axum_server::Handle::new();
        let server = axum_server::from_tcp_rustls(listener, tls)
            .map_err(|source| StartError::Listen { addr: config.listen, source })?
            .handle(handle.clone())
            .serve(app.into_make_service());
        let server = tokio::spawn(server);
        tracing::info!(%local_addr, "serving admission webhook over TLS");
        Ok(Self { local_addr, ready, handle, stop, server, refresher })
    }

    /// Whether `/readyz` answers 200: the watches have synced.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Stops accepting connections, lets in-flight admissions finish, and stops the refresher.
    pub async fn shutdown(self) {
        self.handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
        let _ = self.stop.send(true);
        let _ = self.server.await;
        stop_refresher(self.refresher).await;
    }

    /// Runs until the server stops by itself (an error) or `signal` resolves.
    pub async fn run_until(self, signal: impl std::future::Future<Output = ()>) -> std::io::Result<()> {
        let Self { handle, stop, mut server, refresher, .. } = self;
        tokio::select! {
            result = &mut server => {
                let _ = stop.send(true);
                stop_refresher(refresher).await;
                return result.unwrap_or_else(|e| Err(std::io::Error::other(e)));
            }
            _ = signal => {}
        }
        tracing::info!("shutting down: finishing in-flight admissions");
        handle.graceful_shutdown(Some(SHUTDOWN_GRACE));
        let _ = stop.send(true);
        stop_refresher(refresher).await;
        server.await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
    }
}
