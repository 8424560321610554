//! What a managed pull Secret looks like, and what an existing one tells us. No I/O here: the
//! provisioner reads and writes Secrets, this module decides what to write and whether what is
//! stored can still be used.

use std::collections::BTreeMap;

use base64::Engine;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::cluster::Stamp;
use crate::core::credential::{Credential, Sensitive};

pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub(crate) const MANAGER: &str = "pull-secret-injector";
/// When the earliest credential in the Secret expires (RFC 3339).
pub const EXPIRES_AT: &str = "pull-secret-injector.io/expires-at";
/// When the credentials were minted (RFC 3339); with `EXPIRES_AT` it gives the lifetime.
pub(crate) const ISSUED_AT: &str = "pull-secret-injector.io/issued-at";
/// SHA-256 of `.dockerconfigjson` as written, to notice when someone else changed it.
pub const CONTENT_HASH: &str = "pull-secret-injector.io/content-sha256";
/// The registry hosts the Secret holds (for people and `status`).
pub(crate) const REGISTRIES: &str = "pull-secret-injector.io/registries";
/// Per registry host, when its credential was minted and when it expires (JSON), so each is
/// renewed on its own schedule and one failing source does not cost the others theirs.
pub(crate) const CREDENTIALS: &str = "pull-secret-injector.io/credentials";

pub(crate) const DOCKER_CONFIG_TYPE: &str = "kubernetes.io/dockerconfigjson";
pub(crate) const DOCKER_CONFIG_KEY: &str = ".dockerconfigjson";

/// What a usable Secret holds, as far as renewal needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issued {
    /// The earliest `issued_at` of its credentials.
    pub issued_at: Timestamp,
    /// The earliest expiry of its credentials.
    pub expires_at: Timestamp,
    pub content_sha256: String,
    /// Each registry host's credential lifetime.
    pub registries: Registries,
}

/// Each registry host's credential lifetime, by host. A sorted slice rather than a
/// `BTreeMap`: a Secret holds one or a few, and a map's node has room for eleven (640 bytes
/// per Secret, twice: the refresher's view and the provisioner's cache hold one each).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registries(Box<[(String, Lifetime)]>);

impl Registries {
    pub fn get(&self, host: &str) -> Option<&Lifetime> {
        self.0
            .binary_search_by(|(h, _)| h.as_str().cmp(host))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, host: &str) -> bool {
        self.get(host).is_some()
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(h, _)| h)
    }

    pub fn values(&self) -> impl Iterator<Item = &Lifetime> {
        self.0.iter().map(|(_, l)| l)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// By host; a host given twice keeps its last lifetime, as a map's `collect` would.
impl FromIterator<(String, Lifetime)> for Registries {
    fn from_iter<I: IntoIterator<Item = (String, Lifetime)>>(iter: I) -> Self {
        let sorted: BTreeMap<String, Lifetime> = iter.into_iter().collect();
        Self(sorted.into_iter().collect())
    }
}

impl serde::Serialize for Registries {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(h, l)| (h, l)))
    }
}

impl<'de> serde::Deserialize<'de> for Registries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(BTreeMap::<String, Lifetime>::deserialize(d)?
            .into_iter()
            .collect())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lifetime {
    pub issued_at: Timestamp,
    pub expires_at: Timestamp,
}

impl Issued {
    /// One registry's lifetime for all of the Secret (tests, benchmarks).
    pub fn single(host: &str, issued_at: Timestamp, expires_at: Timestamp) -> Self {
        let registries = Registries::from_iter([(
            host.to_string(),
            Lifetime {
                issued_at,
                expires_at,
            },
        )]);
        Issued {
            issued_at,
            expires_at,
            content_sha256: String::new(),
            registries,
        }
    }
}

