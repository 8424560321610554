//! The AdmissionReview wire format and the decision that needs no I/O: is this request one we
//! patch, and with what. The exact JSON of a response is pinned by tests, because the API
//! server expects `patch` as base64 (a byte array serialised as numbers is a known pitfall).

use base64::Engine;
use json_patch::Patch;
use serde::Deserialize;
use serde_json::Value;

use crate::core::patch;

pub const V1: &str = "admission.k8s.io/v1";
pub const V1BETA1: &str = "admission.k8s.io/v1beta1";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireReview {
    api_version: String,
    kind: String,
    request: Option<AdmissionRequest>,
}

/// The parts of an AdmissionRequest this service reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    pub uid: String,
    pub kind: GroupVersionKind,
    #[serde(default)]
    pub namespace: Option<String>,
    pub operation: String,
    #[serde(default)]
    pub dry_run: Option<bool>,
    #[serde(default)]
    pub object: Option<ObjectView>,
}

/// Declares a view of a JSON object that keeps only the named keys and skips the others
/// unparsed. Written out rather than derived: a derived struct would also accept a JSON array
/// (serde's sequence form), which no Kubernetes object is.
macro_rules! object_view {
    ($(#[$doc:meta])* $name:ident { $($field:ident: $ty:ty = $key:literal),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Default)]
        pub struct $name {
            $($field: Option<$ty>),*
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct Visit;
                impl<'de> serde::de::Visitor<'de> for Visit {
                    type Value = $name;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<$name, A::Error> {
                        let mut out = $name::default();
                        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                            match key.as_ref() {
                                $($key => out.$field = map.next_value()?,)*
                                _ => {
                                    map.next_value::<serde::de::IgnoredAny>()?;
                                }
                            }
                        }
                        Ok(out)
                    }
                }
                d.deserialize_map(Visit)
            }
        }
    };
}

object_view! {
    /// The parts of the admitted object a patch depends on. Everything else (containers,
    /// volumes, ...) is skipped while parsing rather than built into a JSON tree: reading the
    /// object is most of the cost of an admission.
    ObjectView {
        spec: SpecView = "spec",
        metadata: MetadataView = "metadata",
        image_pull_secrets: Value = "imagePullSecrets",
        secrets: Value = "secrets",
    }
}

object_view! {
    /// Container lists are not read here (see [`images`]): walking every key of every container
    /// costs more than skipping over them, and most admissions never look.
    SpecView {
        image_pull_secrets: Value = "imagePullSecrets",
        service_account_name: String = "serviceAccountName",
    }
}

object_view! {
    /// Of a container, only its image (for `inject: matchingImages`).
    ContainerView { image: String = "image" }
}

object_view! {
    /// `request.object.spec`'s container lists, for [`images`].
    ImagesReview { request: ImagesRequest = "request" }
}

object_view! {
    ImagesRequest { object: ImagesObject = "object" }
}

object_view! {
    ImagesObject { spec: ImagesSpec = "spec" }
}

object_view! {
    ImagesSpec {
        containers: Vec<ContainerView> = "containers",
        init_containers: Vec<ContainerView> = "initContainers",
        ephemeral_containers: Vec<ContainerView> = "ephemeralContainers",
    }
}

/// The images of a Pod's containers, init containers and ephemeral containers. Read from the
/// review's body a second time, and only when images matter (`inject: matchingImages`): the
/// common case skips the container lists unread. A list that is not a list of objects is a
/// malformed review.
pub fn images(body: &[u8]) -> Result<Vec<String>, ReviewError> {
    let review: ImagesReview = serde_json::from_slice(body)
        .map_err(|e| ReviewError::Malformed(format!("container list: {e}")))?;
    let Some(spec) = review.request.and_then(|r| r.object).and_then(|o| o.spec) else {
        return Ok(Vec::new());
    };
    let lists = [
        spec.containers,
        spec.init_containers,
        spec.ephemeral_containers,
    ];
    Ok(lists
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|c| c.image)
        .collect())
}

object_view! {
    MetadataView { name: String = "name", annotations: Value = "annotations" }
}

impl ObjectView {
    /// The ServiceAccount a Pod runs as (the API server sets `default` before webhooks run).
    pub fn pod_service_account(&self) -> &str {
        self.spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
    }

