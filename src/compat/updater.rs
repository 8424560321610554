//! Compatibility with chainguard's pull-secret-updater: a Secret that users created and
//! annotated `pull-secret-updater.chainguard.dev/identity: <UID>`, in any namespace, is kept
//! filled with a cgr.dev token for that identity and renewed ten minutes before it expires, so
//! manifests written for pull-secret-updater work unchanged.
//!
//! The decision (mint now, or when) is [`next_step`], free of I/O; the controller around it
//! watches Secret metadata only (annotations are not selectable server-side, and Secret data
//! must not sit in memory), reads the one Secret it acts on, and replaces it at the version read.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use k8s_openapi::ByteString;
use kube::api::{Api, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

use crate::cluster::{Events, KubeError};
use crate::config::updater::UpdaterConfig;
use crate::core::jwt;
use crate::http::HttpClient;
use crate::metrics::Metrics;
use crate::secret::layout::{self, DOCKER_CONFIG_KEY, DOCKER_CONFIG_TYPE};
use crate::secret::renewal;
use crate::sources::MintContext;

pub(crate) const IDENTITY_ANNOTATION: &str = "pull-secret-updater.chainguard.dev/identity";
/// The identity the stored token was minted for: a changed annotation means a new token.
pub(crate) const MINTED_FOR_ANNOTATION: &str = "pull-secret-injector.io/minted-for-identity";
const USERNAME: &str = "_token";

/// What the stored token is, as far as renewal needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Stored {
    pub minted_for: Option<String>,
    pub expires_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Mint,
    WaitUntil(Timestamp),
}

/// Mint when there is no readable token, it was minted for another identity, or less than
/// `renew_before` of it remains; otherwise wait until then.
pub(crate) fn next_step(
    stored: &Stored,
    identity: &str,
    renew_before: Duration,
    now: Timestamp,
) -> Step {
    let (Some(minted_for), Some(expires_at)) = (&stored.minted_for, stored.expires_at) else {
        return Step::Mint;
    };
    if minted_for != identity {
        return Step::Mint;
    }
    let due = due(expires_at, renew_before);
    if now >= due {
        Step::Mint
    } else {
        Step::WaitUntil(due)
    }
}

/// When a token expiring at `expires_at` is renewed: the one rule for both the check before a
/// mint and the wait after a write, so the two never disagree about a Secret.
fn due(expires_at: Timestamp, renew_before: Duration) -> Timestamp {
    expires_at - jiff::SignedDuration::try_from(renew_before).unwrap_or(jiff::SignedDuration::ZERO)
}

/// The stored token of `registry` in a `.dockerconfigjson`, with its expiry read from the JWT.
pub(crate) fn stored(secret: &Secret, registry: &str) -> Stored {
    let minted_for = secret.annotations().get(MINTED_FOR_ANNOTATION).cloned();
    let expires_at = docker_config(secret)
        .and_then(|doc| {
            doc["auths"][registry]["password"]
                .as_str()
                .map(str::to_string)
        })
        .and_then(|token| jwt::expiry(&token).ok());
    Stored {
        minted_for,
        expires_at,
    }
}

fn docker_config(secret: &Secret) -> Option<Value> {
    let data = secret.data.as_ref()?.get(DOCKER_CONFIG_KEY)?;
    serde_json::from_slice::<Value>(&data.0)
        .ok()
        .filter(Value::is_object)
}

