//! Hostile callers against the real control plane: anything that can reach the webhook's port
//! can POST an AdmissionReview, and anyone who may create a Pod sends one through the API
//! server. Each test asserts the answer and, from the API server's audit log, what the service
//! did (or did not) ask of it.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use serde_json::{json, Value};
use support::*;

fn pod_review(namespace: &str, service_account: &str) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "hostile", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": namespace, "operation": "CREATE",
            "object": {"spec": {"serviceAccountName": service_account, "containers": [{"name": "c", "image": "x"}]}}
        }
    })
}

/// The service, run as [`AUDITED_USER`] (bound to cluster-admin: what is shown here is what it
/// asks, not what RBAC lets it), its webhook registered with the API server.
async fn start_audited(id: &str, registry: &str, extra: &str) -> Injector {
    let cp = ControlPlane::get();
    let admin = cp.client().await;
    let client = audited_client(cp).await;
    let certs = Certs::new();
    let yaml = config_yaml(id, &certs, registry, extra);
    let settings = settings(pull_secret_injector::config::Config::from_yaml(&yaml).unwrap());
    let service = pull_secret_injector::Service::start(settings, client)
        .await
        .expect("service starts");
    wait_for("ready", Duration::from_secs(30), || async {
        service.is_ready()
    })
    .await;
    Injector::attach(id, service, certs, admin, yaml).await
}

/// Requests the service made (any stage: a crafted `?watch=true` never completes) whose URI
/// names namespace `ns` in any form.
fn requests_about(cp: &ControlPlane, ns: &str) -> Vec<String> {
    let path = format!("/namespaces/{ns}");
    let text = std::fs::read_to_string(cp.dir.join("audit.log")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["user"]["username"] == AUDITED_USER)
        .filter(|e| e["stage"] != "ResponseComplete" || e["verb"] != "watch")
        .filter_map(|e| e["requestURI"].as_str().map(str::to_string))
        .filter(|u| u.contains(&path))
        .collect()
}

/// The answer's `response`, with its warnings.
async fn review(inj: &Injector, body: &Value) -> Value {
    let (code, text) = post_json(&inj.certs, &inj.url(), body.to_string()).await;
    assert_eq!(code, 200, "{text}");
    serde_json::from_str::<Value>(&text).unwrap()["response"].clone()
}

/// Waits until everything the API server did so far is in its audit log: a marker request
/// (a Secret of another name, which the service ignores) is.
async fn audit_flushed(cp: &ControlPlane, c: &kube::Client, ns: &str, marker: &str) {
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(json!({"metadata": {"name": marker}})).unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    wait_for(
        "the marker in the audit log",
        Duration::from_secs(20),
        || async { !cp.audit(|e| e["objectRef"]["name"] == marker).is_empty() },
    )
    .await;
}

/// Events the service wrote in namespace `ns` (or in one whose name starts like it).
fn events_in(cp: &ControlPlane, ns: &str) -> usize {
    cp.audit(|e| {
        e["objectRef"]["resource"] == "events"
            && e["user"]["username"] == AUDITED_USER
            && e["objectRef"]["namespace"]
                .as_str()
                .is_some_and(|n| n.starts_with(ns))
    })
    .len()
}

fn managed_secrets(metrics: &str) -> String {
    metrics
        .lines()
        .find(|l| l.starts_with("pull_secret_injector_managed_secrets "))
        .unwrap_or_default()
        .to_string()
}

