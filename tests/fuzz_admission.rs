//! Fuzzing the request path that needs no I/O (decode → `decide` → encode) with
//! bounded, seeded random inputs: arbitrary bytes, and the committed corpus (`tests/corpus`)
//! mutated at random JSON paths. Whatever comes in, there is no panic, and every request that
//! decodes gets a response that is valid JSON, echoes its uid and carries a base64 JSON patch
//! that applies to the object.

use std::sync::OnceLock;

use base64::Engine;
use proptest::prelude::*;
use pull_secret_injector::admission::decide::{decide, Decision, NamespaceFacts};
use pull_secret_injector::admission::review::{self, Verdict};
use pull_secret_injector::config::Config;
use pull_secret_injector::core::namespaces::Selection;
use pull_secret_injector::settings::{Environment, Settings};
use serde_json::Value;

/// The settings each input is decided under: every injection mode and identity scope.
fn settings() -> &'static [Settings] {
    static SETTINGS: OnceLock<Vec<Settings>> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        [
            "",
            "inject: matchingImages\n",
            "identityScope: serviceAccount\n",
        ]
        .iter()
        .map(|extra| {
            let yaml = format!(
                "tls: {{certFile: a, keyFile: b}}\nregistries: [{{host: registry.example.com, \
                     kubernetes: {{audience: a}}}}]\n{extra}"
            );
            Settings::new(Config::from_yaml(&yaml).unwrap(), &Environment::default()).unwrap()
        })
        .collect()
    })
}

fn corpus() -> Vec<Value> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut docs: Vec<Value> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| std::fs::read(e.unwrap().path()).ok())
        .filter_map(|b| serde_json::from_slice(&b).ok())
        .collect();
    docs.sort_by_key(|d| d.to_string());
    assert!(docs.len() >= 4, "the corpus is committed with the tests");
    docs
}

/// The handler's pure path, as `webhook::Webhook::review` runs it for an opted-in namespace
/// whose Secret is ready: the same `decide`.
fn handle(body: &[u8]) {
    let Ok(review) = review::decode(body) else {
        return;
    };
    let facts = NamespaceFacts {
        opted_in: true,
        selection: Selection {
            hosts: vec!["registry.example.com".into()],
            unknown: vec![],
        },
    };
    for settings in settings() {
        let verdict = match decide(&review, body, &facts, settings) {
            Decision::Answer(verdict, _) => verdict,
            Decision::Provision { patch, .. } => Verdict::patched(patch),
        };
        check(body, &review, &verdict);
    }
}

fn check(body: &[u8], review: &review::Review, verdict: &Verdict) {
    let out: Value =
        serde_json::from_slice(&review::encode(review, verdict)).expect("response is JSON");
    assert_eq!(out["response"]["uid"], review.request.uid.as_str());
    assert_eq!(out["response"]["allowed"], true);
    if let Some(p) = out["response"]["patch"].as_str() {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(p)
            .expect("patch is base64");
        let patch: json_patch::Patch =
            serde_json::from_slice(&bytes).expect("patch is a JSON patch");
        let body: Value = serde_json::from_slice(body).expect("a decoded body is JSON");
        let mut object = body["request"]["object"].clone();
        json_patch::patch(&mut object, &patch).expect("patch applies to the object");
    }
}

fn junk() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "[a-zA-Z0-9/_.-]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every JSON pointer into `doc`.
fn pointers(doc: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match doc {
        Value::Object(m) => m.iter().for_each(|(k, v)| {
            pointers(
                v,
                format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                out,
            )
        }),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| pointers(v, format!("{at}/{i}"), out)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        handle(&bytes);
    }

    #[test]
    fn mutated_reviews_get_valid_answers(seed in 0usize..1000, which in 0usize..1000, replacement in junk(), delete in any::<bool>()) {
        let docs = corpus();
        let mut doc = docs[seed % docs.len()].clone();
        let mut ps = Vec::new();
        pointers(&doc, String::new(), &mut ps);
        let target = &ps[which % ps.len()];
        if target.is_empty() {
            doc = replacement;
        } else if delete {
            let (parent, key) = target.rsplit_once('/').unwrap();
            match doc.pointer_mut(parent) {
                Some(Value::Object(m)) => { m.remove(&key.replace("~1", "/").replace("~0", "~")); }
                Some(Value::Array(a)) => { if let Ok(i) = key.parse::<usize>() { if i < a.len() { a.remove(i); } } }
                _ => {}
            }
        } else if let Some(slot) = doc.pointer_mut(target) {
            *slot = replacement;
        }
        handle(&serde_json::to_vec(&doc).unwrap());
    }
}

#[test]
fn the_corpus_itself_is_answered() {
    for doc in corpus() {
        handle(&serde_json::to_vec(&doc).unwrap());
    }
    handle(
        &std::fs::read(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/truncated.json"),
        )
        .unwrap(),
    );
}
