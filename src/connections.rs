//! Connection limits for both HTTPS servers (the webhook and the token server): a TLS handshake
//! deadline, a cap on connections past their handshake, a cap per peer (IP address), and an
//! idle deadline before the first request and between requests, on HTTP/1 and HTTP/2 alike.
//!
//! Two acceptors, around axum-server's TLS acceptor: [`Limited`] under TLS counts the peer's
//! connection and gives it a handshake slot when TCP accepts it; [`Established`] over TLS moves
//! it under `maxConnections` once the handshake is done. So one peer holds at most
//! `maxConnectionsPerPeer` connections of either kind, and sockets that never finish TLS never
//! fill the cap. When the slots are all taken, a newcomer is not simply refused, or a few peers
//! together could still lock the API server out: it displaces the oldest handshake in progress
//! (a real one takes milliseconds), or the connection idle longest of the peer with the most
//! connections. A connection with a request in progress is never displaced.
//!
//! "Idle" is "no request in progress", not "no bytes": a client that keeps a connection busy
//! with HTTP/2 PINGs and no stream is idle too.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum_server::accept::Accept;
use axum_server::tls_rustls::RustlsAcceptor;
use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// How often, at most, each kind of refusal or displacement is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// Connections past their TLS handshake, at once. As many handshakes may be in progress
    /// besides.
    pub max_connections: usize,
    /// Connections from one IP address at once, handshakes in progress included.
    pub max_connections_per_peer: usize,
    /// A TLS handshake not done within this is abandoned.
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

/// `maxConnectionsPerPeer` when not set: half of the cap, so that a second peer (the API
/// server, a registry client) always finds room beside one that takes all it may.
pub(crate) fn default_per_peer(max_connections: usize) -> usize {
    (max_connections / 2).max(1)
}

/// What is wrong with a configured `maxConnectionsPerPeer`, if anything.
pub(crate) fn check_per_peer(
    per_peer: Option<usize>,
    max: usize,
    max_field: &str,
) -> Option<String> {
    match per_peer {
        Some(n) if n == 0 || n > max => Some(format!("must be at least 1 and at most {max_field}")),
        _ => None,
    }
}

/// What is wrong with a configured `handshakeTimeout`, if anything.
pub(crate) fn check_handshake_timeout(timeout: Duration) -> Option<String> {
    (timeout.is_zero() || timeout > Duration::from_secs(60))
        .then(|| "must be more than 0s and at most 60s".into())
}

/// The client's IP address, in each request's extensions: per-peer shares of other budgets
/// (the webhook's bytes in flight) are keyed by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Peer(pub IpAddr);

/// What the log says, at most every [`LOG_EVERY`] for each.
#[derive(Clone, Copy, Debug)]
enum Event {
    /// Over the cap with no idle connection to displace.
    Cap,
    /// The peer already has its share.
    Peer,
    /// An idle connection closed to make room.
    DisplacedIdle,
    /// The oldest handshake in progress closed to make room.
    DisplacedHandshake,
}

/// One connection, as the limits see it.
struct Conn {
    /// Accept order: the oldest handshake has the smallest.
    id: u64,
    peer: IpAddr,
    /// Requests in progress.
    in_flight: AtomicUsize,
    /// Since when it has had none.
    since: Mutex<Instant>,
    /// Displaced: its reads fail once it has no request in progress, and it closes.
    closing: AtomicBool,
    /// The task reading it, woken when it is displaced.
    reader: AtomicWaker,
}

impl Conn {
    /// When the connection becomes idle-expired, or `None` while a request is in progress.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.since.lock().unwrap_or_else(|p| p.into_inner()) + idle)
    }

    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.reader.wake();
    }
}

#[derive(Default)]
struct Counts {
    next_id: u64,
    /// Connections per peer, handshakes included; a peer with none has no entry.
    peers: HashMap<IpAddr, usize>,
    handshakes: BTreeMap<u64, Arc<Conn>>,
    established: HashMap<u64, Arc<Conn>>,
}

/// Both acceptors' shared counts.
struct Shared {
    limits: Limits,
    /// Names the server in the log lines.
    server: &'static str,
    counts: Mutex<Counts>,
    last_log: [Mutex<Option<Instant>>; 4],
    /// Connections refused or displaced so far, for the log.
    turned_away: AtomicU64,
}