    /// `metadata.name`, empty when the object is named by `generateName`.
    pub fn name(&self) -> &str {
        self.metadata
            .as_ref()
            .and_then(|m| m.name.as_deref())
            .unwrap_or("")
    }

    /// The object reduced to the fields the patch functions read, in their JSON shape.
    pub fn to_value(&self) -> Value {
        let mut object = serde_json::Map::new();
        let put = |map: &mut serde_json::Map<String, Value>, key: &str, v: &Option<Value>| {
            if let Some(v) = v {
                map.insert(key.to_string(), v.clone());
            }
        };
        if let Some(spec) = &self.spec {
            let mut s = serde_json::Map::new();
            put(&mut s, "imagePullSecrets", &spec.image_pull_secrets);
            object.insert("spec".into(), Value::Object(s));
        }
        if let Some(meta) = &self.metadata {
            let mut m = serde_json::Map::new();
            put(&mut m, "annotations", &meta.annotations);
            object.insert("metadata".into(), Value::Object(m));
        }
        put(&mut object, "imagePullSecrets", &self.image_pull_secrets);
        put(&mut object, "secrets", &self.secrets);
        Value::Object(object)
    }
}

#[derive(Debug, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    pub version: String,
    pub kind: String,
}

/// A request that could be read, with the apiVersion its answer must carry.
#[derive(Debug)]
pub struct Review {
    pub api_version: String,
    pub request: AdmissionRequest,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("request body is not a valid AdmissionReview: {0}")]
    Malformed(String),
    #[error("unsupported AdmissionReview apiVersion {0:?}: expected {V1} or {V1BETA1}")]
    UnsupportedVersion(String),
    #[error("expected kind AdmissionReview, got {0:?}")]
    WrongKind(String),
    #[error("AdmissionReview has no request")]
    NoRequest,
}

/// The objects this service patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Pod,
    ServiceAccount,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pod => "Pod",
            Self::ServiceAccount => "ServiceAccount",
        }
    }
}

pub fn decode(body: &[u8]) -> Result<Review, ReviewError> {
    let wire: WireReview =
        serde_json::from_slice(body).map_err(|e| ReviewError::Malformed(e.to_string()))?;
    if wire.api_version != V1 && wire.api_version != V1BETA1 {
        return Err(ReviewError::UnsupportedVersion(wire.api_version));
    }
    if wire.kind != "AdmissionReview" {
        return Err(ReviewError::WrongKind(wire.kind));
    }
    let request = wire.request.ok_or(ReviewError::NoRequest)?;
    Ok(Review {
        api_version: wire.api_version,
        request,
    })
}

impl AdmissionRequest {
    /// A CREATE of a core/v1 Pod or ServiceAccount; anything else is allowed unchanged.
    pub fn target(&self) -> Option<Target> {
        if self.operation != "CREATE" || !self.kind.group.is_empty() || self.kind.version != "v1" {
            return None;
        }
        match self.kind.kind.as_str() {
            "Pod" => Some(Target::Pod),
            "ServiceAccount" => Some(Target::ServiceAccount),
            _ => None,
        }
    }

    pub fn is_dry_run(&self) -> bool {
        self.dry_run.unwrap_or(false)
    }
}

pub fn patch_for(target: Target, object: &ObjectView, secret_name: &str) -> Patch {
    let object = object.to_value();
    match target {
        Target::Pod => patch::for_pod(&object, secret_name),
        Target::ServiceAccount => patch::for_service_account(&object, secret_name),
    }
}

/// What the webhook answers. It always allows: this service never blocks a workload.
#[derive(Debug, Default)]
pub struct Verdict {
    pub patch: Option<Patch>,
    pub warnings: Vec<String>,
}

impl Verdict {
    pub fn unchanged() -> Self {
        Self::default()
    }

    pub fn patched(patch: Patch) -> Self {
        Self {
            patch: (!patch.0.is_empty()).then_some(patch),
            warnings: Vec::new(),
        }
    }

    pub fn warn(mut self, warning: impl Into<String>) -> Self {
        self.warnings.push(warning.into());
        self
    }
}