/// The state of the Secret found under the configured name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assessment {
    Missing,
    /// Someone else's Secret: never overwritten, never deleted.
    Foreign,
    /// Ours, but its data no longer matches what we wrote.
    Tampered,
    /// Ours, but its annotations are unreadable (or written by an older version).
    Outdated,
    /// Ours and intact; whether it is due for renewal is `renewal`'s call.
    Intact(Issued),
}

pub(crate) fn is_managed(secret: &Secret) -> bool {
    secret
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .map(String::as_str)
        == Some(MANAGER)
}

/// The `.dockerconfigjson` document for one credential per registry host.
pub(crate) fn docker_config_json(credentials: &[(String, Credential)]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let auths: serde_json::Map<String, serde_json::Value> = credentials
        .iter()
        .map(|(host, c)| {
            let password = c.password.expose();
            let auth = b64.encode(format!("{}:{password}", c.username));
            (
                host.clone(),
                json!({"username": c.username, "password": password, "auth": auth}),
            )
        })
        .collect();
    // A map of strings always serialises.
    serde_json::to_vec(&json!({ "auths": auths })).unwrap_or_default()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hosts_annotation<'a>(hosts: impl IntoIterator<Item = &'a str>) -> String {
    let mut hosts: Vec<_> = hosts.into_iter().collect();
    hosts.sort_unstable();
    hosts.join(",")
}

/// The Secret to store for these credentials, and what it records about them.
pub fn build(
    namespace: &str,
    name: &str,
    credentials: &[(String, Credential)],
) -> (Secret, Issued) {
    let data = docker_config_json(credentials);
    let registries: Registries = credentials
        .iter()
        .map(|(h, c)| {
            (
                h.clone(),
                Lifetime {
                    issued_at: c.issued_at,
                    expires_at: c.expires_at,
                },
            )
        })
        .collect();
    let issued = Issued {
        issued_at: credentials
            .iter()
            .map(|(_, c)| c.issued_at)
            .min()
            .unwrap_or_else(Timestamp::now),
        expires_at: credentials
            .iter()
            .map(|(_, c)| c.expires_at)
            .min()
            .unwrap_or_else(Timestamp::now),
        content_sha256: sha256_hex(&data),
        registries,
    };
    let annotations = BTreeMap::from([
        (ISSUED_AT.to_string(), issued.issued_at.to_string()),
        (EXPIRES_AT.to_string(), issued.expires_at.to_string()),
        (CONTENT_HASH.to_string(), issued.content_sha256.clone()),
        (
            REGISTRIES.to_string(),
            hosts_annotation(credentials.iter().map(|(h, _)| h.as_str())),
        ),
        // A map of timestamps always serialises.
        (
            CREDENTIALS.to_string(),
            serde_json::to_string(&issued.registries).unwrap_or_default(),
        ),
    ]);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGER.to_string(),
            )])),
            annotations: Some(annotations),
            ..Default::default()
        },
        type_: Some(DOCKER_CONFIG_TYPE.to_string()),
        data: Some(BTreeMap::from([(
            DOCKER_CONFIG_KEY.to_string(),
            ByteString(data),
        )])),
        ..Default::default()
    };
    (secret, issued)
}

/// Reads back what [`build`] recorded, checking that the data is still what was written.
/// Whether it covers the registries configured now, and which are due, is `renewal::plan`'s call.
pub fn assess(secret: Option<&Secret>) -> Assessment {
    let Some(secret) = secret else {
        return Assessment::Missing;
    };
    if !is_managed(secret) {
        return Assessment::Foreign;
    }
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    let get = |k: &str| annotations.get(k).map(String::as_str);
    let data = secret.data.as_ref().and_then(|d| d.get(DOCKER_CONFIG_KEY));
    let Some(recorded_hash) = get(CONTENT_HASH) else {
        return Assessment::Outdated;
    };
    match data {
        Some(d)
            if sha256_hex(&d.0) == recorded_hash
                && secret.type_.as_deref() == Some(DOCKER_CONFIG_TYPE) => {}
        _ => return Assessment::Tampered,
    }
    let registries: Option<Registries> =
        get(CREDENTIALS).and_then(|v| serde_json::from_str(v).ok());
    let Some(registries) = registries.filter(|r| !r.is_empty()) else {
        return Assessment::Outdated;
    };
    let issued_at = registries.values().map(|l| l.issued_at).min();
    let expires_at = registries.values().map(|l| l.expires_at).min();
    match (issued_at, expires_at) {
        (Some(issued_at), Some(expires_at)) if issued_at < expires_at => {
            Assessment::Intact(Issued {
                issued_at,
                expires_at,
                content_sha256: recorded_hash.to_string(),
                registries,
            })
        }
        _ => Assessment::Outdated,
    }
}

