//! Attacks on the servers' byte budget and connection limits, bounded in count and time, on
//! loopback. The attacker connects from 127.0.0.2 and the real client from 127.0.0.1, so the
//! servers see two peers, as they would see a hostile Pod and the API server.
//!
//! What a test asserts is correctness (every real request answered, within the API server's
//! webhook timeout); the latencies are printed (`--nocapture`) as the figures of the attack.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

pub const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
pub const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
/// Several attackers (Pods on several nodes): 127.0.0.2 to 127.0.0.5.
pub const ATTACKERS: [IpAddr; 4] = [
    ATTACKER,
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)),
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5)),
];

/// `timeoutSeconds` of the shipped MutatingWebhookConfiguration: how long the API server waits
/// for a review before it admits the Pod unpatched (`failurePolicy: Ignore`).
pub fn shipped_webhook_timeout() -> Duration {
    let path = super::repo().join("deploy/kustomize/base/mutatingwebhookconfiguration.yaml");
    let doc: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let seconds = doc["webhooks"][0]["timeoutSeconds"]
        .as_u64()
        .expect("the shipped webhook sets timeoutSeconds");
    Duration::from_secs(seconds)
}

/// A TCP connection from `from`.
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// A TLS client that trusts `ca_pem` (and offers `alpn`), for the attackers.
pub fn tls_client(ca_pem: &[u8], alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn tls_from(
    from: IpAddr,
    to: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<Tls> {
    let tcp = connect_from(from, to).await?;
    let name = rustls::pki_types::ServerName::from(to.ip());
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
}

/// Waits until the peer closes `stream` (or `stop` is set, or `limit` passes).
async fn until_closed<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    stop: &AtomicBool,
    limit: Duration,
) {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            _ => {}
        }
    }
}

/// Starts an attack: a test's list of them.
pub type Launch<'a> = Box<dyn Fn() -> Attack + 'a>;

/// An attack running in the background; counts what it did.
pub struct Attack {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Connections the attacker opened (TCP accepted by the kernel).
    pub opened: Arc<AtomicU64>,
    /// Of those, how many got what the attack needs (the request sent, the handshake done).
    pub established: Arc<AtomicU64>,
}

impl Attack {
    fn new() -> Self {
        Self {
            stop: Arc::default(),
            tasks: Vec::new(),
            opened: Arc::default(),
            established: Arc::default(),
        }
    }

    pub async fn stop(self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        format!(
            "attacker: {} connections opened, {} got their request or handshake through",
            self.opened.load(Ordering::Relaxed),
            self.established.load(Ordering::Relaxed)
        )
    }

    /// Every `every`, `per_round` new connections each send a `POST /mutate` declaring
    /// `declared` bytes of body, then `sent` bytes of it, and hold the request open until the
    /// server answers or closes (its body deadline). `sent: 0` is the attack: a budget
    /// taken with no bytes.
    pub fn declared_bodies(
        to: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        per_round: usize,
        every: Duration,
        declared: usize,
        sent: usize,
    ) -> Self {
        let mut me = Self::new();
        let (stop, opened, established) =
            (me.stop.clone(), me.opened.clone(), me.established.clone());
        me.tasks.push(tokio::spawn(async move {
            let mut held = tokio::task::JoinSet::new();
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..per_round {
                    let (stop, tls, opened, established) =
                        (stop.clone(), tls.clone(), opened.clone(), established.clone());
                    held.spawn(async move {
                        let Ok(mut conn) = tls_from(ATTACKER, to, &tls).await else {
                            return;
                        };
                        opened.fetch_add(1, Ordering::Relaxed);
                        let head = format!(
                            "POST /mutate HTTP/1.1\r\nhost: {to}\r\ncontent-type: application/json\r\ncontent-length: {declared}\r\n\r\n"
                        );
                        if conn.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                        let chunk = vec![b' '; 64 * 1024];
                        let mut left = sent;
                        while left > 0 && !stop.load(Ordering::Relaxed) {
                            let n = left.min(chunk.len());
                            // A server that does not read blocks the write: bounded, and given up.
                            match tokio::time::timeout(Duration::from_secs(15), conn.write_all(&chunk[..n])).await {
                                Ok(Ok(())) => left -= n,
                                _ => return,
                            }
                        }
                        let _ = conn.flush().await;
                        established.fetch_add(1, Ordering::Relaxed);
                        until_closed(&mut conn, &stop, Duration::from_secs(30)).await;
                    });
                }
                let round = Instant::now();
                while round.elapsed() < every && !stop.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            while tokio::time::timeout(Duration::from_secs(5), held.join_next())
                .await
                .is_ok_and(|r| r.is_some())
            {}
            held.abort_all();
        }));
        me
    }

    /// Keeps `n` TCP connections open from `peers` (in turn) that never start TLS,
    /// reconnecting each one the server closes (at most `n` open at once, at most `per_second`
    /// new ones a second).
    pub fn raw_sockets(to: SocketAddr, peers: &[IpAddr], n: usize, per_second: u32) -> Self {
        Self::holding(to, peers, n, per_second, None)
    }

    /// Keeps `n` connections from `peers` (in turn) that complete TLS and then send nothing,
    /// reconnecting each one the server closes.
    pub fn idle_tls(
        to: SocketAddr,
        peers: &[IpAddr],
        tls: Arc<rustls::ClientConfig>,
        n: usize,
        per_second: u32,
    ) -> Self {
        Self::holding(to, peers, n, per_second, Some(tls))
    }

