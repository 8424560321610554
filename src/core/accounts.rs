//! What the service does to ServiceAccounts (`serviceAccounts: patch | apply | never`), and,
//! with `apply`, the server-side apply that attaches the pull Secret to one of them. Pure: the
//! ServiceAccount as JSON in, the apply body out, tested beside the code.
//!
//! Why `apply` exists (docs/gitops.md): GitOps tools (Argo CD, Flux) apply ServiceAccounts
//! server-side and own the fields they declare. `imagePullSecrets` is an *atomic* list on a
//! ServiceAccount (`x-kubernetes-list-type: atomic`; `secrets` is a map keyed by `name`): it is
//! owned as a whole by one set of managers, never entry by entry. So
//! - a reference added at admission to a list the manifest declares belongs, with the whole
//!   list, to the tool's field manager, and its next apply (which omits it) removes it;
//! - a reference applied by this service into an absent list is owned by `pull-secret-injector`
//!   alone, and the tool's next apply, which does not declare the list, keeps it;
//! - a list the tool declares cannot take our entry without a conflict: forcing it takes the
//!   whole list from the tool, whose next apply (Argo CD and Flux apply with force) takes it
//!   back without our entry, and the two would fight for ever. Such a list is left to its
//!   manifest and reported: add the Secret there, or rely on Pods (patched at admission).

use serde_json::{json, Map, Value};

use super::patch::INJECTED_ANNOTATION;

/// The field manager this service applies ServiceAccounts as. Stable: GitOps tools are told to
/// ignore what it owns (Argo CD `managedFieldsManagers`).
pub const FIELD_MANAGER: &str = "pull-secret-injector";

/// See the `serviceAccounts` configuration key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ServiceAccountMode {
    /// Added at admission (a JSON patch, attributed to whoever creates the ServiceAccount) and
    /// to existing ServiceAccounts by the refresher (a JSON patch).
    #[default]
    Patch,
    /// Not at admission; the refresher attaches it by server-side apply as
    /// [`FIELD_MANAGER`], never forcing a list another apply declares. For ServiceAccounts
    /// managed by GitOps.
    Apply,
    /// ServiceAccounts are never changed: only Pods get the reference, at admission.
    Never,
}

impl ServiceAccountMode {
    /// Whether a ServiceAccount's admission is patched.
    pub fn patches_at_admission(self) -> bool {
        self == Self::Patch
    }

    /// How the refresher attaches the Secret to existing ServiceAccounts, if it does.
    pub fn refresher_writes(self) -> Option<Write> {
        match self {
            Self::Patch => Some(Write::JsonPatch),
            Self::Apply => Some(Write::ServerSideApply),
            Self::Never => None,
        }
    }

    /// Whether opting out takes the references back (never, when ServiceAccounts are never
    /// touched: a switch from `patch` to `never` leaves earlier references, see the docs).
    pub fn detaches(self) -> bool {
        self != Self::Never
    }

    /// Whether the API server must be told to send ServiceAccount admissions at all.
    pub fn registers_service_accounts(self) -> bool {
        self.patches_at_admission()
    }
}

/// How the refresher writes a ServiceAccount.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    JsonPatch,
    ServerSideApply,
}

/// What an apply pass does to one ServiceAccount.
#[derive(Clone, Debug, PartialEq)]
pub struct ApplyPlan {
    /// The apply configuration to send, `None` when there is nothing to change. It names every
    /// field this manager keeps (an apply drops what its manager owned and no longer sends),
    /// and carries the `resourceVersion` read, so a change in between fails it (409) instead of
    /// being overwritten.
    pub body: Option<Value>,
    /// Whether to apply with `force`: the list is held by managers that only ever update
    /// (`kubectl create`, `kubectl edit`, controllers), which never apply it again.
    pub force: bool,
    /// The manager that declares `imagePullSecrets` by apply, when it lacks the Secret: left
    /// to it, and reported.
    pub declared_by: Option<String>,
}

/// Who holds `imagePullSecrets` of `sa`, other than this service: (managers that apply it,
/// managers that update it).
fn list_owners(sa: &Value) -> (Vec<String>, Vec<String>) {
    let (mut applied, mut updated) = (Vec::new(), Vec::new());
    let entries = sa
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array);
    for entry in entries.into_iter().flatten() {
        let owns = entry.pointer("/fieldsV1/f:imagePullSecrets").is_some();
        let manager = entry.get("manager").and_then(Value::as_str).unwrap_or("");
        if !owns || manager == FIELD_MANAGER {
            continue;
        }
        match entry.get("operation").and_then(Value::as_str) {
            Some("Apply") => applied.push(manager.to_string()),
            _ => updated.push(manager.to_string()),
        }
    }
    (applied, updated)
}

