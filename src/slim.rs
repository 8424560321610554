//! What the watches decode of the objects they follow: the fields their checks read, nothing
//! else. A watch of every Pod (or ServiceAccount, Namespace) of a large cluster would otherwise
//! decode each object in full, managed fields and all, at every list and event, only to read
//! a few fields. `Slim<K>` decodes into a `K` only what the checks of `K` read, so those
//! checks still take `&K`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateWaiting, ContainerStatus, LocalObjectReference,
    Namespace, ObjectReference, Pod, PodSpec, PodStatus, Secret, ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::ByteString;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;

use crate::core::namespaces::REGISTRIES_ANNOTATION;
use crate::core::pods::MIRROR_ANNOTATION;

/// A `K` decoded with only the fields its checks read.
#[derive(Clone, Debug)]
pub(crate) struct Slim<K>(pub K);

/// How a kind is decoded slim.
pub(crate) trait Slimmed: Sized {
    fn decode<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error>;
}

impl<'de, K: Slimmed> Deserialize<'de> for Slim<K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        K::decode(d).map(Slim)
    }
}

impl<K: kube::Resource<DynamicType = ()>> kube::Resource for Slim<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

/// Which label and annotation keys are kept, and whether owner references and finalizers are.
/// The rest of the metadata kept is what every watch needs: name, namespace, uid,
/// resourceVersion (a watch resumes from it) and deletionTimestamp.
#[derive(Clone, Copy)]
struct Keep {
    label: fn(&str) -> bool,
    annotation: fn(&str) -> bool,
    owners: bool,
    finalizers: bool,
}

fn none(_: &str) -> bool {
    false
}

fn all(_: &str) -> bool {
    true
}