/// Issue 18, points 1 and 2: a namespace name with a query, extra slashes or percent-escapes
/// gets a clear answer and costs nothing: no API request, no mint, no Event, no state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_namespace_names_are_answered_and_cause_no_request() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = start_audited("t-h1", &kubernetes_registry("default", 3600), "").await;
    let c = inj.client.clone();
    let ns = inj.namespace("real", true).await;
    wait_secret(&c, &ns, "the real namespace's Secret", |_| true).await;
    // And the refresher is done with it: its ServiceAccount references the Secret.
    wait_for("default attached", Duration::from_secs(30), || async {
        Api::<ServiceAccount>::namespaced(c.clone(), &ns)
            .get("default")
            .await
            .ok()
            .and_then(|sa| sa.image_pull_secrets)
            .is_some_and(|refs| refs.iter().any(|r| r.name == "pull-secret"))
    })
    .await;
    let own = format!("{}-own", inj.id);
    let metrics_url = inj.url().replace("/mutate", "/metrics");
    let before_metrics = get(&inj.certs, &metrics_url).await.1;
    audit_flushed(cp, &c, &ns, "before-crafted").await;
    let (about_ns, about_own) = (
        requests_about(cp, &ns).len(),
        requests_about(cp, &own).len(),
    );
    let (tokens, writes) = (cp.token_attempts(&ns), cp.secret_writes(&ns));
    let events = events_in(cp, &ns);

    let mut crafted = vec![
        format!("{ns}?watch=true"),
        format!("{ns}?x=1"),
        format!("{own}?x=1"),
        format!("{ns}/"),
        format!("{ns}%2F"),
        format!("{ns}#x"),
        format!("{ns}\n"),
        "..".to_string(),
    ];
    crafted.extend((1..=20).map(|k| format!("{ns}{}", "/".repeat(k))));
    for name in &crafted {
        let answer = review(&inj, &pod_review(name, "default")).await;
        assert_eq!(answer["allowed"], true, "{name:?}: {answer}");
        assert!(
            answer.get("patch").is_none(),
            "{name:?} was patched: {answer}"
        );
        let warning = answer["warnings"][0].as_str().unwrap_or_default();
        assert!(
            warning.contains("is not a valid Kubernetes namespace name"),
            "{name:?}: {answer}"
        );
    }
    // The real namespace is still served at once.
    let answer = review(&inj, &pod_review(&ns, "default")).await;
    assert!(answer.get("patch").is_some(), "{answer}");

    audit_flushed(cp, &c, &ns, "after-crafted").await;
    let asked = requests_about(cp, &ns);
    assert_eq!(
        asked.len(),
        about_ns,
        "requests for crafted names: {:?}",
        &asked[about_ns.min(asked.len())..]
    );
    assert_eq!(requests_about(cp, &own).len(), about_own);
    assert_eq!(cp.token_attempts(&ns), tokens, "no TokenRequest");
    assert_eq!(cp.secret_writes(&ns), writes, "no Secret write");
    assert_eq!(events_in(cp, &ns), events, "Events written");
    let after_metrics = get(&inj.certs, &metrics_url).await.1;
    assert_eq!(
        managed_secrets(&after_metrics),
        managed_secrets(&before_metrics),
        "no crafted name was adopted as a managed Secret"
    );
    inj.cleanup().await;
}

/// Issue 18, point 1 (per ServiceAccount): a ServiceAccount that does not exist gets no
/// TokenRequest and no Event, however many reviews name one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_service_account_an_unknown_service_account_gets_no_token_and_no_event() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = start_audited(
        "t-h2",
        &kubernetes_registry("default", 3600),
        "identityScope: serviceAccount\n",
    )
    .await;
    let c = inj.client.clone();
    let ns = inj.namespace("sa", true).await;
    let real = "default-pull-secret".to_string();
    wait_for(
        "the default ServiceAccount's Secret",
        Duration::from_secs(30),
        || async {
            Api::<k8s_openapi::api::core::v1::Secret>::namespaced(c.clone(), &ns)
                .get_opt(&real)
                .await
                .ok()
                .flatten()
                .is_some()
        },
    )
    .await;
    audit_flushed(cp, &c, &ns, "before-ghosts").await;
    let tokens = cp.token_attempts(&ns);
    let events = events_in(cp, &ns);
    for i in 0..30 {
        let answer = review(&inj, &pod_review(&ns, &format!("ghost-{i}"))).await;
        assert_eq!(answer["allowed"], true, "{answer}");
        assert!(
            answer["warnings"][0].as_str().is_some_and(|w| w
                .contains(&format!("ghost-{i}-pull-secret"))
                && w.contains("not ready")),
            "{answer}"
        );
    }
    audit_flushed(cp, &c, &ns, "after-ghosts").await;
    assert_eq!(
        cp.token_attempts(&ns),
        tokens,
        "no TokenRequest for a ServiceAccount that does not exist"
    );
    assert_eq!(events_in(cp, &ns), events, "Events written");
    let ghost_secrets = cp.audit(|e| {
        e["objectRef"]["resource"] == "secrets"
            && e["objectRef"]["namespace"] == ns.as_str()
            && e["objectRef"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("ghost-"))
    });
    assert!(ghost_secrets.is_empty(), "{ghost_secrets:?}");
    inj.cleanup().await;
}

