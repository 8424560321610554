//! Renewal writes each Secret once per credential, through the real API server: in the API
//! server's audit log every Secret write follows a TokenRequest (or exchange) of its own, and
//! nothing is written between renewals. In both identity scopes, and for the Secrets of the
//! pull-secret-updater compatibility.
//!
//! Tokens last 600 s, the API server's minimum; `renewBefore: 8m` puts each renewal 0 to 120 s
//! after minting (a margin of 480 s, spread earlier by up to a quarter of it), so each test
//! sees every Secret renewed within about two minutes.
#![allow(clippy::await_holding_lock)]

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use serde_json::json;
use support::*;

/// Waits until every `(namespace, serviceAccount)` had at least `mints` TokenRequests.
async fn wait_for_mints(cp: &ControlPlane, subjects: &[(String, String)], mints: usize) {
    wait_for(
        &format!("{mints} TokenRequests for each of {subjects:?}"),
        // Each renewal comes 0 to 120 s after the mint before it.
        Duration::from_secs(120 * mints as u64),
        || async {
            subjects
                .iter()
                .all(|(ns, sa)| cp.token_requests_for(ns, sa) >= mints)
        },
    )
    .await;
}

/// Each Secret's writes, per credential minted for it: one each, none before the first (the
/// last mint may not be written yet).
fn assert_written_once_per_mint(counts: &[(String, Vec<usize>)]) {
    eprintln!("writes per mint: {counts:?}");
    for (secret, per_mint) in counts {
        let (last, written) = per_mint.split_last().expect("element 0 is always there");
        assert!(
            per_mint.len() >= 3
                && per_mint[0] == 0
                && written[1..].iter().all(|w| *w == 1)
                && *last <= 1,
            "{secret}: writes before the first mint, then after each mint: {per_mint:?} \
             (expected [0, 1, 1, ..], at least two mints); all: {counts:?}"
        );
    }
}

/// The skipped-write counter: no write is even attempted without a change.
async fn skipped_writes(inj: &Injector) -> f64 {
    inj.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("pull_secret_injector_secret_writes_skipped_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_account_scope_writes_each_secret_once_per_renewal() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = Injector::start_without_webhook(
        "ren-sa",
        &kubernetes_registry("default", 600),
        "identityScope: serviceAccount\nrefresh: {renewBefore: 8m}\n",
    )
    .await;
    let c = inj.client.clone();
    let ns = inj.namespace("accounts", true).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(c.clone(), &ns);
    // Several ServiceAccounts, so that a disagreement between two renewal times shows on some.
    let mut names: Vec<String> = (0..8).map(|i| format!("workload-{i}")).collect();
    for name in &names {
        accounts
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}})).unwrap(),
            )
            .await
            .unwrap();
    }
    names.push("default".into());
    let subjects: Vec<(String, String)> = names.iter().map(|sa| (ns.clone(), sa.clone())).collect();
    wait_for_mints(cp, &subjects, 2).await;

    let counts: Vec<(String, Vec<usize>)> = names
        .iter()
        .map(|sa| {
            let secret = format!("{sa}-pull-secret");
            let per_mint = cp.writes_per_mint(&ns, &secret, sa, &["create", "update", "patch"]);
            (secret, per_mint)
        })
        .collect();
    assert_written_once_per_mint(&counts);
    assert_eq!(skipped_writes(&inj).await, 0.0);
    inj.cleanup().await;
}

/// Issue 21, point 3: each renewal is one TokenRequest and one write over the version the
/// watch saw, with no read of the Secret first. The service runs as an identity whose every
/// request the audit log keeps, reads included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_scope_renews_each_secret_with_one_mint_one_write_and_no_read() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = Injector::start_audited(
        "ren-ns",
        &kubernetes_registry("default", 600),
        "refresh: {renewBefore: 8m}\n",
        false,
    )
    .await;
    let mut namespaces = Vec::new();
    for i in 0..4 {
        namespaces.push(inj.namespace(&format!("team-{i}"), true).await);
    }
    let subjects: Vec<(String, String)> = namespaces
        .iter()
        .map(|ns| (ns.clone(), "default".to_string()))
        .collect();
    wait_for_mints(cp, &subjects, 3).await;

    let counts: Vec<(String, Vec<usize>)> = namespaces
        .iter()
        .map(|ns| {
            let per_mint =
                cp.writes_per_mint(ns, "pull-secret", "default", &["create", "update", "patch"]);
            (format!("{ns}/pull-secret"), per_mint)
        })
        .collect();
    assert_written_once_per_mint(&counts);
    let reads: Vec<(String, usize, usize)> = namespaces
        .iter()
        .map(|ns| {
            let mints = cp.token_requests_for(ns, "default");
            (
                ns.clone(),
                mints,
                cp.secret_gets(ns, "pull-secret", AUDITED_USER),
            )
        })
        .collect();
    eprintln!("(namespace, TokenRequests, GETs of the Secret): {reads:?}");
    assert!(
        reads.iter().all(|(_, _, gets)| *gets == 0),
        "the Secret was read before being written: {reads:?}"
    );
    assert_eq!(skipped_writes(&inj).await, 0.0);
    inj.cleanup().await;
}

