//! The service's Kubernetes client, kind to the API server: at most `apiServer.qps` requests per
//! second on average with bursts of `apiServer.burst` (a token bucket, as client-go keeps), and
//! answers 429 (API Priority and Fairness: this flow sends too much) sent again after the
//! server's `Retry-After`, with every request of the client held back meanwhile, and counted in
//! `pull_secret_injector_api_throttled_total`.
//!
//! kube's own retry of 429 is turned off: it retries each request on its own, so the others
//! would keep pressing an API server that has said it is overloaded, and no one would know.

use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use kube::client::{Body, ClientBuilder};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tower::buffer::Buffer;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::config::ApiServerConfig;

/// Answers 429 from the API server to this process's clients. One count per process (the
/// client is made before the metrics that report it).
pub(crate) static THROTTLED: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Times a request is sent again after 429, 503 or 504, as client-go does.
const MAX_RETRIES: u32 = 10;
/// The first backoff when the answer gives no `Retry-After`, doubled at each retry up to
/// `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The longest `Retry-After` honoured: a longer one is taken as this (a reconcile waiting
/// longer would hold its namespace for nothing; the next retry asks again).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A Kubernetes client from `config`, limited by `limits`.
pub fn client(
    mut config: kube::Config,
    limits: &ApiServerConfig,
) -> Result<kube::Client, kube::Error> {
    config.default_retry = false;
    let throttle = Throttle::new(limits);
    Ok(ClientBuilder::try_from(config)?
        .with_layer(&throttle)
        .build())
}

/// How long to wait before sending again a request answered `status` for the `retries`-th
/// time, given its `Retry-After` header; `None`: not sent again. 429 (too many requests) and
/// 503/504 (an API server busy or restarting) are; `Retry-After` in seconds is honoured, at
/// least `FIRST_BACKOFF` and at most `MAX_RETRY_AFTER`; without it the backoff doubles, less
/// up to a quarter (`jitter` in [0, 1)) so that requests refused together come back apart.
pub(crate) fn retry_delay(
    status: StatusCode,
    retries: u32,
    retry_after: Option<&str>,
    jitter: f64,
) -> Option<Duration> {
    let retried = matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT
    );
    if !retried || retries >= MAX_RETRIES {
        return None;
    }
    if let Some(seconds) = retry_after.and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(Duration::from_secs(seconds).clamp(FIRST_BACKOFF, MAX_RETRY_AFTER));
    }
    let backoff = FIRST_BACKOFF
        .saturating_mul(2u32.saturating_pow(retries))
        .min(MAX_BACKOFF);
    Some(backoff.mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 4.0))
}

/// A token bucket: `burst` tokens, refilled at `per_second`; a request takes one. Tokens owed
/// are counted (the balance goes below zero), so requests that wait go in the order they came
/// and the rate holds however many wait. A 429 holds every request until its `Retry-After`.
#[derive(Debug)]
pub(crate) struct Bucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
    held_until: Instant,
}

impl Bucket {
    /// Full at `now`.
    pub(crate) fn new(per_second: f64, burst: u32, now: Instant) -> Self {
        Self {
            // Validated above 0; never a division by zero here.
            per_second: per_second.max(1e-3),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            at: now,
            held_until: now,
        }
    }

    /// Takes a token for a request at `now`: how long the request waits before it is sent.
    pub(crate) fn take(&mut self, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= 1.0;
        let owed = Duration::try_from_secs_f64((-self.tokens).max(0.0) / self.per_second)
            .unwrap_or(Duration::MAX);
        owed.max(self.held_until.saturating_duration_since(now))
    }

    /// Takes a token only if one is there at `now`: whether the caller may go now. Nothing is
    /// owed when it may not (for what is dropped rather than delayed).
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }

    /// Adds the tokens earned since the last look, up to `burst`.
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        self.at = self.at.max(now);
    }

    /// Holds every request until `until` (the API server asked to wait).
    pub(crate) fn hold(&mut self, until: Instant) {
        self.held_until = self.held_until.max(until);
    }

    /// How long requests are still held at `now`.
    pub(crate) fn held(&self, now: Instant) -> Duration {
        self.held_until.saturating_duration_since(now)
    }
}