/// A digest of what a replace sets on a Secret: its type, data, labels, annotations, owner
/// references, finalizers and immutability (an empty map or list counts as none). Two Secrets
/// with the same digest are the same to a replace, so a write can be skipped by comparing with
/// the digest kept from a watch, without the stored Secret at hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written([u8; 32]);

impl Written {
    pub fn of(secret: &Secret) -> Self {
        fn map<V>(m: &Option<BTreeMap<String, V>>) -> Option<&BTreeMap<String, V>> {
            m.as_ref().filter(|m| !m.is_empty())
        }
        fn list<T>(l: &Option<Vec<T>>) -> &[T] {
            l.as_deref().unwrap_or_default()
        }
        let m = &secret.metadata;
        let shape = json!({
            "type": secret.type_,
            "data": map(&secret.data),
            // Write-only: a stored Secret never shows it, so holding any is always a change.
            "stringData": map(&secret.string_data),
            "immutable": secret.immutable.unwrap_or(false),
            "labels": map(&m.labels),
            "annotations": map(&m.annotations),
            "ownerReferences": list(&m.owner_references),
            "finalizers": list(&m.finalizers),
        });
        // Maps of strings and k8s-openapi structs always serialise, in a fixed order.
        Self(Sha256::digest(serde_json::to_vec(&shape).unwrap_or_default()).into())
    }
}

/// Whether replacing a Secret written as `stored` with `next` would leave it as it is. Such a
/// write is skipped: it would cost an etcd round trip and wake every watcher of the Secret for
/// nothing.
pub(crate) fn unchanged(stored: &Written, next: &Secret) -> bool {
    map_is_empty(&next.string_data) && *stored == Written::of(next)
}

fn map_is_empty<V>(m: &Option<BTreeMap<String, V>>) -> bool {
    m.as_ref().is_none_or(BTreeMap::is_empty)
}

/// What a write over a stored Secret needs of it, no credential among it: the version to
/// replace (a write over any other is refused with 409) and what that version holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub stamp: Stamp,
    pub written: Written,
}

impl Version {
    /// `None` for a Secret the API server has not stored (no resourceVersion).
    pub fn of(secret: &Secret) -> Option<Self> {
        Some(Self {
            stamp: Stamp::of(&secret.metadata)?,
            written: Written::of(secret),
        })
    }
}

/// A managed Secret as the refresher's watch saw it: what it says about itself and which
/// version it is. About 200 bytes, where the Secret itself is several KiB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub assessment: Assessment,
    pub version: Option<Version>,
}

/// Reduces a watched Secret to what renewing it needs.
pub fn seen(secret: &Secret) -> Seen {
    Seen {
        assessment: assess(Some(secret)),
        version: Version::of(secret),
    }
}