/// The AdmissionReview response body for `review`. Written out by hand rather than through a
/// serialised struct: it is a handful of fields, and this runs for every admission. Strings
/// that come from the request or from a message are escaped by `serde_json`; the patch is
/// base64, which needs no escaping.
pub fn encode(review: &Review, verdict: &Verdict) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"{\"apiVersion\":");
    push_json_str(&mut out, &review.api_version);
    out.extend_from_slice(b",\"kind\":\"AdmissionReview\",\"response\":{\"uid\":");
    push_json_str(&mut out, &review.request.uid);
    out.extend_from_slice(b",\"allowed\":true");
    if let Some(patch) = &verdict.patch {
        // A Patch is a list of operations with string paths and JSON values: it always serialises.
        let json = serde_json::to_vec(patch).unwrap_or_default();
        out.extend_from_slice(b",\"patchType\":\"JSONPatch\",\"patch\":\"");
        let start = out.len();
        out.resize(
            start + base64::encoded_len(json.len(), true).unwrap_or(0),
            0,
        );
        let written = base64::engine::general_purpose::STANDARD
            .encode_slice(&json, &mut out[start..])
            .unwrap_or(0);
        out.truncate(start + written);
        out.push(b'"');
    }
    if !verdict.warnings.is_empty() {
        out.extend_from_slice(b",\"warnings\":");
        // A list of strings always serialises.
        let _ = serde_json::to_writer(&mut out, &verdict.warnings);
    }
    out.extend_from_slice(b"}}");
    out
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Writing a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn review(kind: &str, operation: &str, object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": V1,
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": kind},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "team-a",
                "operation": operation,
                "userInfo": {"username": "admin"},
                "object": object,
                "dryRun": false
            }
        }))
        .unwrap()
    }

    #[test]
    fn response_json_is_exactly_what_the_api_server_expects() {
        let r = decode(&review(
            "Pod",
            "CREATE",
            json!({"spec": {"containers": []}}),
        ))
        .unwrap();
        let target = r.request.target().unwrap();
        let verdict = Verdict::patched(patch_for(
            target,
            r.request.object.as_ref().unwrap(),
            "pull-secret",
        ));
        let body: Value = serde_json::from_slice(&encode(&r, &verdict)).unwrap();
        assert_eq!(
            body,
            json!({
                "apiVersion": "admission.k8s.io/v1",
                "kind": "AdmissionReview",
                "response": {
                    "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                    "allowed": true,
                    "patchType": "JSONPatch",
                    // base64 of [{"op":"add","path":"/spec/imagePullSecrets","value":[{"name":"pull-secret"}]}]
                    "patch": "W3sib3AiOiJhZGQiLCJwYXRoIjoiL3NwZWMvaW1hZ2VQdWxsU2VjcmV0cyIsInZhbHVlIjpbeyJuYW1lIjoicHVsbC1zZWNyZXQifV19XQ=="
                }
            })
        );
    }

    #[test]
    fn unchanged_response_with_a_warning_has_no_patch() {
        let r = decode(&review("Pod", "CREATE", json!({}))).unwrap();
        let body: Value =
            serde_json::from_slice(&encode(&r, &Verdict::unchanged().warn("careful"))).unwrap();
        assert_eq!(
            body["response"],
            json!({"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": true, "warnings": ["careful"]})
        );
    }

    #[test]
    fn strings_from_the_request_and_warnings_are_escaped() {
        let mut body: Value =
            serde_json::from_slice(&review("Pod", "CREATE", json!({"spec": {}}))).unwrap();
        body["request"]["uid"] = json!("a\"b\\c\n\u{1}");
        let r = decode(&serde_json::to_vec(&body).unwrap()).unwrap();
        let verdict = Verdict::patched(patch_for(
            Target::Pod,
            r.request.object.as_ref().unwrap(),
            "s",
        ))
        .warn("say \"hi\"\n");
        let out: Value = serde_json::from_slice(&encode(&r, &verdict)).expect("the answer is JSON");
        assert_eq!(out["response"]["uid"], "a\"b\\c\n\u{1}");
        assert_eq!(out["response"]["warnings"], json!(["say \"hi\"\n"]));
        assert_eq!(out["response"]["patchType"], "JSONPatch");
    }

    #[test]
    fn empty_patch_is_sent_as_no_patch() {
        assert!(Verdict::patched(Patch(vec![])).patch.is_none());
    }

    #[test]
    fn v1beta1_is_answered_in_v1beta1() {
        let mut body: Value = serde_json::from_slice(&review("Pod", "CREATE", json!({}))).unwrap();
        body["apiVersion"] = json!(V1BETA1);
        let r = decode(&serde_json::to_vec(&body).unwrap()).unwrap();
        let out: Value = serde_json::from_slice(&encode(&r, &Verdict::unchanged())).unwrap();
        assert_eq!(out["apiVersion"], V1BETA1);
    }

    #[test]
    fn images_of_every_kind_of_container_are_read() {
        let body = review(
            "Pod",
            "CREATE",
            json!({"spec": {
                "containers": [{"name": "a", "image": "ghcr.io/a"}, {"name": "no-image"}],
                "initContainers": [{"name": "i", "image": "cgr.dev/i"}],
                "ephemeralContainers": [{"name": "d", "image": "busybox"}],
                "volumes": [{"name": "v"}]
            }}),
        );
        assert!(decode(&body).is_ok());
        assert_eq!(
            images(&body).unwrap(),
            ["ghcr.io/a", "cgr.dev/i", "busybox"]
        );
        // A container list that is not a list is named as malformed, not a panic; the review
        // itself still decodes (the list is skipped there).
        let body = review(
            "Pod",
            "CREATE",
            json!({"spec": {"containers": {"image": "x"}}}),
        );
        assert!(decode(&body).is_ok());
        let e = images(&body).unwrap_err();
        assert!(e.to_string().contains("container list"), "{e}");
    }

    #[test]
    fn only_creates_of_pods_and_service_accounts_are_targets() {
        let target = |kind, op| {
            decode(&review(kind, op, json!({})))
                .unwrap()
                .request
                .target()
        };
        assert_eq!(target("Pod", "CREATE"), Some(Target::Pod));
        assert_eq!(
            target("ServiceAccount", "CREATE"),
            Some(Target::ServiceAccount)
        );
        assert_eq!(target("Pod", "UPDATE"), None);
        assert_eq!(target("ConfigMap", "CREATE"), None);
        let mut body: Value = serde_json::from_slice(&review("Pod", "CREATE", json!({}))).unwrap();
        body["request"]["kind"]["group"] = json!("example.com");
        assert_eq!(
            decode(&serde_json::to_vec(&body).unwrap())
                .unwrap()
                .request
                .target(),
            None
        );
    }

    #[test]
    fn the_view_keeps_what_the_patches_read_and_nothing_else() {
        let body = review(
            "ServiceAccount",
            "CREATE",
            json!({
                "metadata": {"name": "sa", "labels": {"x": "y"}, "annotations": {"a": "b"}},
                "imagePullSecrets": [{"name": "mine"}], "secrets": null, "automountServiceAccountToken": false
            }),
        );
        let view = decode(&body).unwrap().request.object.unwrap();
        assert_eq!(
            view.to_value(),
            json!({"metadata": {"annotations": {"a": "b"}}, "imagePullSecrets": [{"name": "mine"}]})
        );
        let pod = review(
            "Pod",
            "CREATE",
            json!({"spec": {"containers": [{"name": "c"}], "imagePullSecrets": [{"name": "x"}]}}),
        );
        assert_eq!(
            decode(&pod).unwrap().request.object.unwrap().to_value(),
            json!({"spec": {"imagePullSecrets": [{"name": "x"}]}})
        );
    }

    #[test]
    fn bad_bodies_are_named() {
        assert!(matches!(
            decode(b"{not json"),
            Err(ReviewError::Malformed(_))
        ));
        assert!(matches!(
            decode(br#"{"apiVersion":"v1","kind":"AdmissionReview"}"#),
            Err(ReviewError::UnsupportedVersion(_))
        ));
        assert!(matches!(
            decode(br#"{"apiVersion":"admission.k8s.io/v1","kind":"Pod"}"#),
            Err(ReviewError::WrongKind(_))
        ));
        assert!(matches!(
            decode(br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#),
            Err(ReviewError::NoRequest)
        ));
        let e = decode(
            br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":1}}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
    }
}
