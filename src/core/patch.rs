//! The JSON patches that attach the pull Secret to a Pod or a ServiceAccount, and detach it
//! from a ServiceAccount again. Pure functions over the object as JSON: they only ever `add`
//! (creating a missing list first), never rewrite a user's entries, and produce nothing when the
//! reference is already there, so a reinvoked webhook is a no-op.

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation, RemoveOperation, TestOperation};
use serde_json::{json, Value};

/// Marks a ServiceAccount whose references this service added, with the lists it added them to
/// (`imagePullSecrets,secrets`), so that opting out removes exactly those and leaves references
/// a user wrote alone.
pub const INJECTED_ANNOTATION: &str = "pull-secret-injector.io/injected-into";

const SA_LISTS: [&str; 2] = ["imagePullSecrets", "secrets"];

fn marked_lists(sa: &Value) -> Vec<&str> {
    let marker = sa
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(INJECTED_ANNOTATION));
    marker
        .and_then(Value::as_str)
        .map(|v| v.split(',').filter(|f| SA_LISTS.contains(f)).collect())
        .unwrap_or_default()
}

/// Patch for a Pod: the Secret in `spec.imagePullSecrets`.
pub fn for_pod(pod: &Value, secret: &str) -> Patch {
    let mut ops = Vec::new();
    // Not a Pod the API server would have decoded; patching it could only fail.
    if !pod.get("spec").is_some_and(Value::is_object) {
        return Patch(ops);
    }
    add_reference(
        &mut ops,
        pod.get("spec").and_then(|s| s.get("imagePullSecrets")),
        &["spec", "imagePullSecrets"],
        secret,
    );
    Patch(ops)
}

/// Patch for a ServiceAccount: the Secret in `imagePullSecrets` and in `secrets` (which tools
/// such as Tekton read), and the marker annotation when anything was added.
pub fn for_service_account(sa: &Value, secret: &str) -> Patch {
    let mut ops = Vec::new();
    if !sa.get("metadata").is_some_and(Value::is_object) {
        return Patch(ops);
    }
    let mut lists = marked_lists(sa);
    for list in SA_LISTS {
        let before = ops.len();
        add_reference(&mut ops, sa.get(list), &[list], secret);
        if ops.len() > before && !lists.contains(&list) {
            lists.push(list);
        }
    }
    if !ops.is_empty() {
        let marker = json!(lists.join(","));
        let annotations = sa.get("metadata").and_then(|m| m.get("annotations"));
        if annotations.is_some_and(Value::is_object) {
            ops.push(add(
                &["metadata", "annotations", INJECTED_ANNOTATION],
                marker,
            ));
        } else {
            ops.push(add(
                &["metadata", "annotations"],
                json!({ INJECTED_ANNOTATION: marker }),
            ));
        }
    }
    Patch(ops)
}

/// Patch that takes back what [`for_service_account`] added. Each removal is preceded by a
/// `test` of the entry it removes, so a concurrent edit makes the patch fail instead of removing
/// the wrong entry. Empty when this service did not add the reference.
pub fn remove_from_service_account(sa: &Value, secret: &str) -> Patch {
    let lists = marked_lists(sa);
    if lists.is_empty() {
        return Patch(Vec::new());
    }
    let mut ops = Vec::new();
    for field in lists {
        let Some(entries) = sa.get(field).and_then(Value::as_array) else {
            continue;
        };
        // From the back, so that earlier indices stay valid.
        for (i, entry) in entries.iter().enumerate().rev() {
            if entry.get("name").and_then(Value::as_str) == Some(secret) {
                let path = pointer(&[field, &i.to_string(), "name"]);
                ops.push(PatchOperation::Test(TestOperation {
                    path,
                    value: json!(secret),
                }));
                ops.push(PatchOperation::Remove(RemoveOperation {
                    path: pointer(&[field, &i.to_string()]),
                }));
            }
        }
    }
    ops.push(PatchOperation::Remove(RemoveOperation {
        path: pointer(&["metadata", "annotations", INJECTED_ANNOTATION]),
    }));
    Patch(ops)
}

fn add_reference(ops: &mut Vec<PatchOperation>, list: Option<&Value>, path: &[&str], secret: &str) {
    match list.and_then(Value::as_array) {
        Some(entries)
            if entries
                .iter()
                .any(|e| e.get("name").and_then(Value::as_str) == Some(secret)) => {}
        Some(_) => ops.push(add(&[path, &["-"]].concat(), json!({ "name": secret }))),
        // Absent or null: create the list with our entry.
        None => ops.push(add(path, json!([{ "name": secret }]))),
    }
}

fn add(path: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: pointer(path),
        value,
    })
}