/// The credentials an intact Secret holds, for the hosts in `issued`, to carry over into the
/// next version when they are not renewed (not due, or their source failed).
pub(crate) fn stored_credentials(secret: &Secret, issued: &Issued) -> BTreeMap<String, Credential> {
    #[derive(serde::Deserialize)]
    struct Entry {
        username: String,
        password: String,
    }
    #[derive(serde::Deserialize)]
    struct Doc {
        auths: BTreeMap<String, Entry>,
    }
    let Some(data) = secret.data.as_ref().and_then(|d| d.get(DOCKER_CONFIG_KEY)) else {
        return BTreeMap::new();
    };
    let Ok(doc) = serde_json::from_slice::<Doc>(&data.0) else {
        return BTreeMap::new();
    };
    doc.auths
        .into_iter()
        .filter_map(|(host, e)| {
            let l = issued.registries.get(&host)?;
            let c = Credential {
                username: e.username,
                password: Sensitive::new(e.password),
                issued_at: l.issued_at,
                expires_at: l.expires_at,
            };
            Some((host, c))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::credential::Sensitive;

    fn cred(user: &str, token: &str, issued: i64, expires: i64) -> Credential {
        Credential {
            username: user.into(),
            password: Sensitive::new(token),
            issued_at: Timestamp::from_second(issued).unwrap(),
            expires_at: Timestamp::from_second(expires).unwrap(),
        }
    }

    fn creds() -> Vec<(String, Credential)> {
        vec![
            (
                "registry.example.com".into(),
                cred("oauth2accesstoken", "tok-a", 1000, 4600),
            ),
            ("ghcr.io".into(), cred("default", "tok-b", 1001, 2000)),
        ]
    }

    #[test]
    fn docker_config_has_username_password_and_auth() {
        let doc: serde_json::Value = serde_json::from_slice(&docker_config_json(&creds())).unwrap();
        assert_eq!(
            doc["auths"]["registry.example.com"],
            json!({"username": "oauth2accesstoken", "password": "tok-a", "auth": "b2F1dGgyYWNjZXNzdG9rZW46dG9rLWE="})
        );
        assert_eq!(doc["auths"]["ghcr.io"]["auth"], "ZGVmYXVsdDp0b2stYg==");
    }

    #[test]
    fn built_secret_is_managed_typed_and_records_the_earliest_expiry() {
        let (s, issued) = build("team-a", "pull-secret", &creds());
        assert_eq!(s.type_.as_deref(), Some(DOCKER_CONFIG_TYPE));
        assert!(is_managed(&s));
        assert_eq!(issued.expires_at, Timestamp::from_second(2000).unwrap());
        assert_eq!(issued.issued_at, Timestamp::from_second(1000).unwrap());
        let a = s.metadata.annotations.as_ref().unwrap();
        assert_eq!(a[EXPIRES_AT], "1970-01-01T00:33:20Z");
        assert_eq!(a[REGISTRIES], "ghcr.io,registry.example.com");
        assert_eq!(
            issued.registries.get("ghcr.io").unwrap().expires_at,
            Timestamp::from_second(2000).unwrap()
        );
        assert_eq!(
            issued
                .registries
                .get("registry.example.com")
                .unwrap()
                .expires_at,
            Timestamp::from_second(4600).unwrap()
        );
        assert_eq!(assess(Some(&s)), Assessment::Intact(issued.clone()));
        let stored = stored_credentials(&s, &issued);
        assert_eq!(stored["ghcr.io"].password.expose(), "tok-b");
        assert_eq!(stored["registry.example.com"].username, "oauth2accesstoken");
        assert_eq!(
            stored["registry.example.com"].expires_at,
            Timestamp::from_second(4600).unwrap()
        );
    }

    #[test]
    fn a_write_is_unchanged_only_when_it_would_store_what_is_stored() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let (built, _) = build("ns", "pull-secret", &creds());
        // As read back: the server's own fields differ, and empty collections come back as none.
        let mut stored = built.clone();
        stored.metadata.resource_version = Some("42".into());
        stored.metadata.uid = Some("u-1".into());
        stored.metadata.finalizers = Some(vec![]);
        let edit = |f: fn(&mut Secret)| {
            let mut s = built.clone();
            f(&mut s);
            s
        };
        let renewed = {
            let mut c = creds();
            c[0].1.password = Sensitive::new("tok-a2");
            build("ns", "pull-secret", &c).0
        };
        let cases: Vec<(&str, Secret, bool)> = vec![
            ("the same content", built.clone(), true),
            ("a new token", renewed, false),
            (
                "another type",
                edit(|s| s.type_ = Some("Opaque".into())),
                false,
            ),
            ("no data", edit(|s| s.data = None), false),
            (
                "string data",
                edit(|s| s.string_data = Some([("k".into(), "v".into())].into())),
                false,
            ),
            ("immutable", edit(|s| s.immutable = Some(true)), false),
            (
                "not immutable, said so",
                edit(|s| s.immutable = Some(false)),
                true,
            ),
            (
                "a label",
                edit(|s| {
                    s.metadata
                        .labels
                        .get_or_insert_default()
                        .insert("team".into(), "a".into());
                }),
                false,
            ),
            (
                "an annotation less",
                edit(|s| {
                    s.metadata
                        .annotations
                        .get_or_insert_default()
                        .remove(EXPIRES_AT);
                }),
                false,
            ),
            (
                "an owner",
                edit(|s| {
                    s.metadata.owner_references = Some(vec![OwnerReference {
                        kind: "ServiceAccount".into(),
                        name: "builder".into(),
                        ..Default::default()
                    }])
                }),
                false,
            ),
            (
                "no finalizers",
                edit(|s| s.metadata.finalizers = None),
                true,
            ),
            (
                "a finalizer",
                edit(|s| s.metadata.finalizers = Some(vec!["example.com/keep".into()])),
                false,
            ),
        ];
        let written = Written::of(&stored);
        for (what, next, expected) in cases {
            assert_eq!(unchanged(&written, &next), expected, "{what}");
        }
    }

    #[test]
    fn a_watched_secret_is_kept_as_its_version_and_a_digest_never_its_credentials() {
        let (built, issued) = build("ns", "pull-secret", &creds());
        let mut stored = built.clone();
        stored.metadata.resource_version = Some("42".into());
        stored.metadata.uid = Some("u-1".into());
        let seen = seen(&stored);
        assert_eq!(seen.assessment, Assessment::Intact(issued));
        let version = seen.version.clone().expect("stored, so versioned");
        assert_eq!(
            version.stamp,
            Stamp {
                resource_version: "42".into(),
                uid: Some("u-1".into())
            }
        );
        // A write of what is stored is known to change nothing, from the digest alone.
        assert!(unchanged(&version.written, &built));
        let kept = format!("{seen:?}");
        assert!(
            !kept.contains("tok-a") && !kept.contains("dG9rLWE"),
            "{kept}"
        );
        // Not yet stored: nothing to write over.
        assert_eq!(Version::of(&built), None);
    }

    #[test]
    fn assessment_of_what_is_found() {
        assert_eq!(assess(None), Assessment::Missing);

        let (mut foreign, _) = build("ns", "pull-secret", &creds());
        foreign.metadata.labels = None;
        assert_eq!(assess(Some(&foreign)), Assessment::Foreign);

        let (mut tampered, _) = build("ns", "pull-secret", &creds());
        tampered
            .data
            .as_mut()
            .unwrap()
            .insert(DOCKER_CONFIG_KEY.into(), ByteString(b"{}".to_vec()));
        assert_eq!(assess(Some(&tampered)), Assessment::Tampered);

        let (mut emptied, _) = build("ns", "pull-secret", &creds());
        emptied.data = None;
        assert_eq!(assess(Some(&emptied)), Assessment::Tampered);

        let (mut garbled, _) = build("ns", "pull-secret", &creds());
        garbled
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(CREDENTIALS.into(), "soon".into());
        assert_eq!(assess(Some(&garbled)), Assessment::Outdated);

        // Written by a version that kept no per-registry lifetimes: renewed in full.
        let (mut older, _) = build("ns", "pull-secret", &creds());
        older
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(CREDENTIALS);
        assert_eq!(assess(Some(&older)), Assessment::Outdated);
    }
}