impl Shared {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection from `ip`, with a handshake slot; `None` if its peer has its share.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Registered> {
        let mut counts = self.counts();
        let open = counts.peers.get(&ip).copied().unwrap_or(0);
        if open >= self.limits.max_connections_per_peer {
            drop(counts);
            self.log(Event::Peer, ip);
            return None;
        }
        let mut displaced = None;
        if counts.handshakes.len() >= self.limits.max_connections {
            if let Some((_, oldest)) = counts.handshakes.pop_first() {
                oldest.close();
                displaced = Some(oldest.peer);
            }
        }
        let id = counts.next_id;
        counts.next_id += 1;
        *counts.peers.entry(ip).or_insert(0) += 1;
        let conn = Arc::new(Conn {
            id,
            peer: ip,
            in_flight: AtomicUsize::new(0),
            since: Mutex::new(Instant::now()),
            closing: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        });
        counts.handshakes.insert(id, conn.clone());
        drop(counts);
        if let Some(peer) = displaced {
            self.log(Event::DisplacedHandshake, peer);
        }
        Some(Registered {
            shared: self.clone(),
            conn,
        })
    }

    /// Moves a connection whose handshake is done under the cap, displacing an idle one if
    /// the cap is reached; `false` if there is none to displace.
    fn establish(&self, conn: &Arc<Conn>) -> bool {
        let mut counts = self.counts();
        if counts.handshakes.remove(&conn.id).is_none() || conn.closing.load(Ordering::Acquire) {
            return false; // displaced during its handshake
        }
        let mut displaced = None;
        if counts.established.len() >= self.limits.max_connections {
            // The longest idle of the peer with the most connections.
            let now = Instant::now();
            let victim = counts
                .established
                .values()
                .filter(|c| c.in_flight.load(Ordering::Acquire) == 0)
                .max_by_key(|c| {
                    let since = *c.since.lock().unwrap_or_else(|p| p.into_inner());
                    (counts.peers.get(&c.peer).copied().unwrap_or(0), now - since)
                })
                .map(|c| c.id);
            let Some(victim) = victim.and_then(|id| counts.established.remove(&id)) else {
                drop(counts);
                self.log(Event::Cap, conn.peer);
                return false;
            };
            victim.close();
            displaced = Some(victim.peer);
        }
        counts.established.insert(conn.id, conn.clone());
        drop(counts);
        if let Some(peer) = displaced {
            self.log(Event::DisplacedIdle, peer);
        }
        true
    }

    fn log(&self, event: Event, peer: IpAddr) {
        let so_far = self.turned_away.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_log[event as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| t.elapsed() < LOG_EVERY) {
            return;
        }
        *last = Some(Instant::now());
        let (server, limits) = (self.server, &self.limits);
        // The peer is the operator's lead to a hostile Pod.
        match event {
            Event::Cap => tracing::warn!(
                server,
                max_connections = limits.max_connections,
                turned_away_so_far = so_far,
                "connection limit reached and no idle connection to close; refusing new connections until some close"
            ),
            Event::Peer => tracing::warn!(
                server,
                %peer,
                max_connections_per_peer = limits.max_connections_per_peer,
                turned_away_so_far = so_far,
                "per-peer connection limit reached; refusing this peer's new connections until some close"
            ),
            Event::DisplacedIdle => tracing::warn!(
                server,
                %peer,
                max_connections = limits.max_connections,
                turned_away_so_far = so_far,
                "connection limit reached; closed an idle connection to make room"
            ),
            Event::DisplacedHandshake => tracing::warn!(
                server,
                %peer,
                max_handshakes = limits.max_connections,
                turned_away_so_far = so_far,
                "too many TLS handshakes in progress; closed the oldest to make room"
            ),
        }
    }
}

/// A connection's place in the counts, given back when dropped.
struct Registered {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut counts = self.shared.counts();
        let Counts {
            handshakes,
            established,
            peers,
            ..
        } = &mut *counts;
        let id = self.conn.id;
        // Displaced connections have left their map already.
        if established.remove(&id).is_none() {
            handshakes.remove(&id);
        }
        if let Some(open) = peers.get_mut(&self.conn.peer) {
            *open -= 1;
            if *open == 0 {
                peers.remove(&self.conn.peer);
            }
        }
    }
}

