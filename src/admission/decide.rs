//! The admission decision, with no I/O: from a decoded request, what the shell looked up about
//! its namespace, and the settings, either the answer itself or the Secret to make sure of
//! before answering with a patch. The webhook runs it for every request; the fuzz test and the
//! benchmark run the same function.

use json_patch::Patch;

use super::review::{self, Review, Target, Verdict};
use crate::config::InjectMode;
use crate::core::images;
use crate::core::names;
use crate::core::namespaces::{Selection, REGISTRIES_ANNOTATION};
use crate::core::subject::{IdentityScope, Subject};
use crate::settings::Settings;

/// What the shell found out about the request's namespace.
#[derive(Clone, Debug)]
pub struct NamespaceFacts {
    /// Selected by the policy (and not excluded).
    pub opted_in: bool,
    /// The registries its annotation picks from the configured ones.
    pub selection: Selection,
}

impl NamespaceFacts {
    /// A namespace that is not served.
    pub(crate) fn not_served() -> Self {
        Self {
            opted_in: false,
            selection: Selection {
                hosts: Vec::new(),
                unknown: Vec::new(),
            },
        }
    }
}

/// How an admission ended, as the metrics count it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Unchanged,
    Patched,
    /// Patched, but the Secret is not there yet (it is provisioned in the background).
    NotReady,
    /// Not patched: the Secret's name belongs to someone else, or no registry is selected.
    Conflict,
    /// The request could not be acted on as it was.
    Invalid,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unchanged => "unchanged",
            Self::Patched => "patched",
            Self::NotReady => "not_ready",
            Self::Conflict => "conflict",
            Self::Invalid => "invalid",
        }
    }
}

#[derive(Debug)]
pub enum Decision {
    /// The answer, final.
    Answer(Verdict, Outcome),
    /// Answer with `patch` once `subject`'s Secret, `secret`, is there (or the budget is spent).
    Provision {
        subject: Subject,
        secret: String,
        patch: Patch,
    },
}

impl Decision {
    fn unchanged() -> Self {
        Self::Answer(Verdict::unchanged(), Outcome::Unchanged)
    }

    fn warn(outcome: Outcome, warning: impl Into<String>) -> Self {
        Self::Answer(Verdict::unchanged().warn(warning), outcome)
    }

    fn patched(patch: Patch) -> Self {
        Self::Answer(Verdict::patched(patch), Outcome::Patched)
    }
}

/// Why the names a review carries cannot be used, if they cannot: the namespace, the object's
/// name, the ServiceAccount it runs as and the Secret name built from them all go into API
/// paths, cache keys and Events, so each must be a name Kubernetes allows before anything is
/// looked up. Only requests this service acts on are checked.
pub(crate) fn invalid_names(review: &Review, settings: &Settings) -> Option<String> {
    let req = &review.request;
    let (Some(target), Some(namespace)) = (req.target(), req.namespace.as_deref()) else {
        return None;
    };
    let refuse = |e: String| Some(format!("pull-secret-injector: {e}; nothing injected"));
    if let Err(e) = names::validate_dns_label(namespace) {
        return refuse(e);
    }
    let object = req.object.as_ref()?;
    let service_account = match target {
        Target::Pod => object.pod_service_account(),
        Target::ServiceAccount => object.name(),
    };
    // Empty: a ServiceAccount named by `generateName`, answered by `decide`.
    if service_account.is_empty() {
        return None;
    }
    if let Err(e) = names::validate_dns_subdomain(service_account) {
        return refuse(format!("ServiceAccount name: {e}"));
    }
    let secret = settings.secret_of(&settings.subject_for(namespace, service_account));
    if let Err(e) = names::validate_dns_subdomain(&secret) {
        return refuse(format!("Secret name: {e}"));
    }
    None
}