    fn holding(
        to: SocketAddr,
        peers: &[IpAddr],
        n: usize,
        per_second: u32,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Self {
        let peers = peers.to_vec();
        let mut me = Self::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(n));
        let (stop, opened, established) =
            (me.stop.clone(), me.opened.clone(), me.established.clone());
        me.tasks.push(tokio::spawn(async move {
            let mut held = tokio::task::JoinSet::new();
            let pause = Duration::from_secs(1) / per_second.max(1);
            let mut next = peers.iter().copied().cycle();
            while !stop.load(Ordering::Relaxed) {
                let from = next.next().unwrap_or(ATTACKER);
                let Ok(Ok(slot)) =
                    tokio::time::timeout(Duration::from_millis(200), slots.clone().acquire_owned())
                        .await
                else {
                    continue;
                };
                let (stop, tls, opened, established) = (
                    stop.clone(),
                    tls.clone(),
                    opened.clone(),
                    established.clone(),
                );
                held.spawn(async move {
                    let _slot = slot;
                    let Ok(mut tcp) = connect_from(from, to).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        return;
                    };
                    opened.fetch_add(1, Ordering::Relaxed);
                    match tls {
                        None => until_closed(&mut tcp, &stop, Duration::from_secs(60)).await,
                        Some(config) => {
                            let name = rustls::pki_types::ServerName::from(to.ip());
                            let handshake =
                                tokio_rustls::TlsConnector::from(config).connect(name, tcp);
                            let Ok(Ok(mut conn)) =
                                tokio::time::timeout(Duration::from_secs(15), handshake).await
                            else {
                                return;
                            };
                            // TLS 1.3: a refused connection may finish the client's half; the
                            // first read tells.
                            let mut probe = [0u8; 1];
                            if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(
                                Duration::from_millis(100),
                                conn.read(&mut probe),
                            )
                            .await
                            {
                                return;
                            }
                            established.fetch_add(1, Ordering::Relaxed);
                            until_closed(&mut conn, &stop, Duration::from_secs(60)).await;
                        }
                    }
                });
                // (A timer sleeps a millisecond at least: faster is a yield.)
                if pause >= Duration::from_millis(1) {
                    tokio::time::sleep(pause).await;
                } else {
                    tokio::task::yield_now().await;
                }
                while held.try_join_next().is_some() {}
            }
            while tokio::time::timeout(Duration::from_secs(5), held.join_next())
                .await
                .is_ok_and(|r| r.is_some())
            {}
            held.abort_all();
        }));
        me
    }
}

/// What the real client saw: each request's latency, or why it failed.
#[derive(Default)]
pub struct Figures {
    pub answered: Vec<Duration>,
    pub failed: Vec<String>,
}

impl Figures {
    pub fn max(&self) -> Duration {
        self.answered.iter().copied().max().unwrap_or_default()
    }

    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.answered.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let i = ((sorted.len() - 1) as f64 * p).round() as usize;
        sorted[i]
    }

    pub fn summary(&self) -> String {
        format!(
            "{} requests: {} answered (p50 {:.3}s, p90 {:.3}s, max {:.3}s), {} failed{}",
            self.answered.len() + self.failed.len(),
            self.answered.len(),
            self.percentile(0.5).as_secs_f64(),
            self.percentile(0.9).as_secs_f64(),
            self.max().as_secs_f64(),
            self.failed.len(),
            match self.failed.first() {
                Some(f) => format!(" (first: {f})"),
                None => String::new(),
            }
        )
    }

    /// Every request answered as expected, each within `limit`.
    pub fn assert_all_within(&self, limit: Duration, what: &str) {
        assert!(
            self.failed.is_empty() && !self.answered.is_empty() && self.max() <= limit,
            "{what}: every real request must be answered within {limit:?}: {}",
            self.summary()
        );
    }
}

/// Starts one request every `every` for `during` (each on its own task, so a slow one does not
/// delay the next) and gathers the outcomes. `one` answers `Ok` for an expected answer.
pub async fn measure<F, Fut>(during: Duration, every: Duration, one: F) -> Figures
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let started = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    while started.elapsed() < during {
        let request = one();
        running.spawn(async move {
            let t = Instant::now();
            // Bounded well past any timeout of interest, so a stuck request is a figure too.
            match tokio::time::timeout(Duration::from_secs(20), request).await {
                Ok(Ok(())) => Ok(t.elapsed()),
                Ok(Err(e)) => Err(format!("{e} after {:.3}s", t.elapsed().as_secs_f64())),
                Err(_) => Err("no answer within 20s".to_string()),
            }
        });
        tokio::time::sleep(every).await;
    }
    let mut figures = Figures::default();
    while let Some(r) = running.join_next().await {
        match r.expect("request task") {
            Ok(latency) => figures.answered.push(latency),
            Err(e) => figures.failed.push(e),
        }
    }
    figures
}

/// A client like the API server's, from [`CLIENT`], that opens a new connection for each
/// request (the attacks on the connection cap bite on new connections).
pub fn real_client(ca_pem: &[u8]) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem).unwrap())
        .local_address(CLIENT)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}