/// The layer that limits a client's requests; one bucket for all of them.
#[derive(Clone)]
struct Throttle {
    bucket: Arc<Mutex<Bucket>>,
}

impl Throttle {
    fn new(limits: &ApiServerConfig) -> Self {
        let bucket = Bucket::new(limits.qps, limits.burst, Instant::now());
        Self {
            bucket: Arc::new(Mutex::new(bucket)),
        }
    }

    async fn wait_turn(&self) {
        let mut wait = self.bucket().take(Instant::now());
        // A 429 while this request waited holds it too.
        while !wait.is_zero() {
            tokio::time::sleep(wait).await;
            wait = self.bucket().held(Instant::now());
        }
    }

    fn bucket(&self) -> std::sync::MutexGuard<'_, Bucket> {
        self.bucket.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn hold(&self, delay: Duration) {
        self.bucket().hold(Instant::now() + delay);
    }
}

impl<S, B> Layer<S> for Throttle
where
    S: Service<Request<Body>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError> + Send + Sync,
    B: Send + 'static,
{
    type Service = Throttled<S::Future>;

    fn layer(&self, inner: S) -> Self::Service {
        Throttled {
            // Cloneable, to send a request again from within its own future.
            inner: Buffer::new(inner, 1024),
            throttle: self.clone(),
        }
    }
}

struct Throttled<F> {
    inner: Buffer<Request<Body>, F>,
    throttle: Throttle,
}

impl<F, B, E> Service<Request<Body>> for Throttled<F>
where
    F: std::future::Future<Output = Result<Response<B>, E>> + Send + 'static,
    E: Into<BoxError> + Send + Sync,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<B>, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is the buffer's, awaited per request below.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let (mut inner, throttle) = (self.inner.clone(), self.throttle.clone());
        Box::pin(async move {
            let mut request = request;
            let mut retries = 0;
            loop {
                let again = copy(&request);
                throttle.wait_turn().await;
                let response = inner.ready().await?.call(request).await?;
                let status = response.status();
                if status == StatusCode::TOO_MANY_REQUESTS {
                    THROTTLED.inc();
                }
                let retry_after = response
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok());
                let delay = retry_delay(status, retries, retry_after, fastrand::f64());
                let (Some(delay), Some(again)) = (delay, again) else {
                    return Ok(response);
                };
                if status == StatusCode::TOO_MANY_REQUESTS {
                    // The API server is overloaded for all of this client's requests.
                    throttle.hold(delay);
                }
                tracing::debug!(
                    status = status.as_u16(),
                    retries,
                    delay_ms = delay.as_millis() as u64,
                    "API server asked to wait; sending the request again"
                );
                tokio::time::sleep(delay).await;
                request = again;
                retries += 1;
            }
        })
    }
}