/// Issue 23, point 9 (per ServiceAccount): a made-up ServiceAccount name costs one lookup,
/// not one per review naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_service_account_a_made_up_name_is_looked_up_once_not_per_review() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = start_audited(
        "t-h9s",
        &kubernetes_registry("default", 3600),
        "identityScope: serviceAccount\n",
    )
    .await;
    let c = inj.client.clone();
    let ns = inj.namespace("sa", true).await;
    let ghosts = ["ghost-a", "ghost-b", "ghost-c"];
    for round in 0..10 {
        for ghost in ghosts {
            let answer = review(&inj, &pod_review(&ns, ghost)).await;
            assert_eq!(answer["allowed"], true, "{answer}");
            assert!(
                answer["warnings"][0]
                    .as_str()
                    .is_some_and(|w| w.contains("not ready")),
                "round {round}: {answer}"
            );
        }
    }
    audit_flushed(cp, &c, &ns, "after-made-up").await;
    let asked = requests_about(cp, &ns);
    for ghost in ghosts {
        let lookups = asked
            .iter()
            .filter(|u| u.contains(&format!("/serviceaccounts/{ghost}")))
            .count();
        assert_eq!(lookups, 1, "lookups of {ghost} for 10 reviews: {asked:?}");
    }
    let ghost_tokens = cp.audit(|e| {
        e["objectRef"]["subresource"] == "token"
            && e["objectRef"]["namespace"] == ns.as_str()
            && e["objectRef"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("ghost-"))
    });
    assert!(ghost_tokens.is_empty(), "{ghost_tokens:?}");
    inj.cleanup().await;
}

/// Issue 23, point 9: a review for a valid namespace name the watch does not show opted in
/// (no such namespace, or one not opted in) is answered from the Namespace watch: no request
/// about it reaches the API server. A namespace opted in is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_the_watch_does_not_show_opted_in_cost_no_request() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = start_audited("t-h9n", &kubernetes_registry("default", 3600), "").await;
    let c = inj.client.clone();
    let real = inj.namespace("real", true).await;
    let plain = inj.namespace("plain", false).await;
    wait_secret(&c, &real, "the opted-in namespace's Secret", |_| true).await;
    audit_flushed(cp, &c, &plain, "before-unknown").await;
    let before = requests_about(cp, &plain).len();
    let mut names: Vec<String> = (0..20).map(|i| format!("t-h9n-nowhere-{i}")).collect();
    names.extend(std::iter::repeat_n(plain.clone(), 5));
    let bodies: Vec<Value> = names.iter().map(|n| pod_review(n, "default")).collect();
    let answers = futures::future::join_all(bodies.iter().map(|b| review(&inj, b))).await;
    for (name, answer) in names.iter().zip(&answers) {
        assert_eq!(answer["allowed"], true, "{name}: {answer}");
        assert!(answer.get("patch").is_none(), "{name} patched: {answer}");
    }
    let answer = review(&inj, &pod_review(&real, "default")).await;
    assert!(answer.get("patch").is_some(), "{answer}");
    audit_flushed(cp, &c, &plain, "after-unknown").await;
    for name in names.iter().filter(|n| **n != plain) {
        let asked = requests_about(cp, name);
        assert!(asked.is_empty(), "requests about {name}: {asked:?}");
    }
    let asked = requests_about(cp, &plain);
    // Besides the two markers' creates.
    let about_reviews: Vec<&String> = asked[before..]
        .iter()
        .filter(|u| !u.contains("/secrets"))
        .collect();
    assert!(
        about_reviews.is_empty(),
        "requests about {plain}: {about_reviews:?}"
    );
    inj.cleanup().await;
}

/// Issue 18, point 3: a Pod with more pull Secrets than the webhook reads is created (201)
/// through the API server, unchanged, with the webhook's warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_with_too_many_pull_secrets_is_created_unchanged_with_a_warning() {
    let _serial = serial();
    let mut inj = Injector::start("t-h3").await;
    let c = inj.client.clone();
    let ns = inj.namespace("big", true).await;
    wait_secret(&c, &ns, "warm", |_| true).await;
    let many: Vec<Value> = (0..5000)
        .map(|i| json!({"name": format!("s{i}")}))
        .collect();
    let created = create_pod(&c, &ns, "many", json!({"imagePullSecrets": many}), false).await;
    let names = pull_secret_names(&created.pod);
    assert_eq!(names.len(), 5000);
    assert!(!names.contains(&"pull-secret".to_string()));
    assert!(
        created
            .warnings
            .iter()
            .any(|w| w.contains("spec.imagePullSecrets has more than 1024 entries")),
        "{:?}",
        created.warnings
    );
    inj.cleanup().await;
}

/// Resumes a stopped API server when dropped, whatever the test did.
struct Frozen(u32);

