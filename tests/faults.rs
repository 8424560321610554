//! Faults with the real control plane: the API server dies and comes back, the service is
//! stopped while namespaces change. Nothing is missed afterwards.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams};
use serde_json::json;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_resume_after_the_api_server_restarts() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("pull_secret_injector=debug,kube_runtime=debug")
        .with_test_writer()
        .try_init();
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = Injector::start("t-f1").await;
    let c = inj.client.clone();
    let before = inj.namespace("before", true).await;
    let first = wait_secret(&c, &before, "created", |_| true).await;

    // Killed as a crash would, down for 3 seconds.
    cp.restart_apiserver(3);

    // A namespace opted in right after the restart is handled: the namespace watch resumed.
    let after = inj.namespace("after", true).await;
    wait_secret(&c, &after, "made after the restart", |_| true).await;
    // A deleted Secret comes back: the Secret watch resumed.
    Api::<Secret>::namespaced(c.clone(), &before)
        .delete("pull-secret", &DeleteParams::default())
        .await
        .unwrap();
    wait_secret(&c, &before, "recreated after the restart", |s| {
        s.metadata.uid != first.metadata.uid
    })
    .await;
    // And the API server still reaches the webhook.
    let pod = create_pod(
        &c,
        &after,
        "app",
        json!({"imagePullSecrets": [{"name": "mine"}]}),
        false,
    )
    .await;
    assert_eq!(pull_secret_names(&pod.pod), ["mine", "pull-secret"]);
    assert!(pod.warnings.is_empty(), "{:?}", pod.warnings);
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_the_service_was_down_are_handled_when_it_returns() {
    let _serial = serial();
    let mut inj = Injector::start("t-f2").await;
    let c = inj.client.clone();
    let kept = inj.namespace("kept", true).await;
    let leaving = inj.namespace("leaving", true).await;
    let kept_secret = wait_secret(&c, &kept, "created", |_| true).await;
    wait_secret(&c, &leaving, "created", |_| true).await;

    inj.stop().await;
    let joining = inj.namespace("joining", true).await;
    inj.set_opt_in(&leaving, false).await;
    Api::<Secret>::namespaced(c.clone(), &kept)
        .delete("pull-secret", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(get_secret(&c, &joining).await.is_none());

    inj.run().await;
    wait_secret(
        &c,
        &joining,
        "made for a namespace labelled while the service was down",
        |_| true,
    )
    .await;
    wait_secret(
        &c,
        &kept,
        "recreated after being deleted while the service was down",
        |s| s.metadata.uid != kept_secret.metadata.uid,
    )
    .await;
    wait_for(
        "cleanup of a namespace that opted out while the service was down",
        Duration::from_secs(30),
        || async { get_secret(&c, &leaving).await.is_none() },
    )
    .await;
    inj.cleanup().await;
}

/// Waits until the Secret is intact and then not rewritten for three seconds.
async fn settle(c: &kube::Client, ns: &str, what: &str) -> Secret {
    use pull_secret_injector::secret::layout::{assess, Assessment};
    let first = wait_secret(c, ns, what, |s| {
        matches!(assess(Some(s)), Assessment::Intact(_))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = get_secret(c, ns).await.expect("still there");
    assert_eq!(
        later.metadata.resource_version, first.metadata.resource_version,
        "{what}: the Secret keeps changing"
    );
    later
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_writers_settle_without_lost_updates_or_flapping() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = Injector::start("t-f3").await;
    let c = inj.client.clone();
    // A second replica with the same configuration and no leader election: both refresh, as
    // two replicas would during a split brain.
    let config = pull_secret_injector::config::Config::from_yaml(&inj.config_yaml).unwrap();
    let second = pull_secret_injector::Service::start(settings(config), c.clone())
        .await
        .unwrap();
    let ns = inj.namespace("shared", true).await;
    let api: Api<Secret> = Api::namespaced(c.clone(), &ns);
    let settled = settle(&c, &ns, "two writers settle").await;
    assert!(
        cp.secret_writes(&ns) <= 2,
        "writes: {}",
        cp.secret_writes(&ns)
    );
    assert_eq!(
        claims(&password(&settled))["sub"],
        format!("system:serviceaccount:{ns}:default")
    );

    // A user overwrites the data three times in a row; each time it is restored, then it stays.
    for _ in 0..3 {
        let mut edited = api.get("pull-secret").await.unwrap();
        edited.data.as_mut().unwrap().insert(
            ".dockerconfigjson".into(),
            k8s_openapi::ByteString(br#"{"auths":{"evil.example.com":{}}}"#.to_vec()),
        );
        let _ = api
            .replace("pull-secret", &kube::api::PostParams::default(), &edited)
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let restored = settle(&c, &ns, "restored after the user's edits").await;
    assert!(docker_config(&restored)["auths"]
        .get("evil.example.com")
        .is_none());
    second.shutdown().await;
    inj.cleanup().await;
}

/// The token endpoint (a Chainguard STS stand-in) is refused, answers 500s, hangs and answers
/// garbage, one after another, for longer than a credential's lifetime. Admissions keep being
/// answered, stored credentials are not replaced by nothing, retries back off, and after
/// recovery every Secret is fresh again; the time that took is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_outage_longer_than_a_credential_lifetime() {
    use std::time::Instant;

    use support::standin::{jwt, now, Fault, StandIn};

    const CGR: &str = "cgr.example.test";
    const LIFETIME: i64 = 30;
    let _serial = serial();
    let sts = StandIn::start(|s| {
        let ns = s.bearer().map(|b| claims(b)["kubernetes.io"]["namespace"].as_str().unwrap_or("").to_string()).unwrap_or_default();
        (200, json!({"token": jwt(json!({"aud": "cgr.dev", "exp": now() + LIFETIME, "ns": ns, "n": fastrand::u64(..)}))}).to_string())
    })
    .await;
    let registry = format!(
        "  - host: {CGR}\n    chainguard: {{identity: \"0123abcd\", issuer: \"{}\"}}\n",
        sts.url
    );
    let extra = format!(
        "http: {{timeout: 1s, retries: 1, caFile: {}}}\nadmission: {{budget: 2s}}\n",
        sts.certs.ca().display()
    );
    let mut inj = Injector::start_with("t-f4", &registry, &extra).await;
    let c = inj.client.clone();
    let mut namespaces = Vec::new();
    for n in 0..3 {
        namespaces.push(inj.namespace(&format!("ns{n}"), true).await);
    }
    let cgr = |s: &Secret| {
        docker_config(s)["auths"][CGR]["password"]
            .as_str()
            .map(str::to_string)
    };
    let mut last_good = Vec::new();
    for ns in &namespaces {
        let s = wait_secret(&c, ns, "a first credential", |s| cgr(s).is_some()).await;
        last_good.push(cgr(&s).unwrap());
    }

    // Outage: 4 phases of 10 s, longer than the 30 s lifetime together.
    let outage_started = Instant::now();
    let attempts_before = sts.seen().len();
    let phases: [(&str, Option<Fault>); 4] = [
        ("refused", None),
        (
            "500s",
            Some(Fault::Status {
                status: 500,
                body: "internal error".into(),
                retry_after: None,
            }),
        ),
        ("hanging", Some(Fault::Hang)),
        (
            "garbage",
            Some(Fault::Status {
                status: 200,
                body: "<html>not json".into(),
                retry_after: None,
            }),
        ),
    ];
    let late = inj.namespace("late", true).await; // opted in during the outage
    let mut admissions = Vec::new();
    for (i, (name, fault)) in phases.into_iter().enumerate() {
        match fault {
            None => sts.stop(),
            Some(f) => {
                if i == 1 {
                    sts.restart().await;
                }
                sts.outage(f);
            }
        }
        let phase_started = Instant::now();
        while phase_started.elapsed() < Duration::from_secs(10) {
            // Admissions are answered, with the patch: had the webhook not answered within the
            // API server's timeout, `failurePolicy: Ignore` would admit the Pod unpatched.
            for ns in [&namespaces[0], &late] {
                let started = Instant::now();
                // A Secret of its own, so that the webhook sees the Pod (matchConditions).
                let own = json!({"imagePullSecrets": [{"name": "mine"}]});
                let pod = create_pod(&c, ns, &format!("p{}", fastrand::u32(..)), own, false).await;
                admissions.push(started.elapsed());
                assert!(
                    pull_secret_names(&pod.pod).contains(&"pull-secret".to_string()),
                    "{name}: {:?}",
                    pod.warnings
                );
            }
            // Nothing replaces a stored credential while the endpoint is down.
            for (ns, good) in namespaces.iter().zip(&last_good) {
                let s = get_secret(&c, ns).await.expect("the Secret stays");
                assert_eq!(
                    cgr(&s).as_ref(),
                    Some(good),
                    "{name}: {ns} lost its last good credential"
                );
            }
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    }
    let outage = outage_started.elapsed();
    let during: Vec<_> = sts.seen().into_iter().skip(attempts_before).collect();
    let attempts = during.len();
    // Requests that reached the stand-in, per namespace (from the presented token's claims).
    let per_namespace = |ns: &str| {
        during
            .iter()
            .filter(|s| {
                s.bearer()
                    .is_some_and(|b| claims(b)["kubernetes.io"]["namespace"] == ns)
            })
            .count()
    };
    let slowest = admissions.iter().max().copied().unwrap_or_default();

    // Recovery.
    sts.recover();
    let recovered = Instant::now();
    for ns in namespaces.iter().chain([&late]) {
        wait_for(
            &format!("{ns} fresh after recovery"),
            Duration::from_secs(120),
            || async {
                get_secret(&c, ns)
                    .await
                    .and_then(|s| cgr(&s))
                    .is_some_and(|p| claims(&p)["exp"].as_i64().unwrap_or(0) > now())
            },
        )
        .await;
    }
    let recovery = recovered.elapsed();
    println!(
        "token endpoint outage of {:.0} s: {} requests reached the endpoint ({} and {} from the refresher alone for two idle namespaces), {} admissions, slowest {:.2} s, all Secrets fresh {:.1} s after recovery",
        outage.as_secs_f64(),
        attempts,
        per_namespace(&namespaces[1]),
        per_namespace(&namespaces[2]),
        admissions.len(),
        slowest.as_secs_f64(),
        recovery.as_secs_f64()
    );
    // Idle namespaces are retried by the refresher alone: with backoff (1, 2, 4, 8, 16 s, with
    // jitter) that is a handful of attempts (each at most 2 requests) in 40 s, not a tight loop;
    // and it does keep trying.
    for ns in &namespaces[1..] {
        let n = per_namespace(ns);
        assert!(
            (2..=16).contains(&n),
            "{ns}: {n} requests during the outage"
        );
    }
    inj.cleanup().await;
}

/// Without a refresher here (another replica holds the Lease), admissions alone provision a new
/// namespace, even when the first attempt fails because its ServiceAccount does not exist yet:
/// a quick failure is not held against the next admission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admissions_alone_provision_a_new_namespace_after_a_quick_failure() {
    use k8s_openapi::api::coordination::v1::Lease;
    use kube::api::PostParams;

    let _serial = serial();
    let cp = ControlPlane::get();
    let admin = cp.client().await;
    let lease_ns = "t-f5-lease";
    create_namespace(&admin, lease_ns, Default::default()).await;
    let now = jiff::Timestamp::now().to_string();
    let lease: Lease = serde_json::from_value(json!({"metadata": {"name": "held"}, "spec": {"holderIdentity": "another-replica", "leaseDurationSeconds": 3600, "renewTime": now, "acquireTime": now}})).unwrap();
    Api::<Lease>::namespaced(admin.clone(), lease_ns)
        .create(&PostParams::default(), &lease)
        .await
        .unwrap();
    let extra = format!("leaderElection: {{leaseName: held, namespace: {lease_ns}, leaseDuration: 15s, renewGrace: 5s}}");
    let mut inj = Injector::start_with("t-f5", &kubernetes_registry("default", 3600), &extra).await;
    let ns = inj.namespace("cold", true).await;
    // Pods right away: the first admission may come before the namespace's `default`
    // ServiceAccount exists, and its TokenRequest fails. (Each Pod lists a Secret of its own:
    // one with none would inherit `pull-secret` from `default`, and the shipped
    // matchConditions spare the service the call for a Pod that lists it.)
    for i in 0..10 {
        let spec = json!({"imagePullSecrets": [{"name": "mine"}]});
        create_pod(&admin, &ns, &format!("p{i}"), spec, false).await;
        if get_secret(&admin, &ns).await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        get_secret(&admin, &ns).await.is_some(),
        "admissions made the Secret ({} TokenRequest attempts)",
        cp.token_attempts(&ns)
    );
    assert_eq!(cp.token_requests(&ns), 1, "one successful mint");
    inj.cleanup().await;
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(admin)
        .delete(lease_ns, &Default::default())
        .await;
}

/// Issue 21, point 1: an API server that answers 429 (API Priority and Fairness) is waited
/// out, not pressed. The service's identity is put in a priority level of its own with no
/// seat and no queue for its first seconds, so that every request it makes is refused: it
/// starts once the level is gone, makes every Secret, counts the 429s, and after each one no
/// request of the service reaches the API server before the `Retry-After` given (at least 1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_429_are_counted_and_waited_out_by_every_request() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let admin = cp.client().await;
    let starved = [
        json!({
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "PriorityLevelConfiguration",
            "metadata": {"name": "psi-starved"},
            "spec": {"type": "Limited", "limited": {
                "nominalConcurrencyShares": 0, "lendablePercent": 0, "borrowingLimitPercent": 0,
                "limitResponse": {"type": "Reject"}}}
        }),
        json!({
            "apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
            "metadata": {"name": "psi-starved"},
            "spec": {
                "priorityLevelConfiguration": {"name": "psi-starved"},
                "matchingPrecedence": 100,
                "distinguisherMethod": {"type": "ByUser"},
                "rules": [{
                    "subjects": [{"kind": "ServiceAccount", "serviceAccount": {"namespace": AUDITED_NS, "name": "injector"}}],
                    "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"], "clusterScope": true, "namespaces": ["*"]}],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]
                }]
            }
        }),
    ];
    // The identity first (its namespace and binding), then its priority level.
    drop(audited_client().await);
    apply_untyped(&admin, &starved).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Namespaces opted in already: the service's start has twenty Secrets to make at once.
    let mut namespaces = Vec::new();
    for i in 0..20 {
        let name = format!("t-429-n{i}");
        let labels = [
            ("pull-secret-injector.io/inject", "enabled"),
            ("e2e-run", "t-429"),
        ];
        let labels = labels.map(|(k, v)| (k.to_string(), v.to_string())).into();
        create_namespace(&admin, &name, labels).await;
        namespaces.push(name);
    }
    let relief = {
        let (admin, starved) = (admin.clone(), starved.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(8)).await;
            delete_untyped(&admin, &starved).await;
        })
    };
    let inj =
        Injector::start_audited("t-429", &kubernetes_registry("default", 3600), "", false).await;
    wait_for(
        "every Secret, through the 429s",
        Duration::from_secs(240),
        || async {
            for ns in &namespaces {
                if get_secret(&admin, ns).await.is_none() {
                    return false;
                }
            }
            true
        },
    )
    .await;
    let metrics = inj.metrics().await;
    relief.await.unwrap();

    let mine = cp.audit(|e| e["user"]["username"] == AUDITED_USER);
    let at = |e: &serde_json::Value, field: &str| -> jiff::Timestamp {
        e[field].as_str().and_then(|t| t.parse().ok()).unwrap()
    };
    let refused: Vec<jiff::Timestamp> = mine
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 429)
        .map(|e| at(e, "stageTimestamp"))
        .collect();
    let counted: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("pull_secret_injector_api_throttled_total "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    eprintln!(
        "429s: {} in the audit log, {counted} counted",
        refused.len()
    );
    assert!(!refused.is_empty(), "no 429: the test shows nothing");
    assert!(counted >= 1.0, "{metrics}");
    // Requests sent at the moment a 429 came may still arrive just after it.
    let pressed: Vec<(String, i64)> = refused
        .iter()
        .flat_map(|t| {
            mine.iter().filter_map(move |e| {
                let ms = at(e, "requestReceivedTimestamp")
                    .duration_since(*t)
                    .as_millis() as i64;
                (100..900)
                    .contains(&ms)
                    .then(|| (e["requestURI"].as_str().unwrap_or_default().to_string(), ms))
            })
        })
        .collect();
    assert!(
        pressed.is_empty(),
        "requests sent within a second after a 429 (URI, ms after it): {pressed:?}"
    );
    inj.cleanup().await;
    let all: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    for ns in &namespaces {
        let _ = all.delete(ns, &DeleteParams::default()).await;
    }
}
