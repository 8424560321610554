//! Start-up through the real API server: a restarted service adopts the Secrets that exist from
//! its watches, however long their first list takes, with no request per namespace; its lists
//! are streamed from the API server's cache where the server offers that. Shown from the audit
//! log (the service runs as the identity whose every request the audit policy records).

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{json, Value};
use support::*;

const NAMESPACES: usize = 200;

/// Longer than the 30 s that reconciles used to wait for a watch's first list before reading
/// each namespace themselves: as a first list of 100,000 Secrets can take.
const SLOW_LIST: Duration = Duration::from_secs(35);

/// Holds the answer to the first request for each of `paths` (a cluster-wide list, or a watch
/// that starts with one) for `delay`: a slow first list, made here rather than with 100,000
/// objects.
#[derive(Clone)]
struct SlowFirstList<S> {
    inner: S,
    pending: Arc<Mutex<Vec<&'static str>>>,
    delay: Duration,
}

impl<S, B> tower::Service<http::Request<B>> for SlowFirstList<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let slow = {
            let mut pending = self.pending.lock().unwrap();
            let path = request.uri().path().to_string();
            let before = pending.len();
            pending.retain(|p| *p != path);
            pending.len() < before
        };
        let (answer, delay) = (self.inner.call(request), self.delay);
        Box::pin(async move {
            let response = answer.await;
            if slow {
                tokio::time::sleep(delay).await;
            }
            response
        })
    }
}