impl Frozen {
    fn api_server(cp: &ControlPlane) -> Self {
        let pid: u32 = std::fs::read_to_string(cp.dir.join("apiserver.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(std::process::Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap()
            .success());
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

/// Issue 18, point 5: with the API server frozen (it accepts connections and answers
/// nothing), a review for a namespace the watch does not know is still answered: the lookup is
/// inside the admission budget. The answer is unchanged: the namespace was not confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_holds_while_the_api_server_is_frozen() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let inj = Injector::start_with(
        "t-h5",
        &kubernetes_registry("default", 3600),
        "admission: {budget: 1s}\n",
    )
    .await;
    let frozen = Frozen::api_server(cp);
    // The test client gives up after 10 s: an answer after the budget arrives well before.
    let bodies: Vec<Value> = (0..5)
        .map(|i| pod_review(&format!("t-h5-unknown-{i}"), "default"))
        .collect();
    let answers = futures::future::join_all(bodies.iter().map(|b| review(&inj, b))).await;
    drop(frozen);
    for answer in answers {
        assert_eq!(answer["allowed"], true, "{answer}");
        assert!(answer.get("patch").is_none(), "{answer}");
    }
    // The API server is back.
    wait_for(
        "the API server answering",
        Duration::from_secs(30),
        || async {
            Api::<ServiceAccount>::namespaced(inj.client.clone(), "default")
                .get_opt("default")
                .await
                .is_ok()
        },
    )
    .await;
    inj.cleanup().await;
}

fn status_mib(pid: u32, field: &str) -> f64 {
    proc_status(pid, field) / 1024.0
}

/// Issue 18, point 3: memory a burst of large reviews took goes back to the system. The
/// service's own binary (its allocator settings live in `main`), 16 reviews of about 3 MiB at
/// once over 16 connections; once the client has gone, resident memory is back near idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_taken_by_a_burst_of_large_reviews_is_given_back() {
    use std::process::{Command, Stdio};
    let _serial = serial();
    let cp = ControlPlane::get();
    let c = cp.client().await;
    let id = "t-h3m";
    let ns = format!("{id}-big");
    create_namespace(
        &c,
        &ns,
        [
            ("pull-secret-injector.io/inject".into(), "enabled".into()),
            ("e2e-run".into(), id.into()),
        ]
        .into(),
    )
    .await;
    let certs = Certs::new();
    let port = support::registry::free_port("127.0.0.1");
    let yaml = config_yaml(id, &certs, &kubernetes_registry("default", 3600), "")
        .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
    let config = certs.dir.path().join("config.yaml");
    std::fs::write(&config, yaml).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pull-secret-injector"))
        .args(["serve", "--config", path_str(&config)])
        .env("KUBECONFIG", cp.kubeconfig())
        .env("RUST_LOG", "warn")
        .env_remove("MIMALLOC_PURGE_DELAY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let url = format!("https://127.0.0.1:{port}/mutate");
    wait_secret(&c, &ns, "the service's Secret", |_| true).await;
    wait_for("ready", Duration::from_secs(30), || async {
        get(&certs, &url.replace("/mutate", "/readyz")).await.0 == 200
    })
    .await;

    let mut review = pod_review(&ns, "default");
    let env: Vec<Value> = (0..600)
        .map(|i| json!({"name": format!("SETTING_{i:04}"), "value": "v".repeat(93)}))
        .collect();
    review["request"]["object"]["spec"]["containers"] = json!((0..40)
        .map(
            |i| json!({"name": format!("c{i}"), "image": "registry.example.com/app:1", "env": env})
        )
        .collect::<Vec<_>>());
    let body = axum::body::Bytes::from(serde_json::to_vec(&review).unwrap());
    assert!(body.len() > 2 << 20, "a large review: {} bytes", body.len());
    let ca = reqwest::Certificate::from_pem(&std::fs::read(certs.ca()).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .http1_only()
        .build()
        .unwrap();
    let small = serde_json::to_vec(&pod_review(&ns, "default")).unwrap();
    let warm = client.post(&url).header("content-type", "application/json");
    assert_eq!(warm.body(small).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = status_mib(pid, "VmRSS:");
    reset_peak(pid).expect("the peak from here on");

    let calls = (0..16).map(|_| {
        let request = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body.clone());
        async move {
            let r = request.send().await.expect("answered");
            (r.status().as_u16(), r.text().await.unwrap_or_default())
        }
    });
    let answers = futures::future::join_all(calls).await;
    for (status, text) in &answers {
        assert_eq!(*status, 200, "{text}");
        assert!(
            text.contains("\"patch\""),
            "answered with a patch: {text:.300}"
        );
    }
    let during = status_mib(pid, "VmHWM:");
    drop(client);
    let mut left = f64::NAN;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = status_mib(pid, "VmRSS:") - idle;
        if left < 8.0 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(c)
        .delete(&ns, &Default::default())
        .await;
    eprintln!("idle {idle:.1} MiB, right after the burst {:.1} MiB above, {left:.1} MiB above once the client left", during - idle);
    assert!(
        during - idle > 16.0,
        "the burst took memory ({:.1} MiB above idle), else this shows nothing",
        during - idle
    );
    assert!(
        left < 8.0,
        "{left:.1} MiB above idle ({idle:.1} MiB) stays after the burst"
    );
}

/// Issue 23, points 6 and 7, through the API server: while one peer (127.0.0.2) attacks the
/// webhook's byte budget or its connection limits, Pods are created through the real API
/// server, the webhook registered with the shipped `timeoutSeconds`. Every Pod must be created
/// patched (a call that timed out or could not connect admits it unpatched: `failurePolicy:
/// Ignore`) within that timeout; the creation latencies are printed. `idleTimeout: 1s`, so the
/// API server needs a new connection for about every Pod, as it does after any idle close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_patched_in_time_while_one_peer_attacks_the_webhook() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use kube::api::{Patch, PatchParams};
    use support::attack::{measure, shipped_webhook_timeout, tls_client, Attack, Launch, ATTACKER};

    let _serial = serial();
    let timeout = shipped_webhook_timeout();
    let mut inj = Injector::start_with(
        "t-h7",
        &kubernetes_registry("default", 3600),
        "admission: {idleTimeout: 1s}\n",
    )
    .await;
    Api::<MutatingWebhookConfiguration>::all(inj.client.clone())
        .patch(
            "psi-t-h7",
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(json!([
                {"op": "replace", "path": "/webhooks/0/timeoutSeconds", "value": timeout.as_secs()}
            ])).unwrap()),
        )
        .await
        .unwrap();
    let c = inj.client.clone();
    let ns = inj.namespace("attacked", true).await;
    wait_secret(&c, &ns, "warm", |_| true).await;
    // The API server picks up the new timeout asynchronously.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let addr = inj.service.as_ref().expect("running").local_addr;
    let ca = inj.certs.ca_pem.as_bytes().to_vec();
    let count = std::sync::atomic::AtomicUsize::new(0);
    // Pods that list a pull Secret of their own: the API server calls the webhook for them.
    let pods = |during: Duration| {
        measure(during, Duration::from_millis(1500), || {
            let (c, ns) = (c.clone(), ns.clone());
            let name = format!(
                "p{}",
                count.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            async move {
                let pod = create_pod(
                    &c,
                    &ns,
                    &name,
                    json!({"imagePullSecrets": [{"name": "mine"}]}),
                    false,
                )
                .await
                .pod;
                let names = pull_secret_names(&pod);
                match names.iter().any(|n| n == "pull-secret") {
                    true => Ok(()),
                    false => Err(format!("{name} created unpatched: {names:?}")),
                }
            }
        })
    };
    let baseline = pods(Duration::from_secs(3)).await;
    println!(
        "Pods through the API server, no attack: {}",
        baseline.summary()
    );
    // (Idle TLS connections are tests/tls.rs's: with `idleTimeout: 1s` they hold nothing here.)
    let attacks: [(&str, Launch); 2] = [
        (
            "8 requests declaring 4 MiB each, no body, every 5 s",
            Box::new(|| {
                Attack::declared_bodies(
                    addr,
                    tls_client(&ca, b"http/1.1"),
                    8,
                    Duration::from_secs(5),
                    4 << 20,
                    0,
                )
            }),
        ),
        (
            "2000 TCP connections with no TLS from one peer, as fast as it can",
            Box::new(|| Attack::raw_sockets(addr, &[ATTACKER], 2000, 100_000)),
        ),
    ];
    let mut failures = Vec::new();
    for (name, attack) in attacks {
        let running = attack();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let figures = pods(Duration::from_secs(12)).await;
        let attacker = running.stop().await;
        println!(
            "Pods through the API server, {name}: {}\n  {attacker}\n  shipped timeoutSeconds: {timeout:?}",
            figures.summary()
        );
        if !(figures.failed.is_empty() && figures.max() <= timeout) {
            failures.push(name);
        }
    }
    inj.cleanup().await;
    assert!(
        failures.is_empty(),
        "Pods unpatched or late under: {failures:?}"
    );
}