/// Decides one admission. `body` is the review as received, read again only for what `review`
/// does not hold (container images, with `inject: matchingImages`).
pub fn decide(
    review: &Review,
    body: &[u8],
    facts: &NamespaceFacts,
    settings: &Settings,
) -> Decision {
    let req = &review.request;
    let (Some(target), Some(namespace)) = (req.target(), req.namespace.as_deref()) else {
        return Decision::unchanged();
    };
    if let Some(why) = invalid_names(review, settings) {
        return Decision::warn(Outcome::Invalid, why);
    }
    if !facts.opted_in {
        return Decision::unchanged();
    }
    let hosts = &facts.selection.hosts;
    // `Conflict`, as when the provisioner finds it: the namespace asks for injection that no
    // registry can give, which `PullSecretAdmissionsWithWarnings` is there to show.
    if hosts.is_empty() {
        return Decision::warn(
            Outcome::Conflict,
            format!(
                "pull-secret-injector: namespace {namespace} selects no configured registry \
                 (annotation {REGISTRIES_ANNOTATION}); nothing injected"
            ),
        );
    }
    let Some(object) = req.object.as_ref() else {
        return Decision::warn(
            Outcome::Invalid,
            "pull-secret-injector: the request carries no object to patch",
        );
    };
    if let Some(list) = object.too_long_list() {
        return Decision::warn(
            Outcome::Invalid,
            format!(
                "pull-secret-injector: {list} has more than {} entries; nothing injected",
                review::MAX_REFERENCES
            ),
        );
    }
    // `serviceAccounts: apply` or `never`: a ServiceAccount's admission is answered unchanged
    // (the webhook is then registered for Pods only; this covers a registration left over).
    if target == Target::ServiceAccount && !settings.service_accounts().patches_at_admission() {
        return Decision::unchanged();
    }
    if settings.inject() == InjectMode::MatchingImages {
        if target != Target::Pod {
            return Decision::unchanged();
        }
        match review::images(body) {
            Ok(found) if images::any_on(found.iter().map(String::as_str), hosts) => {}
            Ok(_) => return Decision::unchanged(),
            Err(e) => {
                return Decision::warn(
                    Outcome::Invalid,
                    format!("pull-secret-injector: {e}; nothing injected"),
                )
            }
        }
    }
    let service_account = match target {
        Target::Pod => object.pod_service_account(),
        Target::ServiceAccount => object.name(),
    };
    let scope = settings.scope();
    if scope == IdentityScope::ServiceAccount && service_account.is_empty() {
        return Decision::warn(
            Outcome::Unchanged,
            "pull-secret-injector: a ServiceAccount without a name cannot get its own Secret",
        );
    }
    let subject = settings.subject_for(namespace, service_account);
    let secret = settings.secret_of(&subject);
    let patch = review::patch_for(target, object, &secret);
    // Dry runs must have no side effects (sideEffects: NoneOnDryRun): no mint, no write.
    if req.is_dry_run() {
        return Decision::patched(patch);
    }
    // A ServiceAccount needs no credential yet; the Pods that use it do, and their admissions
    // provision. Minting here would often be for an account that does not exist yet (in
    // serviceAccount scope the one being created, per namespace the namespace's `default` at
    // the namespace's creation, or the registry's own account): refused 404, a mint slot spent
    // and the Pods that follow held back. The refresher starts the Secret once it exists.
    if target == Target::ServiceAccount {
        return Decision::patched(patch);
    }
    Decision::Provision {
        subject,
        secret,
        patch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::settings::Environment;
    use serde_json::{json, Value};

    fn settings(extra: &str) -> Settings {
        let yaml = format!(
            "tls: {{certFile: a, keyFile: b}}\nregistries: [{{host: ghcr.io, kubernetes: \
             {{audience: a}}}}, {{host: cgr.dev, kubernetes: {{audience: a}}}}]\n{extra}"
        );
        Settings::new(Config::from_yaml(&yaml).unwrap(), &Environment::default()).unwrap()
    }

    fn served(hosts: &[&str]) -> NamespaceFacts {
        NamespaceFacts {
            opted_in: true,
            selection: Selection {
                hosts: hosts.iter().map(|h| h.to_string()).collect(),
                unknown: Vec::new(),
            },
        }
    }

    fn body(kind: &str, operation: &str, dry_run: bool, object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u", "kind": {"group": "", "version": "v1", "kind": kind},
                "namespace": "team-a", "operation": operation, "dryRun": dry_run,
                "object": object
            }
        }))
        .unwrap()
    }

    fn pod(image: &str, service_account: &str) -> Value {
        json!({"spec": {"serviceAccountName": service_account, "containers": [{"name": "c", "image": image}]}})
    }

    /// The decision in words: the outcome, the Secret, and the warning if any.
    fn run(settings: &Settings, facts: &NamespaceFacts, body: &[u8]) -> (String, String) {
        let review = review::decode(body).unwrap();
        match decide(&review, body, facts, settings) {
            Decision::Answer(v, outcome) => {
                let secret = v.patch.map_or(String::new(), |p| {
                    serde_json::to_value(p).unwrap()[0]["value"][0]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                });
                (
                    format!("{} {secret}", outcome.as_str()).trim().to_string(),
                    v.warnings.join(" "),
                )
            }
            Decision::Provision {
                subject, secret, ..
            } => (format!("provision {subject} {secret}"), String::new()),
        }
    }

    #[test]
    fn every_branch() {
        let always = settings("");
        let matching = settings("inject: matchingImages\n");
        let per_sa = settings("identityScope: serviceAccount\n");
        let applied = settings("serviceAccounts: apply\n");
        let pods_only = settings("serviceAccounts: never\n");
        let pods_only_per_sa = settings("serviceAccounts: never\nidentityScope: serviceAccount\n");
        let all = served(&["ghcr.io", "cgr.dev"]);
        let pod_create = body("Pod", "CREATE", false, pod("ghcr.io/a/b", "builder"));
        let sa_create = body(
            "ServiceAccount",
            "CREATE",
            false,
            json!({"metadata": {"name": "builder"}}),
        );
        // (what, settings, facts, request, expected outcome, expected warning)
        type Case<'a> = (
            &'a str,
            &'a Settings,
            NamespaceFacts,
            Vec<u8>,
            &'a str,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            // namespace
            (
                "not served",
                &always,
                NamespaceFacts::not_served(),
                pod_create.clone(),
                "unchanged",
                "",
            ),
            (
                "nothing selected",
                &always,
                served(&[]),
                pod_create.clone(),
                "conflict",
                "selects no configured registry",
            ),
            // what is admitted
            (
                "an update",
                &always,
                all.clone(),
                body("Pod", "UPDATE", false, pod("x", "d")),
                "unchanged",
                "",
            ),
            (
                "no object",
                &always,
                all.clone(),
                body("Pod", "CREATE", false, Value::Null),
                "invalid",
                "no object",
            ),
            (
                "a Pod",
                &always,
                all.clone(),
                pod_create.clone(),
                "provision team-a pull-secret",
                "",
            ),
            (
                "a ServiceAccount is patched, provisioned later",
                &always,
                all.clone(),
                sa_create.clone(),
                "patched pull-secret",
                "",
            ),
            // images
            (
                "matching image",
                &matching,
                all.clone(),
                pod_create.clone(),
                "provision team-a pull-secret",
                "",
            ),
            (
                "image elsewhere",
                &matching,
                all.clone(),
                body("Pod", "CREATE", false, pod("quay.io/x", "d")),
                "unchanged",
                "",
            ),
            (
                "image on an unselected registry",
                &matching,
                served(&["cgr.dev"]),
                pod_create.clone(),
                "unchanged",
                "",
            ),
            (
                "ServiceAccounts left alone",
                &matching,
                all.clone(),
                sa_create.clone(),
                "unchanged",
                "",
            ),
            (
                "containers not a list",
                &matching,
                all.clone(),
                body(
                    "Pod",
                    "CREATE",
                    false,
                    json!({"spec": {"containers": {"image": "x"}}}),
                ),
                "invalid",
                "container list",
            ),
            // scope
            (
                "per ServiceAccount",
                &per_sa,
                all.clone(),
                pod_create.clone(),
                "provision team-a/builder builder-pull-secret",
                "",
            ),
            (
                "a new ServiceAccount is patched, provisioned later",
                &per_sa,
                all.clone(),
                sa_create.clone(),
                "patched builder-pull-secret",
                "",
            ),
            (
                "a nameless ServiceAccount",
                &per_sa,
                all.clone(),
                body(
                    "ServiceAccount",
                    "CREATE",
                    false,
                    json!({"metadata": {"generateName": "x-"}}),
                ),
                "unchanged",
                "without a name",
            ),
            // serviceAccounts: apply and never leave a ServiceAccount's admission alone;
            // Pods are patched as ever
            (
                "apply: a ServiceAccount is left to the refresher",
                &applied,
                all.clone(),
                sa_create.clone(),
                "unchanged",
                "",
            ),
            (
                "apply: a Pod",
                &applied,
                all.clone(),
                pod_create.clone(),
                "provision team-a pull-secret",
                "",
            ),
            (
                "never: a ServiceAccount is left alone",
                &pods_only,
                all.clone(),
                sa_create.clone(),
                "unchanged",
                "",
            ),
            (
                "never: a Pod",
                &pods_only,
                all.clone(),
                pod_create.clone(),
                "provision team-a pull-secret",
                "",
            ),
            (
                "never, per ServiceAccount: a Pod gets its account's Secret",
                &pods_only_per_sa,
                all.clone(),
                pod_create.clone(),
                "provision team-a/builder builder-pull-secret",
                "",
            ),
            (
                "never: a dry-run ServiceAccount is left alone too",
                &pods_only,
                all.clone(),
                body(
                    "ServiceAccount",
                    "CREATE",
                    true,
                    json!({"metadata": {"name": "builder"}}),
                ),
                "unchanged",
                "",
            ),
            // dry run
            (
                "dry run: patched, nothing made",
                &always,
                all.clone(),
                body("Pod", "CREATE", true, pod("x", "d")),
                "patched pull-secret",
                "",
            ),
        ];
        for (name, settings, facts, body, outcome, warning) in cases {
            let (got, warned) = run(settings, &facts, &body);
            assert_eq!(got, outcome, "{name}");
            assert!(warned.contains(warning), "{name}: {warned:?}");
            assert_eq!(warning.is_empty(), warned.is_empty(), "{name}: {warned:?}");
        }
    }

    /// Names a hostile review carries: each would have gone into an API path or a cache key.
    /// They are refused whatever the facts say (the shell asks nothing for them).
    #[test]
    fn crafted_names_are_refused() {
        let always = settings("");
        let per_sa = settings("identityScope: serviceAccount\n");
        let with = |namespace: &str, kind: &str, object: Value| {
            let mut b: Value =
                serde_json::from_slice(&body(kind, "CREATE", false, object)).unwrap();
            b["request"]["namespace"] = json!(namespace);
            serde_json::to_vec(&b).unwrap()
        };
        let long = [
            "a".repeat(62),
            "b".repeat(62),
            "c".repeat(62),
            "d".repeat(62),
        ]
        .join(".");
        let cases: Vec<(&Settings, Vec<u8>, &str)> = vec![
            (
                &always,
                with("team-a?watch=true", "Pod", pod("x", "d")),
                "namespace name",
            ),
            (
                &always,
                with("team-a?x=1", "Pod", pod("x", "d")),
                "namespace name",
            ),
            (
                &always,
                with("team-a//", "Pod", pod("x", "d")),
                "namespace name",
            ),
            (
                &always,
                with("team%2Da", "Pod", pod("x", "d")),
                "namespace name",
            ),
            (
                &always,
                with(&"a".repeat(64), "Pod", pod("x", "d")),
                "namespace name",
            ),
            (
                &always,
                with("team-a", "Pod", pod("x", "../x")),
                "ServiceAccount name",
            ),
            (
                &always,
                with(
                    "team-a",
                    "ServiceAccount",
                    json!({"metadata": {"name": "a?b"}}),
                ),
                "ServiceAccount name",
            ),
            // Valid on its own, too long once `-pull-secret` is appended.
            (
                &per_sa,
                with("team-a", "Pod", pod("x", &long)),
                "Secret name",
            ),
        ];
        for (settings, body, warning) in cases {
            let (got, warned) = run(settings, &served(&["ghcr.io"]), &body);
            assert_eq!(got, "invalid", "{warned}");
            assert!(warned.contains(warning), "{warned}");
            assert!(
                warned.len() < 300,
                "a crafted name is not echoed whole: {warned}"
            );
        }
        let many: Vec<Value> = (0..=review::MAX_REFERENCES)
            .map(|i| json!({"name": format!("s{i}")}))
            .collect();
        let (got, warned) = run(
            &always,
            &served(&["ghcr.io"]),
            &with("team-a", "Pod", json!({"spec": {"imagePullSecrets": many}})),
        );
        assert_eq!(got, "invalid");
        assert!(
            warned.contains("spec.imagePullSecrets has more than 1024 entries"),
            "{warned}"
        );
        // The same long ServiceAccount is fine with one Secret per namespace.
        let (got, _) = run(
            &always,
            &served(&["ghcr.io"]),
            &with("team-a", "Pod", pod("x", &long)),
        );
        assert_eq!(got, "provision team-a pull-secret");
    }

    /// The outcomes that answer with a warning the operator must act on are those the
    /// `PullSecretAdmissionsWithWarnings` rule selects, in both shipped forms of the rule; a
    /// namespace that selects no registry is one of them, whichever side finds it.
    #[test]
    fn the_warning_alert_selects_what_needs_acting_on() {
        let root = env!("CARGO_MANIFEST_DIR");
        for rule in [
            "deploy/kustomize/monitoring/prometheusrule.yaml",
            "deploy/helm/pull-secret-injector/templates/prometheusrule.yaml",
        ] {
            let text = std::fs::read_to_string(format!("{root}/{rule}")).unwrap();
            let alert = text
                .split("- alert: ")
                .find(|a| a.starts_with("PullSecretAdmissionsWithWarnings"))
                .unwrap();
            let selected = alert
                .split("outcome=~\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap();
            let selected: Vec<&str> = selected.split('|').collect();
            let nothing = run(
                &settings(""),
                &served(&[]),
                &body("Pod", "CREATE", false, pod("ghcr.io/a/b", "builder")),
            );
            let outcome = nothing.0.split(' ').next().unwrap();
            assert!(
                selected.contains(&outcome),
                "{rule}: {selected:?} misses {outcome}"
            );
            for quiet in [Outcome::Unchanged, Outcome::Patched, Outcome::Invalid] {
                assert!(!selected.contains(&quiet.as_str()), "{rule}");
            }
            for loud in [Outcome::NotReady, Outcome::Conflict] {
                assert!(selected.contains(&loud.as_str()), "{rule}");
            }
        }
    }
}