/// A copy of `request` to send again, unless its body is a stream (read once).
fn copy(request: &Request<Body>) -> Option<Request<Body>> {
    let body = request.body().try_clone()?;
    let mut copy = Request::new(body);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    *copy.extensions_mut() = request.extensions().clone();
    Some(copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_sent_again_and_after_how_long() {
        let ms = Duration::from_millis;
        let s = Duration::from_secs;
        let (too_many, unavailable, timeout) = (
            StatusCode::TOO_MANY_REQUESTS,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::GATEWAY_TIMEOUT,
        );
        // (answer, retries so far, Retry-After, jitter, delay before sending again)
        type Case<'a> = (StatusCode, u32, Option<&'a str>, f64, Option<Duration>);
        let cases: &[Case] = &[
            // The server's Retry-After, in seconds, wins over the backoff.
            (too_many, 0, Some("1"), 0.0, Some(s(1))),
            (too_many, 5, Some("3"), 0.9, Some(s(3))),
            (too_many, 0, Some(" 2 "), 0.0, Some(s(2))),
            // Zero would retry at once, an hour would hold a reconcile for nothing.
            (too_many, 0, Some("0"), 0.0, Some(ms(200))),
            (too_many, 0, Some("3600"), 0.0, Some(s(60))),
            // Not seconds (an HTTP date, garbage): the backoff.
            (
                too_many,
                0,
                Some("Wed, 21 Oct 2026 07:28:00 GMT"),
                0.0,
                Some(ms(200)),
            ),
            (too_many, 0, Some("-1"), 0.0, Some(ms(200))),
            // Doubling from 200 ms up to 10 s, less up to a quarter.
            (too_many, 0, None, 0.0, Some(ms(200))),
            (too_many, 1, None, 0.0, Some(ms(400))),
            (too_many, 3, None, 0.0, Some(ms(1600))),
            (too_many, 6, None, 0.0, Some(s(10))),
            (too_many, 9, None, 0.0, Some(s(10))),
            (too_many, 1, None, 0.999_999, Some(ms(300))),
            (unavailable, 0, None, 0.0, Some(ms(200))),
            (timeout, 2, Some("5"), 0.0, Some(s(5))),
            // Ten retries at most.
            (too_many, 10, Some("1"), 0.0, None),
            (unavailable, 10, None, 0.0, None),
            // Other answers are the caller's.
            (StatusCode::OK, 0, None, 0.0, None),
            (StatusCode::CONFLICT, 0, Some("1"), 0.0, None),
            (StatusCode::INTERNAL_SERVER_ERROR, 0, None, 0.0, None),
            (StatusCode::NOT_FOUND, 0, None, 0.0, None),
        ];
        for (status, retries, header, jitter, expected) in cases {
            let got =
                retry_delay(*status, *retries, *header, *jitter).map(|d| ms(d.as_millis() as u64));
            assert_eq!(
                got, *expected,
                "{status} after {retries} retries, {header:?}"
            );
        }
    }

    #[test]
    fn a_bucket_that_drops_lets_a_burst_through_then_the_rate_and_owes_nothing() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // 5 per second, bursts of 3: (time in ms, let through).
        let mut bucket = Bucket::new(5.0, 3, start);
        let steps: &[(u64, bool)] = &[
            (0, true),
            (0, true),
            (0, true),
            // Spent: dropped, and a thousand dropped owe nothing.
            (0, false),
            (100, false),
            // 200 ms after the burst, one token is back.
            (200, true),
            (250, false),
            (400, true),
            // A long quiet spell refills the burst, never more.
            (60_000, true),
            (60_000, true),
            (60_000, true),
            (60_000, false),
        ];
        for (i, (when, through)) in steps.iter().enumerate() {
            if *when == 200 {
                // A thousand dropped just before do not push the next token back.
                assert!((0..1000).all(|_| !bucket.try_take(at(150))));
            }
            assert_eq!(
                bucket.try_take(at(*when)),
                *through,
                "step {i} at {when} ms"
            );
        }
    }

    #[test]
    fn the_bucket_lets_a_burst_through_then_paces_at_the_rate() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // 10 per second, bursts of 3: (request time in ms, expected wait in ms).
        let mut bucket = Bucket::new(10.0, 3, start);
        let steps: &[(u64, u64)] = &[
            (0, 0),
            (0, 0),
            (0, 0),
            // Empty: each further request waits its turn, 100 ms apart, in order.
            (0, 100),
            (0, 200),
            (50, 250),
            // 350 ms on, the debt is paid and one token is back.
            (400, 0),
            (400, 100),
            // A long quiet spell refills the burst, never more.
            (10_000, 0),
            (10_000, 0),
            (10_000, 0),
            (10_000, 100),
        ];
        for (i, (when, wait)) in steps.iter().enumerate() {
            let got = bucket.take(at(*when)).as_millis() as u64;
            assert!(
                got.abs_diff(*wait) <= 1,
                "request {i} at {when} ms waits {got} ms, expected {wait}"
            );
        }
    }

    /// The API server as a script: `/busy` answers 429 with `Retry-After: 2` the first time,
    /// after 300 ms; everything else 200 at once.
    fn api_server(
        seen: Arc<Mutex<Vec<(String, Duration)>>>,
        start: Instant,
    ) -> impl Service<
        Request<Body>,
        Response = Response<String>,
        Error = BoxError,
        Future = BoxFuture<'static, Result<Response<String>, BoxError>>,
    > + Send
           + 'static {
        tower::service_fn(move |request: Request<Body>| {
            let seen = seen.clone();
            Box::pin(async move {
                let path = request.uri().path().to_string();
                let first = {
                    let mut seen = seen.lock().unwrap();
                    let first = !seen.iter().any(|(p, _)| *p == path);
                    seen.push((path.clone(), start.elapsed()));
                    first
                };
                let response = if path == "/busy" && first {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Response::builder()
                        .status(StatusCode::TOO_MANY_REQUESTS)
                        .header(http::header::RETRY_AFTER, "2")
                        .body(String::new())
                } else {
                    Response::builder().body(path)
                };
                Ok::<_, BoxError>(response.unwrap())
            }) as BoxFuture<'static, Result<Response<String>, BoxError>>
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_is_counted_and_waited_out_by_every_request_then_sent_again() {
        let start = Instant::now();
        let seen = Arc::new(Mutex::new(Vec::new()));
        // Two per second, one at a time: `/other` takes its turn before the 429 comes.
        let limits = ApiServerConfig { qps: 2.0, burst: 1 };
        let mut client = Throttle::new(&limits).layer(api_server(seen.clone(), start));
        let request = |path: &str| Request::get(path).body(Body::empty()).unwrap();
        let throttled = THROTTLED.get();
        let busy = tokio::spawn(client.call(request("/busy")));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let other = tokio::spawn(client.call(request("/other")));
        tokio::time::sleep(Duration::from_millis(400)).await;
        let later = tokio::spawn(client.call(request("/later")));
        let busy = busy.await.unwrap().unwrap();
        let other = other.await.unwrap().unwrap();
        let later = later.await.unwrap().unwrap();
        // The caller sees the answer to the request sent again, not the 429.
        assert_eq!(
            (busy.status(), busy.body().as_str()),
            (StatusCode::OK, "/busy")
        );
        assert_eq!(
            (other.body().as_str(), later.body().as_str()),
            ("/other", "/later")
        );
        assert_eq!(THROTTLED.get() - throttled, 1);
        let seen = seen.lock().unwrap().clone();
        let sent = |path: &str| -> Vec<u128> {
            seen.iter()
                .filter(|(p, _)| p == path)
                .map(|(_, at)| at.as_millis())
                .collect()
        };
        // The 429 came at 0.3 s, asking for 2 s: `/busy` is sent again at 2.3 s, and so are
        // the request that was waiting its turn (due at 0.5 s) and the one made at 0.5 s.
        assert_eq!(sent("/busy"), [0, 2300], "{seen:?}");
        assert_eq!(sent("/other"), [2300], "{seen:?}");
        assert_eq!(sent("/later"), [2300], "{seen:?}");
    }

    #[test]
    fn a_hold_delays_every_request_until_it_ends() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut bucket = Bucket::new(100.0, 10, start);
        bucket.hold(at(2_000));
        // A shorter hold does not cut a longer one short.
        bucket.hold(at(500));
        assert_eq!(bucket.take(at(0)), Duration::from_secs(2));
        assert_eq!(bucket.take(at(1_500)), Duration::from_millis(500));
        assert_eq!(bucket.take(at(2_000)), Duration::ZERO);
    }
}