/// The Secret's `.dockerconfigjson` with `registry`'s entry set; other registries' entries stay.
pub(crate) fn with_token(secret: &Secret, registry: &str, token: &str) -> Vec<u8> {
    use base64::Engine;
    let mut doc = docker_config(secret).unwrap_or_else(|| json!({}));
    if !doc["auths"].is_object() {
        doc["auths"] = json!({});
    }
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{USERNAME}:{token}"));
    doc["auths"][registry] = json!({"username": USERNAME, "password": token, "auth": auth});
    serde_json::to_vec(&doc).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UpdateError {
    #[error("minting for identity {identity} failed: {message}")]
    Mint { identity: String, message: String },
    #[error("{action} Secret failed: {source}")]
    Api {
        action: &'static str,
        #[source]
        source: KubeError,
    },
}

struct Context {
    client: Client,
    http: HttpClient,
    config: UpdaterConfig,
    events: Events,
    metrics: Arc<Metrics>,
}

pub(crate) struct Updater {
    /// One controller over every namespace, or one per configured namespace (a watch of
    /// Secrets in one namespace needs rights in that namespace only).
    controllers: Vec<Controller<PartialObjectMeta<Secret>>>,
    context: Arc<Context>,
}

impl Updater {
    pub(crate) fn new(
        client: Client,
        http: HttpClient,
        config: UpdaterConfig,
        events: Events,
        metrics: Arc<Metrics>,
    ) -> Self {
        let apis: Vec<Api<PartialObjectMeta<Secret>>> = if config.namespaces.is_empty() {
            vec![Api::all(client.clone())]
        } else {
            config
                .namespaces
                .iter()
                .map(|ns| Api::namespaced(client.clone(), ns))
                .collect()
        };
        let controllers = apis.into_iter().map(annotated_secrets).collect();
        let context = Arc::new(Context {
            events,
            client,
            http,
            config,
            metrics,
        });
        Self {
            controllers,
            context,
        }
    }

    pub(crate) async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
    ) {
        use futures::FutureExt;
        tracing::info!(
            namespaces = ?self.context.config.namespaces,
            "pull-secret-updater compatibility: keeping annotated Secrets filled"
        );
        let shutdown = shutdown.shared();
        let context = self.context;
        futures::future::join_all(self.controllers.into_iter().map(|controller| {
            controller
                .graceful_shutdown_on(shutdown.clone())
                .run(reconcile, error_policy, context.clone())
                .for_each(|result| async move {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "pull-secret-updater reconcile did not complete");
                    }
                })
        }))
        .await;
    }
}

/// A controller over the Secrets `api` lists that carry the identity annotation, from a watch
/// of their metadata.
fn annotated_secrets(api: Api<PartialObjectMeta<Secret>>) -> Controller<PartialObjectMeta<Secret>> {
    let (store, writer) = reflector::store();
    let secrets = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(|m: &mut PartialObjectMeta<Secret>| {
            // Only the annotations that matter are kept: with every Secret of the cluster
            // watched, the rest would be most of the memory.
            m.metadata.managed_fields = None;
            let kept = m.metadata.annotations.take().map(|mut a| {
                let mut keep = std::collections::BTreeMap::new();
                for k in [IDENTITY_ANNOTATION, MINTED_FOR_ANNOTATION] {
                    if let Some(v) = a.remove(k) {
                        keep.insert(k.to_string(), v);
                    }
                }
                keep
            });
            m.metadata.annotations = kept.filter(|a| !a.is_empty());
        }),
    )
    .backoff(crate::cluster::WatchBackoff::default())
    .applied_objects()
    .try_filter(|m| futures::future::ready(m.annotations().contains_key(IDENTITY_ANNOTATION)));
    Controller::for_stream(secrets, store)
}

