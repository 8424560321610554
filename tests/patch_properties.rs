//! Properties of the patches over arbitrary Pod and ServiceAccount shapes: they always apply,
//! add the reference exactly when it is missing, keep every entry a user wrote in its place,
//! and a second application changes nothing.

use proptest::prelude::*;
use pull_secret_injector::core::patch;
use serde_json::{json, Value};

const SECRET: &str = "pull-secret";

fn entry() -> impl Strategy<Value = Value> {
    prop_oneof![
        prop::sample::select(vec!["a", "b", SECRET, "pull-secret-2", ""])
            .prop_map(|n| json!({ "name": n })),
        Just(json!({})),
        Just(json!({"name": null})),
    ]
}

/// A list field as found in the wild: absent, null, a list of references, or junk.
fn list() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        prop::collection::vec(entry(), 0..6).prop_map(|v| Some(Value::Array(v))),
        Just(Some(json!("not-a-list"))),
        Just(Some(json!({"name": SECRET}))),
    ]
}

fn annotations() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        Just(Some(json!({"team": "a"}))),
        Just(Some(json!({})))
    ]
}

fn pod() -> impl Strategy<Value = Value> {
    (list(), any::<bool>()).prop_map(|(pulls, has_spec)| {
        let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}});
        if has_spec {
            pod["spec"] =
                json!({"containers": [{"name": "c", "image": "registry.example.com/app"}]});
            if let Some(p) = pulls {
                pod["spec"]["imagePullSecrets"] = p;
            }
        }
        pod
    })
}

fn service_account() -> impl Strategy<Value = Value> {
    (list(), list(), annotations()).prop_map(|(pulls, secrets, ann)| {
        let mut sa =
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "sa"}});
        if let Some(p) = pulls {
            sa["imagePullSecrets"] = p;
        }
        if let Some(s) = secrets {
            sa["secrets"] = s;
        }
        if let Some(a) = ann {
            sa["metadata"]["annotations"] = a;
        }
        sa
    })
}

fn apply(doc: &Value, p: &json_patch::Patch) -> Value {
    let mut out = doc.clone();
    json_patch::patch(&mut out, p)
        .unwrap_or_else(|e| panic!("patch {p:?} does not apply to {doc}: {e}"));
    out
}

fn names(list: &Value) -> Vec<Value> {
    list.as_array().cloned().unwrap_or_default()
}

fn has(list: &Value) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|e| e["name"] == SECRET))
}

/// The list after patching keeps the user's entries, in order, at its start.
fn keeps_user_entries(before: &Value, after: &Value) -> bool {
    let (b, a) = (names(before), names(after));
    !before.is_array() || (a.len() >= b.len() && a[..b.len()] == b[..])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn pod_patch_applies_adds_once_keeps_order_and_is_idempotent(pod in pod()) {
        let p = patch::for_pod(&pod, SECRET);
        let after = apply(&pod, &p);
        if pod.get("spec").is_none() {
            prop_assert!(p.0.is_empty());
            return Ok(());
        }
        let (before_list, after_list) = (&pod["spec"]["imagePullSecrets"], &after["spec"]["imagePullSecrets"]);
        prop_assert!(has(after_list), "reference missing after patch: {after}");
        if has(before_list) {
            prop_assert!(p.0.is_empty(), "patched although the reference was there");
        }
        prop_assert!(keeps_user_entries(before_list, after_list), "{before_list} -> {after_list}");
        prop_assert!(patch::for_pod(&after, SECRET).0.is_empty(), "not idempotent: {after}");
    }

    #[test]
    fn service_account_patch_and_its_removal(sa in service_account()) {
        let p = patch::for_service_account(&sa, SECRET);
        let after = apply(&sa, &p);
        for field in ["imagePullSecrets", "secrets"] {
            prop_assert!(has(&after[field]), "{field} lacks the reference: {after}");
            prop_assert!(keeps_user_entries(&sa[field], &after[field]), "{field}: {} -> {}", sa[field], after[field]);
        }
        prop_assert!(patch::for_service_account(&after, SECRET).0.is_empty(), "not idempotent: {after}");

        // Taking it back leaves exactly the references the user had.
        let removed = apply(&after, &patch::remove_from_service_account(&after, SECRET));
        for field in ["imagePullSecrets", "secrets"] {
            if sa[field].is_array() {
                prop_assert_eq!(&removed[field], &sa[field], "{} after removal", field);
            } else {
                prop_assert!(!has(&removed[field]), "{field}: {}", removed[field]);
            }
        }
        prop_assert!(removed["metadata"]["annotations"].get(patch::INJECTED_ANNOTATION).is_none());
    }
}