/// axum-server's inner acceptor, under TLS: refuses a peer over its share and wraps the
/// others, each with a handshake slot.
#[derive(Clone)]
pub(crate) struct Limited {
    shared: Arc<Shared>,
}

impl Limited {
    pub(crate) fn new(server: &'static str, limits: Limits) -> Self {
        Self {
            shared: Arc::new(Shared {
                limits,
                server,
                counts: Mutex::default(),
                last_log: Default::default(),
                turned_away: AtomicU64::default(),
            }),
        }
    }
}

impl<S> Accept<TcpStream, S> for Limited {
    type Stream = Guarded<TcpStream>;
    type Service = InFlight<S>;
    type Future = std::future::Ready<io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let refused = |what| std::future::ready(Err(io::Error::other(what)));
        // A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d: one peer either way.
        let Ok(ip) = stream.peer_addr().map(|a| a.ip().to_canonical()) else {
            return refused("no peer address");
        };
        // Dropping the stream closes it.
        let Some(registered) = self.shared.admit(ip) else {
            return refused("per-peer connection limit reached");
        };
        let _ = stream.set_nodelay(true);
        let idle = self.shared.limits.idle_timeout;
        let conn = registered.conn.clone();
        let stream = Guarded {
            inner: stream,
            conn: conn.clone(),
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            _registered: registered,
        };
        std::future::ready(Ok((
            stream,
            InFlight {
                inner: service,
                conn,
            },
        )))
    }
}

/// axum-server's outer acceptor, over TLS: a connection whose handshake is done takes its
/// place under `maxConnections`, or is closed if there is none to be had.
#[derive(Clone)]
pub(crate) struct Established {
    inner: RustlsAcceptor<Limited>,
    shared: Arc<Shared>,
}

/// rustls's server stream over a [`Guarded`] connection.
type TlsStream<S> = <RustlsAcceptor<Limited> as Accept<TcpStream, S>>::Stream;

impl<S> Accept<TcpStream, S> for Established
where
    S: Send + 'static,
{
    type Stream = TlsStream<S>;
    type Service = InFlight<S>;
    type Future = futures::future::BoxFuture<'static, io::Result<(TlsStream<S>, InFlight<S>)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let handshake = self.inner.accept(stream, service);
        let shared = self.shared.clone();
        Box::pin(async move {
            let (tls, service) = handshake.await?;
            if !shared.establish(&service.conn) {
                return Err(io::Error::other("connection limit reached"));
            }
            Ok((tls, service))
        })
    }
}

/// A connection's stream: holds its place in the counts, and fails its reads once it has been
/// idle too long or was displaced while idle (hyper then closes it; HTTP/1 and HTTP/2 both
/// keep reading while idle).
pub(crate) struct Guarded<T> {
    inner: T,
    conn: Arc<Conn>,
    idle: Duration,
    /// Fires at the earliest the connection can be idle-expired; re-armed lazily.
    timer: Pin<Box<Sleep>>,
    _registered: Registered,
}

impl<T> Guarded<T> {
    fn check_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        self.conn.reader.register(cx.waker());
        if self.conn.closing.load(Ordering::Acquire)
            && self.conn.in_flight.load(Ordering::Acquire) == 0
        {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for another connection",
            ));
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.conn.idle_deadline(self.idle) {
                Some(deadline) if deadline <= now => {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "connection idle for too long",
                    ))
                }
                Some(deadline) => self.timer.as_mut().reset(deadline),
                None => self.timer.as_mut().reset(now + self.idle),
            }
        }
        Ok(())
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.check_idle(cx)?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The connection's service: counts its requests in progress for the idle deadline, and
/// tells each request its [`Peer`].
#[derive(Clone)]
pub(crate) struct InFlight<S> {
    inner: S,
    conn: Arc<Conn>,
}

/// Marks a request in progress until dropped.
struct Busy(Arc<Conn>);

impl Busy {
    fn start(conn: &Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(conn.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        // A connection displaced while busy closes now that it is idle.
        if self.0.closing.load(Ordering::Acquire) {
            self.0.reader.wake();
        }
    }
}

impl<S, B> tower_service::Service<axum::http::Request<B>> for InFlight<S>
where
    S: tower_service::Service<axum::http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: axum::http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(Peer(self.conn.peer));
        let busy = Busy::start(&self.conn);
        let response = self.inner.call(request);
        Box::pin(async move {
            let out = response.await;
            drop(busy);
            out
        })
    }
}

