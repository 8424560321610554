//! High availability with two real processes against the real API server: both answer
//! admissions, only the Lease holder refreshes, killing it hands the work over within the lease
//! duration, and a graceful stop releases the Lease at once to the waiting replica while the
//! stopping one still answers.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams};
use serde_json::json;
use support::*;

const LEASE_NS: &str = "psi-ha";

struct Replica {
    name: String,
    child: Child,
    log: std::path::PathBuf,
    port: u16,
}

impl Replica {
    fn start(name: &str, certs: &Certs) -> Self {
        Self::start_with(name, certs, &kubernetes_registry("default", 3600), "")
    }

    fn start_with(name: &str, certs: &Certs, registry: &str, extra: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let extra = if extra.contains("leaderElection") {
            extra.to_string()
        } else {
            format!("leaderElection: {{leaseDuration: 4s, renewGrace: 2s}}\n{extra}")
        };
        let yaml = config_yaml("t-ha", certs, registry, &extra)
            .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"))
            .replace(
                "ownNamespace: t-ha-own",
                &format!("ownNamespace: {LEASE_NS}"),
            );
        let config = certs.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&config, yaml).unwrap();
        let log = certs.dir.path().join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_pull-secret-injector"))
            .args(["serve", "--config", path_str(&config)])
            .env("KUBECONFIG", ControlPlane::get().kubeconfig())
            .env("POD_NAME", name)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Replica {
            name: name.to_string(),
            child,
            log,
            port,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get_opt("pull-secret-injector")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// A fresh namespace for the Lease (one left by an earlier test is removed first).
async fn lease_namespace(c: &kube::Client) {
    let _ = Api::<Namespace>::all(c.clone())
        .delete(LEASE_NS, &DeleteParams::default())
        .await;
    wait_for(
        "old lease namespace gone",
        Duration::from_secs(60),
        || async {
            Api::<Namespace>::all(c.clone())
                .get_opt(LEASE_NS)
                .await
                .ok()
                .flatten()
                .is_none()
        },
    )
    .await;
    create_namespace(c, LEASE_NS, Default::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_refresher_and_a_hand_over_when_the_leader_dies() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let c = cp.client().await;
    lease_namespace(&c).await;
    let leases: Api<Lease> = Api::namespaced(c.clone(), LEASE_NS);
    let certs = Certs::new();

    let mut a = Replica::start("replica-a", &certs);
    wait_for(
        "replica-a holds the Lease",
        Duration::from_secs(30),
        || async { holder(&leases).await.as_deref() == Some("replica-a") },
    )
    .await;
    let mut b = Replica::start("replica-b", &certs);

    // The non-leader answers admissions too.
    let selector =
        json!({"matchLabels": {"pull-secret-injector.io/inject": "enabled", "e2e-run": "t-ha"}});
    register_webhook(
        &c,
        "psi-t-ha",
        &format!("https://127.0.0.1:{}/mutate", b.port),
        &certs.ca_pem,
        selector,
        &["pods"],
    )
    .await;
    let ns = "t-ha-team";
    create_namespace(
        &c,
        ns,
        [
            ("pull-secret-injector.io/inject".into(), "enabled".into()),
            ("e2e-run".into(), "t-ha".into()),
        ]
        .into(),
    )
    .await;
    let first = wait_secret(&c, ns, "made by the leader", |_| true).await;
    wait_for("webhook active", Duration::from_secs(30), || async {
        let pod = create_pod(
            &c,
            ns,
            "probe",
            json!({"imagePullSecrets": [{"name": "mine"}]}),
            true,
        )
        .await
        .pod;
        pull_secret_names(&pod) == ["mine", "pull-secret"]
    })
    .await;
    assert!(
        !b.log().contains("became the leader"),
        "replica-b must not lead yet"
    );
    assert!(
        !b.log().contains("wrote pull Secret"),
        "only the leader refreshes:\n{}",
        b.log()
    );

    // Kill the leader as a crash would: no chance to release the Lease.
    a.signal("-KILL");
    let _ = a.child.wait();
    let killed = Instant::now();
    wait_for(
        "replica-b takes the Lease",
        Duration::from_secs(30),
        || async { holder(&leases).await.as_deref() == Some("replica-b") },
    )
    .await;
    let hand_over = killed.elapsed();
    // Lease duration 4 s; replica-b retries on its own schedule, so allow a few seconds more.
    assert!(
        hand_over < Duration::from_secs(10),
        "hand-over took {hand_over:?}"
    );
    eprintln!("hand-over after the leader was killed: {hand_over:?}");

    // The new leader adopts what the old one wrote: no needless mint, and the Secret is now
    // scheduled for renewal here (its expiry is tracked in replica-b's metrics).
    let mints_before_hand_over = cp.token_requests(ns);
    wait_for(
        "replica-b adopts the Secret",
        Duration::from_secs(30),
        || async {
            let (_, metrics) = get(&certs, &format!("https://127.0.0.1:{}/metrics", b.port)).await;
            metrics
                .lines()
                .any(|l| l == "pull_secret_injector_managed_secrets 1")
        },
    )
    .await;
    let (_, metrics) = get(&certs, &format!("https://127.0.0.1:{}/metrics", b.port)).await;
    let left: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pull_secret_injector_earliest_expiry_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(left > 3000.0, "the adopted credential has {left}s left");
    assert_eq!(
        cp.token_requests(ns),
        mints_before_hand_over,
        "the new leader minted again for a fresh Secret"
    );

    // The new leader does the refreshing: a deleted Secret comes back.
    Api::<Secret>::namespaced(c.clone(), ns)
        .delete("pull-secret", &DeleteParams::default())
        .await
        .unwrap();
    wait_secret(&c, ns, "recreated by the new leader", |s| {
        s.metadata.uid != first.metadata.uid
    })
    .await;
    assert!(b.log().contains("wrote pull Secret"), "{}", b.log());

    // A graceful stop releases the Lease at once.
    b.signal("-TERM");
    let status = b.child.wait().unwrap();
    assert!(status.success(), "replica-b exit: {status:?}\n{}", b.log());
    assert_eq!(
        holder(&leases).await,
        None,
        "the Lease is released on shutdown:\n{}",
        b.log()
    );
    drop((a, b));

    let hooks: Api<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration> =
        Api::all(c.clone());
    let _ = hooks.delete("psi-t-ha", &DeleteParams::default()).await;
    for n in [ns, LEASE_NS] {
        let _ = Api::<Namespace>::all(c.clone())
            .delete(n, &DeleteParams::default())
            .await;
    }
}

/// Leaders killed one after another while credentials of 30 s are renewed: the stored credential
/// never expires, and every exchange made is written (no mint thrown away or repeated).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_expires_unrenewed_while_leaders_are_killed() {
    use support::standin::{jwt, now, StandIn};

    const CGR: &str = "cgr.example.test";
    let _serial = serial();
    let cp = ControlPlane::get();
    let c = cp.client().await;
    lease_namespace(&c).await;
    let leases: Api<Lease> = Api::namespaced(c.clone(), LEASE_NS);
    let sts = StandIn::start(|_| (200, json!({"token": jwt(json!({"aud": "cgr.dev", "exp": now() + 30, "n": fastrand::u64(..)}))}).to_string())).await;
    let certs = Certs::new();
    let registry = format!(
        "  - host: {CGR}\n    chainguard: {{identity: \"0123abcd\", issuer: \"{}\"}}\n",
        sts.url
    );
    // Renewed 15 s (plus jitter) before expiry: more than a hand-over takes.
    let extra = format!(
        "http: {{caFile: {}}}\nrefresh: {{renewBefore: 15s}}\n",
        sts.certs.ca().display()
    );
    let start = |name: String| Replica::start_with(&name, &certs, &registry, &extra);

    let mut replicas = vec![start("ha2-0".into()), start("ha2-1".into())];
    wait_for("a leader", Duration::from_secs(30), || async {
        holder(&leases).await.is_some()
    })
    .await;
    let ns = "t-ha-renew";
    create_namespace(
        &c,
        ns,
        [
            ("pull-secret-injector.io/inject".into(), "enabled".into()),
            ("e2e-run".into(), "t-ha".into()),
        ]
        .into(),
    )
    .await;
    let password = |s: &Secret| {
        docker_config(s)["auths"][CGR]["password"]
            .as_str()
            .map(str::to_string)
    };
    wait_secret(&c, ns, "a first credential", |s| password(s).is_some()).await;
    let requests_before = sts.seen().len();
    let writes_before = cp.secret_writes(ns);

    let mut tokens = std::collections::BTreeSet::new();
    let mut least_left = i64::MAX;
    const ROUNDS: usize = 3;
    for round in 0..ROUNDS {
        let sample_until = Instant::now() + Duration::from_secs(18);
        while Instant::now() < sample_until {
            let s = get_secret(&c, ns).await.expect("the Secret stays");
            let p = password(&s).expect("a chainguard credential");
            let left = claims(&p)["exp"].as_i64().unwrap() - now();
            assert!(
                left > 0,
                "round {round}: the stored credential expired {}s ago",
                -left
            );
            least_left = least_left.min(left);
            tokens.insert(p);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Kill the leader as a crash would, and start a replacement replica.
        let leader = holder(&leases).await.expect("a leader");
        let i = replicas
            .iter()
            .position(|r| r.name == leader)
            .expect("the leader is one of ours");
        let mut dead = replicas.remove(i);
        dead.signal("-KILL");
        let _ = dead.child.wait();
        replicas.push(start(format!("ha2-{}", round + 2)));
    }
    let requests = sts.seen().len() - requests_before;
    let writes = cp.secret_writes(ns) - writes_before;
    eprintln!("{ROUNDS} leaders killed over {} distinct credentials: least time left on a stored credential {least_left} s; {requests} exchanges, {writes} Secret writes", tokens.len());
    assert!(
        tokens.len() >= 3,
        "credentials were renewed: {}",
        tokens.len()
    );
    // Each exchange is written once; a leader killed between its exchange and its write may
    // waste one.
    assert!(
        requests <= writes + ROUNDS,
        "{requests} exchanges for {writes} writes"
    );
    drop(replicas);
    let _ = Api::<Namespace>::all(c.clone())
        .delete(ns, &DeleteParams::default())
        .await;
}

/// A graceful stop (what Kubernetes does when it deletes the Pod): the waiting replica takes
/// the Lease at once, long before the old term would have expired, and the stopping replica
/// still answers reviews for its shutdown delay, with `/readyz` failing, then exits cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_hands_the_lease_over_at_once_and_keeps_answering_meanwhile() {
    let _serial = serial();
    let c = ControlPlane::get().client().await;
    lease_namespace(&c).await;
    let leases: Api<Lease> = Api::namespaced(c.clone(), LEASE_NS);
    let certs = Certs::new();
    // A long lease: a take-over by expiry would show as 15 s or more.
    let extra =
        "leaderElection: {leaseDuration: 15s, renewGrace: 5s}\nadmission: {shutdownDelay: 4s}\n";
    let start = |name: &str| {
        Replica::start_with(name, &certs, &kubernetes_registry("default", 3600), extra)
    };
    let mut a = start("drain-a");
    wait_for(
        "drain-a holds the Lease",
        Duration::from_secs(30),
        || async { holder(&leases).await.as_deref() == Some("drain-a") },
    )
    .await;
    let b = start("drain-b");
    let ready = |r: &Replica| format!("https://127.0.0.1:{}/readyz", r.port);
    wait_for("drain-b ready", Duration::from_secs(30), || async {
        get(&certs, &ready(&b)).await.0 == 200
    })
    .await;
    assert_eq!(holder(&leases).await.as_deref(), Some("drain-a"));

    a.signal("-TERM");
    let stopped = Instant::now();
    wait_for(
        "drain-b takes the Lease",
        Duration::from_secs(30),
        || async { holder(&leases).await.as_deref() == Some("drain-b") },
    )
    .await;
    let hand_over = stopped.elapsed();
    eprintln!("hand-over after a graceful stop: {hand_over:?} (lease duration 15 s)");
    assert!(
        hand_over < Duration::from_secs(4),
        "the waiting replica took the Lease only after {hand_over:?}:\n{}\n{}",
        a.log(),
        b.log()
    );

    // Still within drain-a's 4 s delay: it answers a review, and says it is not ready.
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "drain", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "t-ha-unlabelled", "operation": "CREATE",
            "object": {"spec": {"containers": [{"name": "c", "image": "x"}]}}
        }
    });
    let (code, text) = post_json(
        &certs,
        &format!("https://127.0.0.1:{}/mutate", a.port),
        review.to_string(),
    )
    .await;
    assert!(
        a.child.try_wait().unwrap().is_none() && code == 200,
        "a stopping replica answers reviews during its shutdown delay: {code} {text}"
    );
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["response"]["uid"], "drain", "{text}");
    assert_eq!(answer["response"]["allowed"], true, "{text}");
    assert_eq!(
        get(&certs, &ready(&a)).await.0,
        503,
        "a stopping replica is not ready"
    );

    let status = a.child.wait().unwrap();
    let took = stopped.elapsed();
    assert!(status.success(), "drain-a exit: {status:?}\n{}", a.log());
    assert!(
        took >= Duration::from_secs(4),
        "drain-a stopped after {took:?}, before its shutdown delay"
    );
    eprintln!("drain-a exited {took:?} after SIGTERM (shutdown delay 4 s)");
    assert_eq!(holder(&leases).await.as_deref(), Some("drain-b"));
    drop(b);
}
