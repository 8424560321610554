//! The AdmissionReview wire format: `decode` a request (and `images`, the Pod's images, read
//! without building the object), `encode` the response, and `patch_for` the object reviewed.
//! What to answer is `decide`'s. The exact JSON of a response is pinned by tests, because the API
//! server expects `patch` as base64 (a byte array serialised as numbers is a known pitfall).

use base64::Engine;
use json_patch::Patch;
use serde::Deserialize;
use serde_json::Value;

use crate::core::patch;

pub(crate) const V1: &str = "admission.k8s.io/v1";
pub(crate) const V1BETA1: &str = "admission.k8s.io/v1beta1";

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
        image_pull_secrets: References = "imagePullSecrets",
        secrets: References = "secrets",
    }
}

object_view! {
    /// Container lists are not read here (see [`images`]): walking every key of every container
    /// costs more than skipping over them, and most admissions never look.
    SpecView {
        image_pull_secrets: References = "imagePullSecrets",
        service_account_name: String = "serviceAccountName",
    }
}

/// The longest reference list (`imagePullSecrets`, `secrets`) a review may carry. A Pod with
/// hundreds of thousands of entries passes the API server's size limit; reading them costs
/// memory in proportion, so such a review is answered, unchanged, with a warning.
pub(crate) const MAX_REFERENCES: usize = 1024;

/// A reference list reduced to the names it holds: what a patch needs (is it a list, is our
/// Secret in it), never a JSON tree of its entries.
#[derive(Debug, Default)]
pub(crate) enum References {
    /// Not a list (a list is made in its place, as for an absent one).
    #[default]
    NotAList,
    /// The `name` of each entry that has one (names longer than any Kubernetes name are left
    /// out: they cannot be ours).
    Names(Vec<Box<str>>),
    /// More than [`MAX_REFERENCES`] entries: skipped unread.
    TooLong,
}

impl References {
    fn holds(&self, name: &str) -> bool {
        matches!(self, Self::Names(names) if names.iter().any(|n| &**n == name))
    }
}

/// Deserialises anything, keeping nothing: for values whose shape only matters when it is the
/// expected one.
macro_rules! accept_any_other {
    ($value:expr) => {
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

impl<'de> Deserialize<'de> for References {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = References;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of references")
            }
            accept_any_other!(References::NotAList);
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<References, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(References::NotAList)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<References, A::Error> {
                let mut names = Vec::new();
                let mut count = 0usize;
                while count <= MAX_REFERENCES {
                    match seq.next_element::<ReferenceName>()? {
                        Some(ReferenceName(Some(name))) => names.push(name),
                        Some(ReferenceName(None)) => {}
                        None => return Ok(References::Names(names)),
                    }
                    count += 1;
                }
                // Too long: the rest is skipped without keeping anything.
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(References::TooLong)
            }
        }
        d.deserialize_any(Visit)
    }
}

/// One entry's `name`, when it is an object with a string name of Kubernetes length.
struct ReferenceName(Option<Box<str>>);