/// Managed Secrets the service reports.
async fn managed(inj: &Injector) -> f64 {
    inj.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("pull_secret_injector_managed_secrets "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Issue 21, point 5: restarted with 200 Secrets in place whose first list takes 35 s, the
/// service adopts them all when the list arrives, with no GET of a Secret or ServiceAccount
/// and no per-namespace list, and no mint; each kind is listed once, streamed from the cache
/// where the API server offers it (1.34 on), otherwise in pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_adopts_every_secret_from_the_watches_with_no_request_per_namespace() {
    let _turn = serial();
    let cp = ControlPlane::get();
    let admin = cp.client().await;
    let id = "t-su";
    let names: Vec<String> = (0..NAMESPACES).map(|i| format!("{id}-{i:03}")).collect();
    futures::future::join_all(names.iter().map(|name| {
        let labels = BTreeMap::from([
            ("e2e-run".to_string(), id.to_string()),
            (
                "pull-secret-injector.io/inject".to_string(),
                "enabled".to_string(),
            ),
        ]);
        create_namespace(&admin, name, labels)
    }))
    .await;

    // The first run makes the Secrets and attaches them to the `default` ServiceAccounts.
    let mut inj =
        Injector::start_without_webhook(id, &kubernetes_registry("default", 3600), "").await;
    let attached = |sas: &[ServiceAccount]| {
        sas.iter()
            .filter(|sa| {
                sa.metadata
                    .namespace
                    .as_ref()
                    .is_some_and(|n| names.contains(n))
            })
            .filter(|sa| {
                sa.image_pull_secrets
                    .iter()
                    .flatten()
                    .any(|r| r.name == "pull-secret")
            })
            .count()
    };
    wait_for(
        "every Secret written and attached",
        Duration::from_secs(120),
        || async {
            let sas = Api::<ServiceAccount>::all(admin.clone())
                .list(&ListParams::default())
                .await
                .unwrap()
                .items;
            managed(&inj).await >= NAMESPACES as f64 && attached(&sas) == NAMESPACES
        },
    )
    .await;
    inj.stop().await;

    // The restart, as the audited identity, with a first list of Secrets and of
    // ServiceAccounts that takes 35 s.
    let pending = Arc::new(Mutex::new(vec![
        "/api/v1/secrets",
        "/api/v1/serviceaccounts",
    ]));
    let layer = {
        let pending = pending.clone();
        tower::layer::layer_fn(move |inner| SlowFirstList {
            inner,
            pending: pending.clone(),
            delay: SLOW_LIST,
        })
    };
    inj.client = kube::client::ClientBuilder::try_from(audited_config().await)
        .unwrap()
        .with_layer(&layer)
        .build();
    let since = jiff::Timestamp::now();
    let mints_before: usize = names.iter().map(|n| cp.token_attempts(n)).sum();
    let started = Instant::now();
    inj.run().await;
    wait_for(
        "every Secret adopted",
        SLOW_LIST + Duration::from_secs(60),
        || async { managed(&inj).await >= NAMESPACES as f64 },
    )
    .await;
    let adopted = started.elapsed();
    assert!(
        pending.lock().unwrap().is_empty(),
        "both first lists were held back"
    );
    // Everything the API server did so far is in the audit log once this marker is.
    let marker: Secret =
        serde_json::from_value(json!({"metadata": {"name": "audit-marker"}})).unwrap();
    Api::<Secret>::namespaced(admin.clone(), &names[0])
        .create(&PostParams::default(), &marker)
        .await
        .unwrap();
    wait_for(
        "the marker in the audit log",
        Duration::from_secs(20),
        || async {
            !cp.audit(|e| e["objectRef"]["name"] == "audit-marker")
                .is_empty()
        },
    )
    .await;

    // A watch is logged when it starts (its end is minutes away); one entry per request.
    let mut seen = std::collections::HashSet::new();
    let asked: Vec<Value> = std::fs::read_to_string(cp.dir.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["stage"] == "ResponseStarted" || e["stage"] == "ResponseComplete")
        .filter(|e| {
            e["user"]["username"] == AUDITED_USER
                && e["requestReceivedTimestamp"]
                    .as_str()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .is_some_and(|t| t >= since)
                && (e["objectRef"]["resource"] == "secrets"
                    || e["objectRef"]["resource"] == "serviceaccounts")
        })
        .filter(|e| seen.insert(e["auditID"].to_string()))
        .collect();
    let uri = |e: &Value| e["requestURI"].as_str().unwrap_or_default().to_string();
    let per_namespace: Vec<&Value> = asked
        .iter()
        .filter(|e| {
            e["objectRef"]["namespace"]
                .as_str()
                .is_some_and(|n| n.starts_with(id))
        })
        .collect();
    let count = |resource: &str, verb: &str| {
        per_namespace
            .iter()
            .filter(|e| e["objectRef"]["resource"] == resource && e["verb"] == verb)
            .count()
    };
    let whole_cluster: Vec<&Value> = asked
        .iter()
        .filter(|e| e["objectRef"]["namespace"].is_null())
        .collect();
    eprintln!(
        "adopted {NAMESPACES} Secrets {:.1} s after the start ({} s of it the slow first lists); \
         per namespace: {} Secret GETs, {} Secret LISTs, {} ServiceAccount GETs, {} \
         ServiceAccount LISTs; cluster-wide: {:?}",
        adopted.as_secs_f64(),
        SLOW_LIST.as_secs(),
        count("secrets", "get"),
        count("secrets", "list"),
        count("serviceaccounts", "get"),
        count("serviceaccounts", "list"),
        whole_cluster.iter().map(|e| uri(e)).collect::<Vec<_>>()
    );
    assert_eq!(
        per_namespace.iter().map(|e| uri(e)).collect::<Vec<_>>(),
        Vec::<String>::new(),
        "no request per namespace"
    );
    assert!(
        adopted >= SLOW_LIST,
        "adopted only once listed: {adopted:?}"
    );
    assert_eq!(
        names.iter().map(|n| cp.token_attempts(n)).sum::<usize>(),
        mints_before,
        "nothing minted: every Secret was fresh"
    );
    // Each kind listed once, from the cache: a streaming list (a watch that starts with the
    // objects, at resourceVersion 0) where the API server offers one; where it refuses (422:
    // WatchList off, the default on 1.33), pages of 500.
    for resource in ["secrets", "serviceaccounts"] {
        let of_kind: Vec<&&Value> = whole_cluster
            .iter()
            .filter(|e| e["objectRef"]["resource"] == resource)
            .collect();
        let query = |e: &Value| -> Vec<String> {
            uri(e)
                .split(['?', '&'])
                .skip(1)
                .map(str::to_string)
                .collect()
        };
        let streaming = of_kind.iter().find(|e| {
            let q = query(e);
            q.contains(&"sendInitialEvents=true".to_string())
                && q.contains(&"resourceVersion=0".to_string())
        });
        let refused = streaming.is_some_and(|e| e["responseStatus"]["code"] == 422);
        let lists: Vec<String> = of_kind
            .iter()
            .filter(|e| e["verb"] == "list")
            .map(|e| uri(e))
            .collect();
        assert!(
            streaming.is_some(),
            "{resource}: a streaming list was asked"
        );
        if refused {
            assert!(!lists.is_empty(), "{resource}: listed in pages instead");
            for l in &lists {
                assert!(l.contains("limit=500"), "{resource}: paged: {l}");
            }
        } else {
            assert_eq!(
                lists,
                Vec::<String>::new(),
                "{resource}: no list but the stream"
            );
        }
    }
    inj.cleanup().await;
    let nss: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    for name in &names {
        let _ = nss.delete(name, &Default::default()).await;
    }
}