/// Serves `router` over TLS on `listener` with these limits: the handshake within
/// `limits.handshake_timeout`, each request's headers within `read_timeout` (HTTP/1), idle
/// connections closed, the connection caps, and at most [`MAX_STREAMS`] concurrent HTTP/2
/// streams per connection.
#[allow(clippy::too_many_arguments)]
pub(crate) fn serve(
    listener: std::net::TcpListener,
    tls: axum_server::tls_rustls::RustlsConfig,
    server: &'static str,
    limits: Limits,
    read_timeout: Duration,
    timer: impl hyper::rt::Timer + Clone + Send + Sync + 'static,
    handle: axum_server::Handle<std::net::SocketAddr>,
    router: axum::Router,
) -> io::Result<impl std::future::Future<Output = io::Result<()>>> {
    let limited = Limited::new(server, limits);
    let acceptor = Established {
        shared: limited.shared.clone(),
        inner: RustlsAcceptor::new(tls)
            .handshake_timeout(limits.handshake_timeout)
            .acceptor(limited),
    };
    let mut server = axum_server::from_tcp(listener)?
        .acceptor(acceptor)
        .handle(handle);
    let builder = server.http_builder();
    // A client that trickles its headers is cut off.
    builder
        .http1()
        .timer(timer.clone())
        .header_read_timeout(read_timeout);
    builder
        .http2()
        .timer(timer)
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW * (MAX_STREAMS + 1));
    Ok(server.serve(router.into_make_service()))
}

/// Concurrent HTTP/2 streams per connection: the API server needs a handful.
pub(crate) const MAX_STREAMS: u32 = 16;
/// What one HTTP/2 stream may send ahead of being read. The connection's window holds every
/// stream's at once, so a stream that waits for room in the in-flight byte budget (and is not
/// read meanwhile) never starves the streams that are being read: no deadlock on one
/// connection. Per connection that is about 1 MiB buffered unread, as with hyper's default.
pub(crate) const STREAM_WINDOW: u32 = 64 * 1024;