async fn reconcile(
    meta: Arc<PartialObjectMeta<Secret>>,
    ctx: Arc<Context>,
) -> Result<Action, UpdateError> {
    let (Some(namespace), name) = (meta.namespace(), meta.name_any()) else {
        return Ok(Action::await_change());
    };
    let Some(identity) = meta.annotations().get(IDENTITY_ANNOTATION).cloned() else {
        return Ok(Action::await_change());
    };
    if !ctx.config.covers(&namespace) {
        return Ok(Action::await_change());
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let api_error = |action, e: kube::Error| UpdateError::Api {
        action,
        source: e.into(),
    };
    let Some(secret) = api
        .get_opt(&name)
        .await
        .map_err(|e| api_error("reading", e))?
    else {
        return Ok(Action::await_change());
    };
    if secret.type_.as_deref() != Some(DOCKER_CONFIG_TYPE) {
        let note = format!("the Secret is annotated {IDENTITY_ANNOTATION} but its type is not {DOCKER_CONFIG_TYPE}; it is not filled");
        report(&ctx, &secret, "NotDockerConfig", &note).await;
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();
    if let Step::WaitUntil(at) = next_step(
        &stored(&secret, &ctx.config.registry),
        &identity,
        ctx.config.renew_before,
        now,
    ) {
        return Ok(Action::requeue(
            renewal::until(at, now).max(Duration::from_secs(1)),
        ));
    }
    let started = std::time::Instant::now();
    let cx = MintContext {
        kube: &ctx.client,
        http: &ctx.http,
        namespace: &namespace,
        service_account: None,
    };
    let minted = ctx
        .config
        .source(&identity)
        .mint(cx, &ctx.config.registry)
        .await;
    ctx.metrics.mint(
        "chainguard",
        minted.is_ok(),
        started.elapsed().as_secs_f64(),
    );
    let credential = match minted {
        Ok(c) => c,
        Err(e) => {
            let e = UpdateError::Mint {
                identity,
                message: e.to_string(),
            };
            report(
                &ctx,
                &secret,
                "MintFailed",
                &format!("{e}; the current token, if any, stays in place"),
            )
            .await;
            return Err(e);
        }
    };
    let mut next = secret.clone();
    next.data.get_or_insert_default().insert(
        DOCKER_CONFIG_KEY.into(),
        ByteString(with_token(
            &secret,
            &ctx.config.registry,
            credential.password.expose(),
        )),
    );
    next.metadata
        .annotations
        .get_or_insert_default()
        .insert(MINTED_FOR_ANNOTATION.into(), identity.clone());
    next.metadata.managed_fields = None;
    if layout::unchanged(&layout::Written::of(&secret), &next) {
        // The source handed back the token already stored.
        ctx.metrics.secret_write_skipped("pull_secret_updater");
        tracing::debug!(namespace, secret = %name, "the Secret already holds this token; not written");
    } else {
        // Replaced at the version read: a concurrent edit makes this fail and be retried.
        api.replace(&name, &PostParams::default(), &next)
            .await
            .map_err(|e| api_error("replacing", e))?;
        tracing::info!(namespace, secret = %name, identity, expires_at = %credential.expires_at, "filled pull-secret-updater Secret");
    }
    Ok(Action::requeue(
        renewal::until(
            due(credential.expires_at, ctx.config.renew_before),
            Timestamp::now(),
        )
        .max(Duration::from_secs(1)),
    ))
}

fn error_policy(
    meta: Arc<PartialObjectMeta<Secret>>,
    error: &UpdateError,
    _ctx: Arc<Context>,
) -> Action {
    let wait = renewal::retry_delay(3, 0.5 + fastrand::f64());
    tracing::warn!(namespace = meta.namespace().unwrap_or_default(), secret = %meta.name_any(), error = %error, retry_in_ms = wait.as_millis() as u64, "pull-secret-updater Secret not filled; retrying");
    Action::requeue(wait)
}

async fn report(ctx: &Context, secret: &Secret, reason: &str, note: &str) {
    let reference = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Secret".into()),
        namespace: secret.namespace(),
        name: Some(secret.name_any()),
        uid: secret.uid(),
        ..Default::default()
    };
    ctx.events.warn(&reference, "Update", reason, note).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn mints_when_missing_foreign_or_due_and_waits_otherwise() {
        let rb = Duration::from_secs(600);
        let ok = Stored {
            minted_for: Some("abc".into()),
            expires_at: Some(at(3600)),
        };
        assert_eq!(next_step(&ok, "abc", rb, at(0)), Step::WaitUntil(at(3000)));
        assert_eq!(
            next_step(&ok, "abc", rb, at(3000)),
            Step::Mint,
            "ten minutes before exp"
        );
        assert_eq!(
            next_step(&ok, "def", rb, at(0)),
            Step::Mint,
            "another identity"
        );
        assert_eq!(
            next_step(
                &Stored {
                    minted_for: None,
                    expires_at: Some(at(3600))
                },
                "abc",
                rb,
                at(0)
            ),
            Step::Mint
        );
        assert_eq!(
            next_step(
                &Stored {
                    minted_for: Some("abc".into()),
                    expires_at: None
                },
                "abc",
                rb,
                at(0)
            ),
            Step::Mint
        );
    }

    #[test]
    fn the_token_is_added_beside_other_registries() {
        let doc = json!({"auths": {"ghcr.io": {"auth": "eDp5"}}});
        let secret = Secret {
            data: Some(BTreeMap::from([(
                DOCKER_CONFIG_KEY.to_string(),
                ByteString(serde_json::to_vec(&doc).unwrap()),
            )])),
            ..Default::default()
        };
        let out: Value = serde_json::from_slice(&with_token(&secret, "cgr.dev", "tok")).unwrap();
        assert_eq!(out["auths"]["ghcr.io"], json!({"auth": "eDp5"}));
        assert_eq!(
            out["auths"]["cgr.dev"],
            json!({"username": "_token", "password": "tok", "auth": "X3Rva2VuOnRvaw=="})
        );
        // Empty or unreadable data is replaced by a fresh document.
        let out: Value =
            serde_json::from_slice(&with_token(&Secret::default(), "cgr.dev", "tok")).unwrap();
        assert_eq!(out["auths"].as_object().unwrap().len(), 1);
    }
}