/// Issue 21: a namespace opted in before the ServiceAccount its Secret is minted for exists (the
/// controller manager makes `default` a little after the namespace; at 15/s in a burst) waits
/// on the ServiceAccount watch: no TokenRequest answered 404, no failure counted, no backoff;
/// the Secret is written as soon as the ServiceAccount appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_waits_for_its_service_account_without_minting() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj =
        Injector::start_without_webhook("ren-wait", &kubernetes_registry("puller", 600), "").await;
    let c = inj.client.clone();
    let ns = inj.namespace("waits", true).await;
    // Long enough for the refresher to have tried, and retried, were it minting.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        cp.token_attempts(&ns),
        0,
        "TokenRequests for a ServiceAccount that does not exist"
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(c.clone(), &ns);
    assert!(secrets.get_opt("pull-secret").await.unwrap().is_none());
    let metrics = inj.metrics().await;
    let failures: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("pull_secret_injector_renewal_failures_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(failures, 0.0, "waiting is not a failure:\n{metrics}");

    Api::<ServiceAccount>::namespaced(c.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "puller"}})).unwrap(),
        )
        .await
        .unwrap();
    let created = std::time::Instant::now();
    // Woken by the watch, not by a backoff that would by now be tens of seconds long.
    wait_for(
        "the Secret, once its ServiceAccount exists",
        Duration::from_secs(10),
        || async { secrets.get_opt("pull-secret").await.unwrap().is_some() },
    )
    .await;
    eprintln!(
        "Secret written {:?} after its ServiceAccount",
        created.elapsed()
    );
    assert_eq!(
        cp.token_attempts(&ns),
        1,
        "one TokenRequest, after the ServiceAccount"
    );
    inj.cleanup().await;
}

/// The admission of the ServiceAccount a Secret is minted from (the namespace's `default`, made
/// as the namespace is) cannot mint: the account does not exist until it is admitted. It is
/// patched and leaves the Secret to the refresher: no TokenRequest refused 404 at admission (the
/// bench's cold burst found one per new namespace, each holding back the Pods that followed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_of_the_minting_service_account_does_not_mint() {
    let _serial = serial();
    let cp = ControlPlane::get();
    let mut inj = Injector::start_with("ren-sa-adm", &kubernetes_registry("puller", 600), "").await;
    let c = inj.client.clone();
    let ns = inj.namespace("sa-adm", true).await;
    let created = Api::<ServiceAccount>::namespaced(c.clone(), &ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "puller"}})).unwrap(),
        )
        .await
        .unwrap();
    let refs: Vec<&str> = created
        .image_pull_secrets
        .iter()
        .flatten()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(
        refs,
        ["pull-secret"],
        "the ServiceAccount is patched at admission"
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(c.clone(), &ns);
    wait_for("the Secret", Duration::from_secs(10), || async {
        secrets.get_opt("pull-secret").await.unwrap().is_some()
    })
    .await;
    assert_eq!(
        (cp.token_attempts(&ns), cp.token_requests(&ns)),
        (1, 1),
        "one TokenRequest, the refresher's, and none refused"
    );
    inj.cleanup().await;
}