impl<'de> Deserialize<'de> for ReferenceName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ReferenceName;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a reference")
            }
            accept_any_other!(ReferenceName(None));
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<ReferenceName, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(ReferenceName(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<ReferenceName, A::Error> {
                let mut name = None;
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == "name" {
                        name = map.next_value::<StringOrOther>()?.0;
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(ReferenceName(name.filter(|n| n.len() <= 253)))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// A string value, or `None` for a value of any other type.
struct StringOrOther(Option<Box<str>>);

impl<'de> Deserialize<'de> for StringOrOther {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = StringOrOther;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E>(self, v: &str) -> Result<StringOrOther, E> {
                Ok(StringOrOther(Some(v.into())))
            }
            fn visit_bool<E>(self, _: bool) -> Result<StringOrOther, E> {
                Ok(StringOrOther(None))
            }
            fn visit_i64<E>(self, _: i64) -> Result<StringOrOther, E> {
                Ok(StringOrOther(None))
            }
            fn visit_u64<E>(self, _: u64) -> Result<StringOrOther, E> {
                Ok(StringOrOther(None))
            }
            fn visit_f64<E>(self, _: f64) -> Result<StringOrOther, E> {
                Ok(StringOrOther(None))
            }
            fn visit_unit<E>(self) -> Result<StringOrOther, E> {
                Ok(StringOrOther(None))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<StringOrOther, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(StringOrOther(None))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<StringOrOther, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(StringOrOther(None))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// `metadata.annotations` reduced to whether it is an object and the one annotation a patch
/// reads (which lists this service added to); other values are skipped unread.
#[derive(Debug, Default)]
pub(crate) struct Annotations {
    is_object: bool,
    injected_into: Option<Box<str>>,
}

impl<'de> Deserialize<'de> for Annotations {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Annotations;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("annotations")
            }
            accept_any_other!(Annotations::default());
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Annotations, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Annotations::default())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Annotations, A::Error> {
                let mut out = Annotations {
                    is_object: true,
                    injected_into: None,
                };
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    if key == patch::INJECTED_ANNOTATION {
                        out.injected_into = map.next_value::<StringOrOther>()?.0;
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_any(Visit)
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
pub(crate) fn images(body: &[u8]) -> Result<Vec<String>, ReviewError> {
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
    MetadataView { name: String = "name", annotations: Annotations = "annotations" }
}

impl ObjectView {
    /// The ServiceAccount a Pod runs as (the API server sets `default` before webhooks run).
    pub(crate) fn pod_service_account(&self) -> &str {
        self.spec
            .as_ref()
            .and_then(|s| s.service_account_name.as_deref())
            .filter(|n| !n.is_empty())
            .unwrap_or("default")
    }

    /// `metadata.name`, empty when the object is named by `generateName`.
    pub(crate) fn name(&self) -> &str {
        self.metadata
            .as_ref()
            .and_then(|m| m.name.as_deref())
            .unwrap_or("")
    }

    /// Which reference list holds more than [`MAX_REFERENCES`] entries, if one does.
    pub(crate) fn too_long_list(&self) -> Option<&'static str> {
        let too_long = |r: &Option<References>| matches!(r, Some(References::TooLong));
        if self
            .spec
            .as_ref()
            .is_some_and(|s| too_long(&s.image_pull_secrets))
        {
            Some("spec.imagePullSecrets")
        } else if too_long(&self.image_pull_secrets) {
            Some("imagePullSecrets")
        } else if too_long(&self.secrets) {
            Some("secrets")
        } else {
            None
        }
    }

    /// The object reduced to what the patch functions read about `secret`, in their JSON
    /// shape: each list as empty or holding only `secret`, the annotations as the marker alone.
    /// A few bytes, whatever the review's size.
    pub(crate) fn to_value(&self, secret: &str) -> Value {
        let mut object = serde_json::Map::new();
        let put = |map: &mut serde_json::Map<String, Value>, key: &str, v: &Option<References>| {
            match v {
                Some(r @ References::Names(_)) => {
                    let ours = r
                        .holds(secret)
                        .then(|| serde_json::json!({ "name": secret }));
                    map.insert(key.to_string(), Value::Array(ours.into_iter().collect()));
                }
                // Not a list: the patch makes one, as for an absent list.
                Some(References::NotAList) | None => {}
                // Refused before a patch is made (`too_long_list`).
                Some(References::TooLong) => {
                    map.insert(key.to_string(), Value::Array(Vec::new()));
                }
            }
        };
        if let Some(spec) = &self.spec {
            let mut s = serde_json::Map::new();
            put(&mut s, "imagePullSecrets", &spec.image_pull_secrets);
            object.insert("spec".into(), Value::Object(s));
        }
        if let Some(meta) = &self.metadata {
            let mut m = serde_json::Map::new();
            if let Some(a) = meta.annotations.as_ref().filter(|a| a.is_object) {
                let mut annotations = serde_json::Map::new();
                if let Some(v) = &a.injected_into {
                    annotations.insert(patch::INJECTED_ANNOTATION.into(), Value::from(&**v));
                }
                m.insert("annotations".into(), Value::Object(annotations));
            }
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
pub(crate) enum Target {
    Pod,
    ServiceAccount,
}

impl Target {
    pub(crate) fn as_str(self) -> &'static str {
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
    pub(crate) fn target(&self) -> Option<Target> {
        if self.operation != "CREATE" || !self.kind.group.is_empty() || self.kind.version != "v1" {
            return None;
        }
        match self.kind.kind.as_str() {
            "Pod" => Some(Target::Pod),
            "ServiceAccount" => Some(Target::ServiceAccount),
            _ => None,
        }
    }

    pub(crate) fn is_dry_run(&self) -> bool {
        self.dry_run.unwrap_or(false)
    }
}

pub(crate) fn patch_for(target: Target, object: &ObjectView, secret_name: &str) -> Patch {
    let object = object.to_value(secret_name);
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
    pub(crate) fn unchanged() -> Self {
        Self::default()
    }

    pub fn patched(patch: Patch) -> Self {
        Self {
            patch: (!patch.0.is_empty()).then_some(patch),
            warnings: Vec::new(),
        }
    }

    pub(crate) fn warn(mut self, warning: impl Into<String>) -> Self {
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
            view.to_value("mine"),
            json!({"metadata": {"annotations": {}}, "imagePullSecrets": [{"name": "mine"}]})
        );
        assert_eq!(
            view.to_value("pull-secret"),
            json!({"metadata": {"annotations": {}}, "imagePullSecrets": []})
        );
        let pod = review(
            "Pod",
            "CREATE",
            json!({"spec": {"containers": [{"name": "c"}], "imagePullSecrets": [{"name": "x"}, 7, {"name": 1}]}}),
        );
        assert_eq!(
            decode(&pod).unwrap().request.object.unwrap().to_value("x"),
            json!({"spec": {"imagePullSecrets": [{"name": "x"}]}})
        );
        let marked = review(
            "ServiceAccount",
            "CREATE",
            json!({"metadata": {"name": "sa", "annotations": {patch::INJECTED_ANNOTATION: "secrets", "big": "x".repeat(1000)}},
                   "secrets": {"not": "a list"}}),
        );
        assert_eq!(
            decode(&marked)
                .unwrap()
                .request
                .object
                .unwrap()
                .to_value("s"),
            json!({"metadata": {"annotations": {patch::INJECTED_ANNOTATION: "secrets"}}})
        );
    }

    /// The 230k-entry Pod of the issue, scaled: its list is counted, not kept, and said to be
    /// too long; one entry under the limit is still read.
    #[test]
    fn reference_lists_longer_than_the_limit_are_refused_unread() {
        let entries = |n: usize| {
            (0..n)
                .map(|i| json!({"name": format!("s{i}")}))
                .collect::<Vec<_>>()
        };
        let long = review(
            "Pod",
            "CREATE",
            json!({"spec": {"imagePullSecrets": entries(MAX_REFERENCES + 1)}}),
        );
        let view = decode(&long).unwrap().request.object.unwrap();
        assert_eq!(view.too_long_list(), Some("spec.imagePullSecrets"));
        let fits = review(
            "Pod",
            "CREATE",
            json!({"spec": {"imagePullSecrets": entries(MAX_REFERENCES)}}),
        );
        let view = decode(&fits).unwrap().request.object.unwrap();
        assert_eq!(view.too_long_list(), None);
        let last = format!("s{}", MAX_REFERENCES - 1);
        assert_eq!(
            view.to_value(&last),
            json!({"spec": {"imagePullSecrets": [{"name": last}]}})
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