fn pointer(tokens: &[&str]) -> PointerBuf {
    PointerBuf::from_tokens(tokens.iter().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn apply(doc: &Value, p: &Patch) -> Value {
        let mut doc = doc.clone();
        json_patch::patch(&mut doc, p).expect("patch applies");
        doc
    }

    fn pod(pull_secrets: Option<Value>) -> Value {
        let mut spec =
            json!({"containers": [{"name": "app", "image": "registry.example.com/app:1"}]});
        if let Some(p) = pull_secrets {
            spec["imagePullSecrets"] = p;
        }
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec})
    }

    #[test]
    fn pod_without_pull_secrets_gets_the_list() {
        let p = for_pod(&pod(None), "pull-secret");
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!([{"op": "add", "path": "/spec/imagePullSecrets", "value": [{"name": "pull-secret"}]}])
        );
        assert_eq!(
            apply(&pod(None), &p)["spec"]["imagePullSecrets"],
            json!([{"name": "pull-secret"}])
        );
    }

    #[test]
    fn pod_with_other_pull_secrets_gets_ours_appended() {
        let before = pod(Some(json!([{"name": "mine"}])));
        let p = for_pod(&before, "pull-secret");
        assert_eq!(
            serde_json::to_value(&p).unwrap(),
            json!([{"op": "add", "path": "/spec/imagePullSecrets/-", "value": {"name": "pull-secret"}}])
        );
        assert_eq!(
            apply(&before, &p)["spec"]["imagePullSecrets"],
            json!([{"name": "mine"}, {"name": "pull-secret"}])
        );
    }

    #[test]
    fn pod_that_has_it_already_is_left_alone() {
        let before = pod(Some(json!([{"name": "a"}, {"name": "pull-secret"}])));
        assert!(for_pod(&before, "pull-secret").0.is_empty());
    }

    #[test]
    fn null_list_is_treated_as_absent() {
        let p = for_pod(&pod(Some(Value::Null)), "s");
        assert_eq!(
            apply(&pod(Some(Value::Null)), &p)["spec"]["imagePullSecrets"],
            json!([{"name": "s"}])
        );
    }

    #[test]
    fn applying_twice_changes_nothing_more() {
        for start in [pod(None), pod(Some(json!([{"name": "x"}])))] {
            let once = apply(&start, &for_pod(&start, "s"));
            assert!(for_pod(&once, "s").0.is_empty());
        }
        let sa = json!({"metadata": {"name": "default"}});
        let once = apply(&sa, &for_service_account(&sa, "s"));
        assert!(for_service_account(&once, "s").0.is_empty());
    }

    #[test]
    fn service_account_gets_both_lists_and_the_marker() {
        let sa = json!({"metadata": {"name": "default", "annotations": {"keep": "me"}}, "secrets": [{"name": "default-token-abc"}]});
        let after = apply(&sa, &for_service_account(&sa, "pull-secret"));
        assert_eq!(after["imagePullSecrets"], json!([{"name": "pull-secret"}]));
        assert_eq!(
            after["secrets"],
            json!([{"name": "default-token-abc"}, {"name": "pull-secret"}])
        );
        assert_eq!(
            after["metadata"]["annotations"],
            json!({"keep": "me", INJECTED_ANNOTATION: "imagePullSecrets,secrets"})
        );
    }

    #[test]
    fn service_account_without_annotations_gets_the_map() {
        let sa = json!({"metadata": {"name": "default"}});
        let after = apply(&sa, &for_service_account(&sa, "s"));
        assert_eq!(
            after["metadata"]["annotations"],
            json!({INJECTED_ANNOTATION: "imagePullSecrets,secrets"})
        );
    }

    #[test]
    fn removal_takes_back_only_what_was_added() {
        let sa = json!({"metadata": {"name": "default"}, "imagePullSecrets": [{"name": "mine"}], "secrets": [{"name": "tok"}]});
        let injected = apply(&sa, &for_service_account(&sa, "s"));
        let removed = apply(&injected, &remove_from_service_account(&injected, "s"));
        assert_eq!(removed["imagePullSecrets"], json!([{"name": "mine"}]));
        assert_eq!(removed["secrets"], json!([{"name": "tok"}]));
        assert_eq!(removed["metadata"]["annotations"], json!({}));
    }

    #[test]
    fn removal_leaves_a_reference_the_user_wrote() {
        let sa = json!({"metadata": {"name": "default"}, "imagePullSecrets": [{"name": "s"}]});
        assert!(remove_from_service_account(&sa, "s").0.is_empty());
        // The user wrote it in imagePullSecrets; this service added it to secrets only.
        let injected = apply(&sa, &for_service_account(&sa, "s"));
        assert_eq!(
            injected["metadata"]["annotations"][INJECTED_ANNOTATION],
            "secrets"
        );
        let removed = apply(&injected, &remove_from_service_account(&injected, "s"));
        assert_eq!(removed["imagePullSecrets"], json!([{"name": "s"}]));
        assert_eq!(removed["secrets"], json!([]));
    }

    #[test]
    fn removal_fails_rather_than_removing_a_moved_entry() {
        let sa = json!({"metadata": {"name": "d"}});
        let injected = apply(&sa, &for_service_account(&sa, "s"));
        let p = remove_from_service_account(&injected, "s");
        let mut moved = injected.clone();
        moved["secrets"] = json!([{"name": "other"}, {"name": "s"}]);
        assert!(json_patch::patch(&mut moved, &p).is_err());
    }
}