/// A real TLS listener on 127.0.0.1 and raw clients that misbehave as the issue describes: the
/// server must close what they leave open, and refuse connections over the cap.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;

    use super::*;

    struct Server {
        addr: std::net::SocketAddr,
        ca: rustls::pki_types::CertificateDer<'static>,
        _dir: tempfile::TempDir,
        handle: axum_server::Handle<std::net::SocketAddr>,
    }

    async fn start(limits: Limits) -> Server {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("c"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("k"), key.serialize_pem()).unwrap();
        let reloading =
            crate::tls::ReloadingCert::load(&dir.path().join("c"), &dir.path().join("k"));
        let config = crate::tls::server_config(Arc::new(reloading.unwrap())).unwrap();
        let tls = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new()
            .route("/healthz", get(|| async { "ok" }))
            // Busy for longer than the idle timeout: a request in progress is not idleness.
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    "done"
                }),
            )
            // Busy while the tests of displacement connect others.
            .route(
                "/busy",
                get(|| async {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    "done"
                }),
            );
        let handle = axum_server::Handle::new();
        let timer = hyper_util_timer();
        let serving = serve(
            listener,
            tls,
            "test",
            limits,
            Duration::from_millis(300),
            timer,
            handle.clone(),
            router,
        )
        .unwrap();
        tokio::spawn(serving);
        Server {
            addr,
            ca: cert.der().clone(),
            _dir: dir,
            handle,
        }
    }

    fn hyper_util_timer() -> crate::coarse_timer::CoarseTimer {
        crate::coarse_timer::CoarseTimer::start(Duration::from_millis(10))
    }

    const LIMITS: Limits = Limits {
        max_connections: 2,
        max_connections_per_peer: 2,
        handshake_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_millis(300),
    };

    type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    async fn connect(server: &Server, alpn: &[u8]) -> std::io::Result<Tls> {
        connect_from(server, [127, 0, 0, 1], alpn).await
    }

    /// A TCP connection from `from`, another address on the loopback: another peer.
    async fn tcp_from(server: &Server, from: [u8; 4]) -> std::io::Result<tokio::net::TcpStream> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind((std::net::Ipv4Addr::from(from), 0).into())?;
        socket.connect(server.addr).await
    }

    async fn connect_from(server: &Server, from: [u8; 4], alpn: &[u8]) -> std::io::Result<Tls> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server.ca.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = tcp_from(server, from).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await?;
        // A refused connection may complete the client's half of the handshake first (TLS 1.3):
        // its first read is what tells.
        tls.flush().await?;
        Ok(tls)
    }

    /// Reads until the server closes the connection, and returns what it sent. Bounded: a
    /// server that keeps the connection fails the test instead of hanging it.
    async fn until_closed(tls: &mut Tls) -> Vec<u8> {
        let mut seen = Vec::new();
        let read = async {
            let mut buf = [0u8; 4096];
            loop {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("the server closed the connection");
        seen
    }

    async fn get_on(tls: &mut Tls, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tls.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn a_client_that_completes_tls_and_sends_nothing_is_disconnected() {
        let server = start(LIMITS).await;
        let mut tls = connect(&server, b"http/1.1").await.unwrap();
        assert!(until_closed(&mut tls).await.is_empty());
        server.handle.shutdown();
    }

    #[tokio::test]
    async fn a_client_that_never_starts_its_tls_handshake_is_disconnected() {
        let server = start(Limits {
            // Longer than the handshake deadline (300 ms): this is the handshake's doing.
            idle_timeout: Duration::from_secs(60),
            ..LIMITS
        })
        .await;
        let mut tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(20), tcp.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed by the server: {read:?}"
        );
        server.handle.shutdown();
    }

    #[tokio::test]
    async fn an_http2_preface_and_nothing_more_is_disconnected() {
        let server = start(LIMITS).await;
        let mut tls = connect(&server, b"h2").await.unwrap();
        // The client preface and an empty SETTINGS frame, then silence.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        let sent = until_closed(&mut tls).await;
        // The server's own SETTINGS came first: it spoke HTTP/2, then closed.
        assert_eq!(sent.get(3), Some(&4), "{sent:?}");
        server.handle.shutdown();
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_when_idle_but_not_while_busy() {
        let server = start(LIMITS).await;
        let mut tls = connect(&server, b"http/1.1").await.unwrap();
        assert!(get_on(&mut tls, "/healthz").await.ends_with("ok"));
        // Longer than the idle timeout, but a request is in progress.
        assert!(get_on(&mut tls, "/slow").await.ends_with("done"));
        assert!(until_closed(&mut tls).await.is_empty());
        server.handle.shutdown();
    }

    /// Served: a request on it is answered.
    async fn served(tls: &mut Tls) -> bool {
        let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
        let mut buf = vec![0u8; 4096];
        tls.write_all(request).await.is_ok()
            && matches!(tls.read(&mut buf).await, Ok(n) if String::from_utf8_lossy(&buf[..n]).ends_with("ok"))
    }

    /// Closed at once, before, during or right after its handshake.
    async fn refused(server: &Server, from: [u8; 4]) -> bool {
        match connect_from(server, from, b"http/1.1").await {
            Err(_) => true,
            Ok(mut tls) => !served(&mut tls).await,
        }
    }

    #[tokio::test]
    async fn one_peer_gets_its_share_and_another_still_connects() {
        let server = start(Limits {
            max_connections: 4,
            max_connections_per_peer: 2,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        })
        .await;
        let hostile = [127, 0, 0, 2];
        let mut a = connect_from(&server, hostile, b"http/1.1").await.unwrap();
        let mut b = connect_from(&server, hostile, b"http/1.1").await.unwrap();
        assert!(served(&mut a).await && served(&mut b).await);
        assert!(
            refused(&server, hostile).await,
            "a third from the same peer"
        );
        // Sockets that never start TLS count against their peer too.
        let mut raw = tcp_from(&server, hostile).await.unwrap();
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed at once: {read:?}"
        );
        // Another peer still gets in, up to the cap.
        let mut c = connect(&server, b"http/1.1").await.unwrap();
        let mut d = connect(&server, b"http/1.1").await.unwrap();
        assert!(served(&mut c).await && served(&mut d).await);
        // A closed connection gives its peer's place back.
        drop(a);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while refused(&server, hostile).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no room after a close"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server.handle.shutdown();
    }

    #[tokio::test]
    async fn sockets_that_never_start_tls_neither_fill_the_cap_nor_keep_their_slots() {
        let server = start(Limits {
            max_connections: 2,
            max_connections_per_peer: 2,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        })
        .await;
        // Two peers' sockets that never start TLS take both handshake slots...
        let mut raw = [
            tcp_from(&server, [127, 0, 0, 2]).await.unwrap(),
            tcp_from(&server, [127, 0, 0, 3]).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ...until a real client needs one: it displaces the oldest (its handshake deadline,
        // 10 s, is far off)...
        let mut a = connect_from(&server, [127, 0, 0, 4], b"http/1.1")
            .await
            .unwrap();
        assert!(served(&mut a).await);
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), raw[0].read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "closed: {read:?}");
        // ...and every place under the cap goes to connections that complete their handshake.
        let mut b = connect_from(&server, [127, 0, 0, 5], b"http/1.1")
            .await
            .unwrap();
        assert!(served(&mut b).await);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), raw[1].read(&mut buf))
                .await
                .is_err(),
            "the younger one waits for its deadline"
        );
        server.handle.shutdown();
    }

    #[tokio::test]
    async fn at_the_cap_an_idle_connection_makes_room_and_a_busy_one_never_does() {
        let server = start(Limits {
            max_connections: 2,
            max_connections_per_peer: 2,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        })
        .await;
        let hostile = [127, 0, 0, 2];
        let mut idle = connect_from(&server, hostile, b"http/1.1").await.unwrap();
        assert!(served(&mut idle).await);
        let mut busy = connect_from(&server, hostile, b"http/1.1").await.unwrap();
        busy.write_all(b"GET /busy HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The cap is reached: another peer's connection takes the idle one's place...
        let mut other = connect(&server, b"http/1.1").await.unwrap();
        assert!(served(&mut other).await);
        assert!(until_closed(&mut idle).await.is_empty());
        // ...and the request in progress is answered.
        let mut buf = vec![0u8; 1024];
        let n = busy.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("done"));
        server.handle.shutdown();

        // With every connection busy, a newcomer is refused.
        let server = start(Limits {
            max_connections: 1,
            max_connections_per_peer: 1,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        })
        .await;
        let mut busy = connect_from(&server, hostile, b"http/1.1").await.unwrap();
        busy.write_all(b"GET /busy HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(refused(&server, [127, 0, 0, 1]).await);
        let n = busy.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("done"));
        server.handle.shutdown();
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_while_none_is_idle() {
        let server = start(Limits {
            idle_timeout: Duration::from_secs(60),
            // Not the per-peer limit: all of these come from one address.
            max_connections_per_peer: 8,
            ..LIMITS
        })
        .await;
        let mut first = connect(&server, b"http/1.1").await.unwrap();
        let mut second = connect(&server, b"http/1.1").await.unwrap();
        for busy in [&mut first, &mut second] {
            busy.write_all(b"GET /busy HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The third is closed at once, during or right after its handshake.
        assert!(refused(&server, [127, 0, 0, 1]).await);
        let mut buf = vec![0u8; 1024];
        let n = first.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("done"));
        // Once one is idle, there is room again.
        let mut fourth = connect(&server, b"http/1.1").await.unwrap();
        assert!(served(&mut fourth).await);
        server.handle.shutdown();
    }

    #[test]
    fn reaching_the_cap_is_logged_with_the_cap_and_not_for_every_connection() {
        let logs = Arc::new(Mutex::new(Vec::<u8>::new()));
        let writer = {
            let logs = logs.clone();
            move || LogWriter(logs.clone())
        };
        let subscriber = tracing_subscriber::fmt()
            .with_writer(writer)
            .with_ansi(false)
            .finish();
        let peer = IpAddr::from([10, 0, 0, 7]);
        tracing::subscriber::with_default(subscriber, || {
            let limited = Limited::new("webhook", LIMITS);
            for _ in 0..5 {
                limited.shared.log(Event::Cap, peer);
                limited.shared.log(Event::Peer, peer);
            }
        });
        let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains("connection limit reached")
                && lines[0].contains("max_connections=2")
                && lines[0].contains("server=\"webhook\""),
            "{text}"
        );
        // The per-peer refusal names the peer: the operator's lead to a hostile Pod.
        assert!(
            lines[1].contains("per-peer connection limit reached")
                && lines[1].contains("peer=10.0.0.7")
                && lines[1].contains("max_connections_per_peer=2"),
            "{text}"
        );
    }

    struct LogWriter(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for LogWriter {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
}