/// The figure of one metric line, summed over its label sets.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Issue 21: with `maxMintsPerSecond` below what the Secrets kept need, the metrics and
/// `status` say so (the need of one Secret of 600 s tokens is about 1/375 per second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ceiling_below_the_need_shows_in_the_metrics_and_status() {
    let _serial = serial();
    let mut inj = Injector::start_without_webhook(
        "ren-cap",
        &kubernetes_registry("default", 600),
        "refresh: {maxMintsPerSecond: 0.002}\n",
    )
    .await;
    let c = inj.client.clone();
    let ns = inj.namespace("short", true).await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(c.clone(), &ns);
    wait_for("the Secret", Duration::from_secs(60), || async {
        secrets.get_opt("pull-secret").await.unwrap().is_some()
    })
    .await;
    let text = inj.metrics().await;
    let needed = metric(&text, "pull_secret_injector_renewals_needed_per_second");
    let ceiling = metric(&text, "pull_secret_injector_renewal_ceiling_per_second");
    eprintln!("needed {needed}/s, ceiling {ceiling}/s");
    assert_eq!(ceiling, 0.002, "{text}");
    // The pace never goes above the ceiling, even below its usual floor of 20/s.
    assert_eq!(
        metric(&text, "pull_secret_injector_mint_rate_per_second"),
        0.002,
        "{text}"
    );
    assert!(
        needed > ceiling && needed < 0.01,
        "one Secret of 600 s tokens needs about 0.0027/s: {needed}"
    );
    let status = inj.status_table();
    assert!(
        status.contains("too low") && status.contains("refresh.maxMintsPerSecond"),
        "{status}"
    );
    inj.cleanup().await;
}

mod pull_secret_updater {
    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::ByteString;
    use kube::api::{Api, PostParams};
    use serde_json::json;

    use super::support::standin::{jwt, now, StandIn};
    use super::support::*;
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn annotated_secrets_are_written_once_per_renewal() {
        let _serial = serial();
        let cp = ControlPlane::get();
        // Renewed ten minutes before `exp`: these tokens are due 5 to 15 s after minting. Each
        // exchange presents a fresh TokenRequest token of the Secret's namespace, so the audit
        // log shows each mint.
        let standin = StandIn::start(|s| {
            let identity = s.query.get("identity").cloned().unwrap_or_default();
            let exp = now() + 605 + fastrand::i64(0..10);
            (200, json!({"token": jwt(json!({"sub": identity, "aud": "cgr.dev", "exp": exp, "n": fastrand::u64(..)}))}).to_string())
        })
        .await;
        let extra = format!(
            "http: {{caFile: {}}}\npullSecretUpdater: {{issuer: \"{}\", serviceAccountToken: {{fromNamespace: {{serviceAccount: default}}}}}}\n",
            standin.certs.ca().display(),
            standin.url
        );
        let mut inj = Injector::start_without_webhook(
            "ren-upd",
            &kubernetes_registry("default", 3600),
            &extra,
        )
        .await;
        let c = inj.client.clone();
        let mut namespaces = Vec::new();
        for i in 0..3 {
            // Not opted in: the annotation is what counts.
            let ns = inj.namespace(&format!("plain-{i}"), false).await;
            wait_for(
                "default ServiceAccount",
                Duration::from_secs(30),
                || async {
                    Api::<ServiceAccount>::namespaced(c.clone(), &ns)
                        .get_opt("default")
                        .await
                        .unwrap()
                        .is_some()
                },
            )
            .await;
            let secret = Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some("cgr".into()),
                    annotations: Some(BTreeMap::from([(
                        "pull-secret-updater.chainguard.dev/identity".to_string(),
                        format!("identity-{i}"),
                    )])),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/dockerconfigjson".into()),
                data: Some(BTreeMap::from([(
                    ".dockerconfigjson".to_string(),
                    ByteString(br#"{"auths":{}}"#.to_vec()),
                )])),
                ..Default::default()
            };
            Api::<Secret>::namespaced(c.clone(), &ns)
                .create(&PostParams::default(), &secret)
                .await
                .unwrap();
            namespaces.push(ns);
        }
        let subjects: Vec<(String, String)> = namespaces
            .iter()
            .map(|ns| (ns.clone(), "default".to_string()))
            .collect();
        wait_for_mints(cp, &subjects, 3).await;

        // The test created each Secret; the updater only replaces it.
        let counts: Vec<(String, Vec<usize>)> = namespaces
            .iter()
            .map(|ns| {
                let per_mint = cp.writes_per_mint(ns, "cgr", "default", &["update", "patch"]);
                (format!("{ns}/cgr"), per_mint)
            })
            .collect();
        assert_written_once_per_mint(&counts);
        assert_eq!(skipped_writes(&inj).await, 0.0);
        inj.cleanup().await;
    }
}