fn names(list: Option<&Value>) -> impl Iterator<Item = &str> {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("name").and_then(Value::as_str))
}

fn has(sa: &Value, list: &str, secret: &str) -> bool {
    names(sa.get(list)).any(|n| n == secret)
}

fn marked(sa: &Value, list: &str) -> bool {
    sa.pointer("/metadata/annotations")
        .and_then(|a| a.get(INJECTED_ANNOTATION))
        .and_then(Value::as_str)
        .is_some_and(|m| m.split(',').any(|l| l == list))
}

/// The apply that attaches `secret` to `sa` (the ServiceAccount as read, with its
/// `managedFields`). Per list: our entry is sent when it is missing and may be added, or when
/// it is there because this service put it there (the marker says so), since an apply that
/// omitted it would drop it. `secrets` is keyed by name, so only our entry is sent;
/// `imagePullSecrets` is atomic, so the whole list is sent, the user's entries as they are.
pub fn plan_apply(sa: &Value, secret: &str) -> ApplyPlan {
    let nothing = ApplyPlan {
        body: None,
        force: false,
        declared_by: None,
    };
    let Some(name) = sa.pointer("/metadata/name").and_then(Value::as_str) else {
        return nothing;
    };
    let in_pulls = has(sa, "imagePullSecrets", secret);
    let in_refs = has(sa, "secrets", secret);
    let (applied, updated) = list_owners(sa);
    let declared_by = (!in_pulls).then(|| applied.first().cloned()).flatten();
    if in_pulls && in_refs {
        return nothing;
    }
    let mut body = Map::new();
    let mut lists = Vec::new();
    let mut force = false;
    if in_pulls && marked(sa, "imagePullSecrets") || !in_pulls && declared_by.is_none() {
        let mut pulls: Vec<Value> = sa
            .get("imagePullSecrets")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if !in_pulls {
            pulls.push(json!({ "name": secret }));
            force = !updated.is_empty();
        }
        body.insert("imagePullSecrets".into(), Value::Array(pulls));
        lists.push("imagePullSecrets");
    }
    if !in_refs || marked(sa, "secrets") {
        body.insert("secrets".into(), json!([{ "name": secret }]));
        lists.push("secrets");
    }
    // Only `secrets` would be sent, and it is there already: nothing to change.
    if in_refs && !lists.contains(&"imagePullSecrets") {
        return ApplyPlan {
            declared_by,
            ..nothing
        };
    }
    let mut metadata = json!({
        "name": name,
        "annotations": { INJECTED_ANNOTATION: lists.join(",") },
    });
    for key in ["namespace", "resourceVersion"] {
        if let Some(v) = sa.pointer(&format!("/metadata/{key}")) {
            metadata[key] = v.clone();
        }
    }
    body.insert("apiVersion".into(), json!("v1"));
    body.insert("kind".into(), json!("ServiceAccount"));
    body.insert("metadata".into(), metadata);
    ApplyPlan {
        body: Some(Value::Object(body)),
        force,
        declared_by,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn managed(manager: &str, operation: &str, fields: Value) -> Value {
        json!({"manager": manager, "operation": operation, "apiVersion": "v1",
               "fieldsType": "FieldsV1", "fieldsV1": fields})
    }

    fn sa(extra: Value, managed_fields: Vec<Value>) -> Value {
        let mut sa = json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "builder", "namespace": "team-a", "resourceVersion": "7",
                         "managedFields": managed_fields}});
        for (k, v) in extra.as_object().cloned().unwrap_or_default() {
            if k == "annotations" {
                sa["metadata"]["annotations"] = v;
            } else {
                sa[k] = v;
            }
        }
        sa
    }

    const LIST: fn() -> Value = || json!({"f:imagePullSecrets": {}});

    #[test]
    fn which_mode_touches_what() {
        use ServiceAccountMode::*;
        // (mode, patched at admission, refresher writes, detaches, registered)
        let cases = [
            (Patch, true, Some(Write::JsonPatch), true, true),
            (Apply, false, Some(Write::ServerSideApply), true, false),
            (Never, false, None, false, false),
        ];
        for (mode, admission, refresher, detaches, registered) in cases {
            assert_eq!(mode.patches_at_admission(), admission, "{mode:?}");
            assert_eq!(mode.refresher_writes(), refresher, "{mode:?}");
            assert_eq!(mode.detaches(), detaches, "{mode:?}");
            assert_eq!(mode.registers_service_accounts(), registered, "{mode:?}");
        }
        assert_eq!(ServiceAccountMode::default(), Patch);
    }

    #[test]
    fn apply_plans() {
        let ours = || json!([{"name": "s"}]);
        // (what, the ServiceAccount, imagePullSecrets sent, secrets sent, marker, force, declared by)
        type Case = (
            &'static str,
            Value,
            Option<Value>,
            Option<Value>,
            &'static str,
            bool,
            Option<&'static str>,
        );
        let cases: Vec<Case> = vec![
            (
                "a bare ServiceAccount, applied by a GitOps tool: both lists",
                sa(json!({}), vec![managed("argocd-controller", "Apply", json!({"f:metadata": {"f:labels": {}}}))]),
                Some(ours()),
                Some(ours()),
                "imagePullSecrets,secrets",
                false,
                None,
            ),
            (
                "a list made by kubectl create: taken with force, its entries kept",
                sa(json!({"imagePullSecrets": [{"name": "mine"}]}), vec![managed("kubectl-create", "Update", LIST())]),
                Some(json!([{"name": "mine"}, {"name": "s"}])),
                Some(ours()),
                "imagePullSecrets,secrets",
                true,
                None,
            ),
            (
                "a list no one holds (added at an apply's admission): no force",
                sa(json!({"imagePullSecrets": [{"name": "mine"}]}), vec![]),
                Some(json!([{"name": "mine"}, {"name": "s"}])),
                Some(ours()),
                "imagePullSecrets,secrets",
                false,
                None,
            ),
            (
                "a list a GitOps tool declares: left to it, secrets only",
                sa(json!({"imagePullSecrets": [{"name": "mine"}]}), vec![managed("argocd-controller", "Apply", LIST())]),
                None,
                Some(ours()),
                "secrets",
                false,
                Some("argocd-controller"),
            ),
            (
                "a list held by our own earlier apply: ours, no force",
                sa(json!({"imagePullSecrets": [{"name": "mine"}]}), vec![managed(FIELD_MANAGER, "Apply", LIST())]),
                Some(json!([{"name": "mine"}, {"name": "s"}])),
                Some(ours()),
                "imagePullSecrets,secrets",
                false,
                None,
            ),
            (
                "ours in imagePullSecrets, secrets lost: both sent, or the apply would drop the first",
                sa(json!({"imagePullSecrets": [{"name": "s"}], "annotations": {INJECTED_ANNOTATION: "imagePullSecrets,secrets"}}),
                   vec![managed(FIELD_MANAGER, "Apply", LIST())]),
                Some(ours()),
                Some(ours()),
                "imagePullSecrets,secrets",
                false,
                None,
            ),
            (
                "the user wrote ours in imagePullSecrets: only secrets, theirs not taken",
                sa(json!({"imagePullSecrets": [{"name": "s"}]}), vec![managed("kubectl-create", "Update", LIST())]),
                None,
                Some(ours()),
                "secrets",
                false,
                None,
            ),
        ];
        for (what, sa, pulls, refs, marker, force, declared) in cases {
            let plan = plan_apply(&sa, "s");
            let body = plan.body.clone().expect(what);
            assert_eq!(body.get("imagePullSecrets"), pulls.as_ref(), "{what}");
            assert_eq!(body.get("secrets"), refs.as_ref(), "{what}");
            assert_eq!(
                body["metadata"]["annotations"][INJECTED_ANNOTATION], marker,
                "{what}"
            );
            assert_eq!(body["metadata"]["resourceVersion"], "7", "{what}");
            assert_eq!(body["metadata"]["namespace"], "team-a", "{what}");
            assert_eq!(body["kind"], "ServiceAccount", "{what}");
            assert!(body["metadata"].get("labels").is_none(), "{what}");
            assert_eq!(plan.force, force, "{what}");
            assert_eq!(plan.declared_by.as_deref(), declared, "{what}");
        }
    }

    #[test]
    fn nothing_to_apply() {
        let both = json!({"imagePullSecrets": [{"name": "s"}], "secrets": [{"name": "s"}]});
        let plan = plan_apply(&sa(both, vec![]), "s");
        assert_eq!(plan.body, None);
        // Declared without ours, and secrets has it: nothing to send, the owner reported.
        let declared = sa(
            json!({"imagePullSecrets": [{"name": "mine"}], "secrets": [{"name": "s"}]}),
            vec![managed("kustomize-controller", "Apply", LIST())],
        );
        let plan = plan_apply(&declared, "s");
        assert_eq!(plan.body, None);
        assert_eq!(plan.declared_by.as_deref(), Some("kustomize-controller"));
        // Not a ServiceAccount the API server would send.
        assert_eq!(plan_apply(&json!({"spec": {}}), "s").body, None);
    }
}
