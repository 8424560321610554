//! Connection limits for both HTTPS servers (the webhook and the token server): a cap on open
//! connections, a TLS handshake deadline, and an idle deadline before the first request and
//! between requests, on HTTP/1 and HTTP/2 alike. Without them a client that completes TLS (or
//! sends the HTTP/2 preface) and then nothing keeps its connection, and its file descriptor,
//! forever.
//!
//! It sits under TLS, as axum-server's inner acceptor: the connection is counted and timed from
//! the moment it is accepted. "Idle" is "no request in progress", not "no bytes": a client that
//! keeps a connection busy with HTTP/2 PINGs and no stream is idle too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// How often, at most, reaching the connection cap is logged.
const CAP_LOG_EVERY: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// axum-server's inner acceptor: refuses connections over the cap and wraps the others.
#[derive(Clone)]
pub struct Limited {
    permits: Arc<Semaphore>,
    limits: Limits,
    /// Names the server in the log line.
    server: &'static str,
    last_cap_log: Arc<Mutex<Option<Instant>>>,
    refused: Arc<AtomicU64>,
}

impl Limited {
    pub fn new(server: &'static str, limits: Limits) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            server,
            last_cap_log: Arc::default(),
            refused: Arc::default(),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.limits.max_connections - self.permits.available_permits()
    }

    fn log_cap(&self) {
        let refused = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_cap_log.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= CAP_LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                server = self.server,
                max_connections = self.limits.max_connections,
                refused_so_far = refused,
                "connection limit reached; refusing new connections until some close"
            );
        }
    }
}

impl<S> axum_server::accept::Accept<TcpStream, S> for Limited {
    type Stream = Guarded<TcpStream>;
    type Service = InFlight<S>;
    type Future = std::future::Ready<io::Result<(Self::Stream, Self::Service)>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            self.log_cap();
            // Dropping the stream closes it.
            return std::future::ready(Err(io::Error::other("connection limit reached")));
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            since: Mutex::new(Instant::now()),
        });
        let idle = self.limits.idle_timeout;
        let stream = Guarded {
            inner: stream,
            activity: activity.clone(),
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            _permit: permit,
        };
        std::future::ready(Ok((
            stream,
            InFlight {
                inner: service,
                activity,
            },
        )))
    }
}

/// Requests in progress on one connection, and since when it has had none.
struct Activity {
    in_flight: AtomicUsize,
    since: Mutex<Instant>,
}

impl Activity {
    /// When the connection becomes idle-expired, or `None` while a request is in progress.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(*self.since.lock().unwrap_or_else(|p| p.into_inner()) + idle)
    }
}

/// A connection's stream: holds its slot under the cap, and fails its reads once it has been
/// idle too long (hyper then closes it; HTTP/1 and HTTP/2 both keep reading while idle).
pub struct Guarded<T> {
    inner: T,
    activity: Arc<Activity>,
    idle: Duration,
    /// Fires at the earliest the connection can be idle-expired; re-armed lazily.
    timer: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl<T> Guarded<T> {
    fn check_idle(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while self.timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            match self.activity.idle_deadline(self.idle) {
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

/// The connection's service: counts its requests in progress for the idle deadline.
#[derive(Clone)]
pub struct InFlight<S> {
    inner: S,
    activity: Arc<Activity>,
}

/// Marks a request in progress until dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self.0.since.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S, R> tower_service::Service<R> for InFlight<S>
where
    S: tower_service::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let busy = Busy::start(&self.activity);
        let response = self.inner.call(request);
        Box::pin(async move {
            let out = response.await;
            drop(busy);
            out
        })
    }
}

/// Serves `router` over TLS on `listener` with these limits: the handshake and each request's
/// headers within `read_timeout` (HTTP/1), idle connections closed, at most
/// `limits.max_connections` at once, and at most [`MAX_STREAMS`] concurrent HTTP/2 streams per
/// connection.
#[allow(clippy::too_many_arguments)]
pub fn serve(
    listener: std::net::TcpListener,
    tls: axum_server::tls_rustls::RustlsConfig,
    server: &'static str,
    limits: Limits,
    read_timeout: Duration,
    timer: impl hyper::rt::Timer + Clone + Send + Sync + 'static,
    handle: axum_server::Handle<std::net::SocketAddr>,
    router: axum::Router,
) -> io::Result<impl std::future::Future<Output = io::Result<()>>> {
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls)
        .handshake_timeout(read_timeout)
        .acceptor(Limited::new(server, limits));
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
pub const MAX_STREAMS: u32 = 16;
/// What one HTTP/2 stream may send ahead of being read. The connection's window holds every
/// stream's at once, so a stream that waits for room in the in-flight byte budget (and is not
/// read meanwhile) never starves the streams that are being read: no deadlock on one
/// connection. Per connection that is about 1 MiB buffered unread, as with hyper's default.
pub const STREAM_WINDOW: u32 = 64 * 1024;

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

    fn hyper_util_timer() -> crate::admission::coarse_timer::CoarseTimer {
        crate::admission::coarse_timer::CoarseTimer::start(Duration::from_millis(10))
    }

    const LIMITS: Limits = Limits {
        max_connections: 2,
        idle_timeout: Duration::from_millis(300),
    };

    type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    async fn connect(server: &Server, alpn: &[u8]) -> std::io::Result<Tls> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server.ca.clone()).unwrap();
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let tcp = tokio::net::TcpStream::connect(server.addr).await?;
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
            max_connections: 2,
            // Longer than the handshake deadline (300 ms): this is the handshake's doing.
            idle_timeout: Duration::from_secs(60),
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

    #[tokio::test]
    async fn connections_over_the_cap_are_refused_until_one_closes() {
        let server = start(Limits {
            max_connections: 2,
            idle_timeout: Duration::from_secs(60),
        })
        .await;
        let mut first = connect(&server, b"http/1.1").await.unwrap();
        let mut second = connect(&server, b"http/1.1").await.unwrap();
        assert!(get_on(&mut first, "/healthz").await.ends_with("ok"));
        assert!(get_on(&mut second, "/healthz").await.ends_with("ok"));
        // The third is closed at once, before or during its handshake.
        if let Ok(mut third) = connect(&server, b"http/1.1").await {
            assert!(until_closed(&mut third).await.is_empty());
        }
        drop(first);
        // Once the server has seen the close, there is room again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut fourth) = connect(&server, b"http/1.1").await {
                let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
                let mut buf = vec![0u8; 4096];
                if fourth.write_all(request).await.is_ok() {
                    if let Ok(n) = fourth.read(&mut buf).await {
                        if String::from_utf8_lossy(&buf[..n]).ends_with("ok") {
                            break;
                        }
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no room after a close"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
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
        tracing::subscriber::with_default(subscriber, || {
            let limited = Limited::new("webhook", LIMITS);
            for _ in 0..5 {
                limited.log_cap();
            }
        });
        let text = String::from_utf8(logs.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text.matches("connection limit reached").count(),
            1,
            "{text}"
        );
        assert!(
            text.contains("max_connections=2") && text.contains("server=\"webhook\""),
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