impl<'de> DeserializeSeed<'de> for Keep {
    type Value = ObjectMeta;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<ObjectMeta, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Keep {
    type Value = ObjectMeta;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("object metadata")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ObjectMeta, A::Error> {
        let mut meta = ObjectMeta::default();
        while let Some(key) = map.next_key::<Key>()? {
            match key.0.as_ref() {
                "name" => meta.name = map.next_value()?,
                "namespace" => meta.namespace = map.next_value()?,
                "uid" => meta.uid = map.next_value()?,
                "resourceVersion" => meta.resource_version = map.next_value()?,
                "deletionTimestamp" => {
                    meta.deletion_timestamp = map.next_value::<Option<Time>>()?
                }
                "labels" => meta.labels = map.next_value_seed(Only::new(self.label))?,
                "annotations" => {
                    meta.annotations = map.next_value_seed(Only::new(self.annotation))?
                }
                "ownerReferences" if self.owners => meta.owner_references = map.next_value()?,
                "finalizers" if self.finalizers => meta.finalizers = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(meta)
    }
}

/// A map key, borrowed from the input where it can be.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A map (or null) of which only the entries whose key passes are decoded; `None` when none do.
struct Only<V> {
    keep: fn(&str) -> bool,
    value: PhantomData<V>,
}

impl<V> Only<V> {
    fn new(keep: fn(&str) -> bool) -> Self {
        Self {
            keep,
            value: PhantomData,
        }
    }
}

impl<'de, V: Deserialize<'de>> DeserializeSeed<'de> for Only<V> {
    type Value = Option<BTreeMap<String, V>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de, V: Deserialize<'de>> Visitor<'de> for Only<V> {
    type Value = Option<BTreeMap<String, V>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map or null")
    }

    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut kept = BTreeMap::new();
        while let Some(key) = map.next_key::<Key>()? {
            if (self.keep)(&key.0) {
                kept.insert(key.0.into_owned(), map.next_value()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok((!kept.is_empty()).then_some(kept))
    }
}

/// `{"name": ...}` of a list of references.
#[derive(Deserialize)]
struct Named {
    #[serde(default)]
    name: Option<String>,
}

fn names<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    let list = Option::<Vec<Named>>::deserialize(d)?;
    Ok(list.map(|l| l.into_iter().map(|n| n.name.unwrap_or_default()).collect()))
}

macro_rules! meta_with {
    ($name:ident, $label:expr, $annotation:expr) => {
        meta_with!($name, $label, $annotation, false, false);
    };
    ($name:ident, $label:expr, $annotation:expr, $owners:expr, $finalizers:expr) => {
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
            Keep {
                label: $label,
                annotation: $annotation,
                owners: $owners,
                finalizers: $finalizers,
            }
            .deserialize(d)
        }
    };
}

// Pods: whether it is a mirror Pod (`core::pods`), its controller and its labels (which
// PodDisruptionBudgets select by, `core::remediation`).
meta_with!(pod_meta, all, |k| k == MIRROR_ANNOTATION, true, false);
// ServiceAccounts: whether they list the Secret is in their lists, not their metadata.
meta_with!(account_meta, none, none);
// Managed Secrets: all that a replace sets, so that `layout::Written` of the watched Secret is
// that of the stored one (a write that would change nothing is skipped by it); only managed
// fields are left out. The watch keeps a summary, not the Secret.
meta_with!(secret_meta, all, all, true, true);
// Namespaces: every label (the selector may name any), the registry selection.
meta_with!(namespace_meta, all, |k| k == REGISTRIES_ANNOTATION);

impl Slimmed for Pod {
    fn decode<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(default, deserialize_with = "pod_meta")]
            metadata: ObjectMeta,
            #[serde(default)]
            spec: Option<Spec>,
            #[serde(default)]
            status: Option<Status>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Spec {
            #[serde(default)]
            service_account_name: Option<String>,
            #[serde(default, deserialize_with = "names")]
            image_pull_secrets: Option<Vec<String>>,
            #[serde(default)]
            containers: Option<Vec<Image>>,
            #[serde(default)]
            init_containers: Option<Vec<Image>>,
        }
        #[derive(Deserialize)]
        struct Image {
            #[serde(default)]
            image: Option<String>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Status {
            #[serde(default)]
            phase: Option<String>,
            #[serde(default)]
            container_statuses: Option<Vec<Waiting>>,
            #[serde(default)]
            init_container_statuses: Option<Vec<Waiting>>,
        }
        // `state.waiting.reason` of a container status (`core::remediation`).
        #[derive(Deserialize)]
        struct Waiting {
            #[serde(default)]
            state: Option<State>,
        }
        #[derive(Deserialize)]
        struct State {
            #[serde(default)]
            waiting: Option<Reason>,
        }
        #[derive(Deserialize)]
        struct Reason {
            #[serde(default)]
            reason: Option<String>,
        }
        let statuses = |list: Option<Vec<Waiting>>| -> Option<Vec<ContainerStatus>> {
            list.map(|l| {
                l.into_iter()
                    .map(|c| ContainerStatus {
                        state: c.state.map(|s| ContainerState {
                            waiting: s.waiting.map(|w| ContainerStateWaiting {
                                reason: w.reason,
                                message: None,
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect()
            })
        };
        let containers = |list: Option<Vec<Image>>| -> Vec<Container> {
            list.into_iter()
                .flatten()
                .map(|c| Container {
                    image: c.image,
                    ..Default::default()
                })
                .collect()
        };
        let f = Fields::deserialize(d)?;
        Ok(Pod {
            metadata: f.metadata,
            spec: f.spec.map(|s| PodSpec {
                service_account_name: s.service_account_name,
                image_pull_secrets: s.image_pull_secrets.map(|l| {
                    l.into_iter()
                        .map(|name| LocalObjectReference { name })
                        .collect()
                }),
                init_containers: s.init_containers.map(|l| containers(Some(l))),
                containers: containers(s.containers),
                ..Default::default()
            }),
            status: f.status.map(|s| PodStatus {
                phase: s.phase,
                container_statuses: statuses(s.container_statuses),
                init_container_statuses: statuses(s.init_container_statuses),
                ..Default::default()
            }),
        })
    }
}

impl Slimmed for ServiceAccount {
    fn decode<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Fields {
            #[serde(default, deserialize_with = "account_meta")]
            metadata: ObjectMeta,
            #[serde(default, deserialize_with = "names")]
            image_pull_secrets: Option<Vec<String>>,
            #[serde(default, deserialize_with = "names")]
            secrets: Option<Vec<String>>,
        }
        let f = Fields::deserialize(d)?;
        Ok(ServiceAccount {
            metadata: f.metadata,
            image_pull_secrets: f.image_pull_secrets.map(|l| {
                l.into_iter()
                    .map(|name| LocalObjectReference { name })
                    .collect()
            }),
            secrets: f.secrets.map(|l| {
                l.into_iter()
                    .map(|name| ObjectReference {
                        name: Some(name),
                        ..Default::default()
                    })
                    .collect()
            }),
            automount_service_account_token: None,
        })
    }
}

impl Slimmed for Secret {
    fn decode<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(default, deserialize_with = "secret_meta")]
            metadata: ObjectMeta,
            #[serde(default, rename = "type")]
            type_: Option<String>,
            #[serde(default)]
            data: Option<BTreeMap<String, ByteString>>,
            #[serde(default)]
            immutable: Option<bool>,
        }
        let f = Fields::deserialize(d)?;
        Ok(Secret {
            metadata: f.metadata,
            type_: f.type_,
            data: f.data,
            immutable: f.immutable,
            ..Default::default()
        })
    }
}

impl Slimmed for Namespace {
    fn decode<'de, D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Fields {
            #[serde(default, deserialize_with = "namespace_meta")]
            metadata: ObjectMeta,
        }
        let f = Fields::deserialize(d)?;
        Ok(Namespace {
            metadata: f.metadata,
            ..Default::default()
        })
    }
}

/// The same event with the slim wrapper taken off.
pub(crate) fn unwrap<K>(
    event: kube::runtime::watcher::Event<Slim<K>>,
) -> kube::runtime::watcher::Event<K> {
    use kube::runtime::watcher::Event;
    match event {
        Event::Apply(o) => Event::Apply(o.0),
        Event::Delete(o) => Event::Delete(o.0),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(o.0),
        Event::InitDone => Event::InitDone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slim<K: Slimmed>(v: serde_json::Value) -> K {
        serde_json::from_value::<Slim<K>>(v).expect("decodes").0
    }

    fn managed_fields() -> serde_json::Value {
        json!([{"manager": "kubectl", "operation": "Update", "apiVersion": "v1",
                "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}])
    }

    #[test]
    fn a_pod_keeps_what_the_checks_read() {
        let pod: Pod = slim(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "team", "uid": "u1", "resourceVersion": "7",
                         "deletionTimestamp": "2026-12-01T00:00:00Z",
                         "labels": {"app": "a"},
                         "annotations": {"kubernetes.io/config.mirror": "x", "other": "y"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "rs", "uid": "u2", "controller": true}],
                         "finalizers": ["example.com/f"],
                         "managedFields": managed_fields()},
            "spec": {"serviceAccountName": "builder", "imagePullSecrets": [{"name": "pull-secret"}],
                     "containers": [{"name": "c", "image": "registry.example.com/app",
                                     "env": [{"name": "A", "value": "b"}]}],
                     "initContainers": [{"name": "i", "image": "init"}],
                     "volumes": [{"name": "v", "emptyDir": {}}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "c", "image": "i", "imageID": "x",
                           "ready": false, "restartCount": 3, "started": false,
                           "state": {"waiting": {"reason": "ImagePullBackOff",
                                                 "message": "Back-off pulling image"}},
                           "lastState": {"terminated": {"exitCode": 1}}}]}
        }));
        let expected: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "team", "uid": "u1", "resourceVersion": "7",
                         "deletionTimestamp": "2026-12-01T00:00:00Z",
                         "labels": {"app": "a"},
                         "annotations": {"kubernetes.io/config.mirror": "x"},
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                              "name": "rs", "uid": "u2", "controller": true}]},
            "spec": {"serviceAccountName": "builder", "imagePullSecrets": [{"name": "pull-secret"}],
                     "containers": [{"name": "", "image": "registry.example.com/app"}],
                     "initContainers": [{"name": "", "image": "init"}]},
            "status": {"phase": "Running",
                       "containerStatuses": [{"name": "", "image": "", "imageID": "",
                           "ready": false, "restartCount": 0,
                           "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}
        }))
        .unwrap();
        assert_eq!(pod, expected);
    }

    #[test]
    fn absent_and_null_fields_stay_absent() {
        let pod: Pod = slim(json!({
            "metadata": {"name": "p", "labels": null, "annotations": {"other": "y"}},
            "spec": {"containers": [], "imagePullSecrets": null},
        }));
        assert_eq!(
            pod.metadata.annotations, None,
            "no annotation kept: none at all"
        );
        assert_eq!(pod.metadata.labels, None);
        let spec = pod.spec.unwrap();
        assert_eq!(spec.image_pull_secrets, None);
        assert_eq!(spec.init_containers, None);
        assert_eq!(pod.status, None);
        let bare: Pod = slim(json!({}));
        assert_eq!(bare, Pod::default());
    }

    #[test]
    fn a_service_account_keeps_its_lists() {
        let sa: ServiceAccount = slim(json!({
            "metadata": {"name": "default", "namespace": "team", "resourceVersion": "3",
                         "annotations": {"pull-secret-injector.io/injected-into": "imagePullSecrets"},
                         "managedFields": managed_fields()},
            "imagePullSecrets": [{"name": "pull-secret"}],
            "secrets": [{"name": "token", "namespace": "team"}]
        }));
        let expected: ServiceAccount = serde_json::from_value(json!({
            "metadata": {"name": "default", "namespace": "team", "resourceVersion": "3"},
            "imagePullSecrets": [{"name": "pull-secret"}],
            "secrets": [{"name": "token"}]
        }))
        .unwrap();
        assert_eq!(sa, expected);
    }

    #[test]
    fn a_managed_secret_is_read_as_stored_but_for_managed_fields() {
        use crate::core::credential::{Credential, Sensitive};
        use crate::secret::layout;
        let now = jiff::Timestamp::now();
        let credential = Credential {
            username: "u".into(),
            password: Sensitive::new("p"),
            issued_at: now,
            expires_at: now + jiff::SignedDuration::from_hours(1),
        };
        let (full, _) = layout::build("team", "pull-secret", &[("r.example".into(), credential)]);
        let mut stored = serde_json::to_value(&full).unwrap();
        // What the API server and users add: a version, an owner (serviceAccount scope),
        // someone else's label, annotation, finalizer and key.
        stored["metadata"]["resourceVersion"] = json!("9");
        stored["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1",
            "kind": "ServiceAccount", "name": "builder", "uid": "u1"}]);
        stored["metadata"]["labels"]["team"] = json!("a");
        stored["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
            json!("{}");
        stored["metadata"]["finalizers"] = json!(["example.com/keep"]);
        stored["data"]["extra"] = json!("eA==");
        let as_stored: Secret = serde_json::from_value(stored.clone()).unwrap();
        stored["metadata"]["managedFields"] = managed_fields();
        let secret: Secret = slim(stored);
        assert_eq!(secret, as_stored, "only the managed fields are left out");
        // The watch's summary of it is that of the stored Secret: a write is skipped only
        // when it would really change nothing.
        assert_eq!(layout::seen(&secret), layout::seen(&as_stored));
        assert!(matches!(
            layout::assess(Some(&secret)),
            layout::Assessment::Intact(_)
        ));
    }

    #[test]
    fn a_namespace_keeps_its_labels_and_registry_selection() {
        let ns: Namespace = slim(json!({
            "metadata": {"name": "team", "uid": "u", "resourceVersion": "5",
                         "labels": {"pull-secret-injector.io/inject": "enabled", "team": "a"},
                         "annotations": {REGISTRIES_ANNOTATION: "r.example", "other": "x"},
                         "managedFields": managed_fields()},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        }));
        let expected: Namespace = serde_json::from_value(json!({
            "metadata": {"name": "team", "uid": "u", "resourceVersion": "5",
                         "labels": {"pull-secret-injector.io/inject": "enabled", "team": "a"},
                         "annotations": {REGISTRIES_ANNOTATION: "r.example"}}
        }))
        .unwrap();
        assert_eq!(ns, expected);
    }

    #[test]
    fn escaped_keys_are_read_too() {
        // serde_json borrows keys from the input unless they hold escapes.
        let text = r#"{"metadata": {"na\u006de": "p", "annotations": {"kubernetes.io\/config.mirror": "x"}}}"#;
        let pod = serde_json::from_str::<Slim<Pod>>(text).unwrap().0;
        assert_eq!(pod.metadata.name.as_deref(), Some("p"));
        assert!(pod.metadata.annotations.is_some());
    }
}
