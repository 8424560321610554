//! Which namespaces the service acts in: the configured label selector, minus the namespaces it
//! must never touch. Checked in code for every request, whatever the webhook configuration says.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Selector, SelectorExt};

/// A namespace annotation that picks which configured registries its Secret holds
/// (comma-separated hosts). Absent: all of them.
pub(crate) const REGISTRIES_ANNOTATION: &str = "pull-secret-injector.io/registries";

/// The registries a namespace's Secret holds, as its annotation picks them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selection {
    /// Configured hosts the namespace gets, in configuration order.
    pub hosts: Vec<String>,
    /// Hosts the annotation names that are not configured (reported, otherwise ignored).
    pub unknown: Vec<String>,
}

/// The namespace's [`REGISTRIES_ANNOTATION`], if it has one.
pub(crate) fn registries_annotation(ns: &k8s_openapi::api::core::v1::Namespace) -> Option<&str> {
    ns.metadata
        .annotations
        .as_ref()?
        .get(REGISTRIES_ANNOTATION)
        .map(String::as_str)
}

/// `configured` hosts narrowed by the namespace's annotation value, if it has one.
pub(crate) fn registries_for(annotation: Option<&str>, configured: &[&str]) -> Selection {
    let Some(value) = annotation else {
        return Selection {
            hosts: configured.iter().map(|h| h.to_string()).collect(),
            unknown: vec![],
        };
    };
    let named: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .collect();
    Selection {
        hosts: configured
            .iter()
            .filter(|h| named.contains(h))
            .map(|h| h.to_string())
            .collect(),
        unknown: named
            .iter()
            .filter(|h| !configured.contains(h))
            .map(|h| h.to_string())
            .collect(),
    }
}

/// Namespaces that are never injected, whatever their labels.
pub(crate) const ALWAYS_EXCLUDED: &[&str] = &["kube-system"];

#[derive(Clone, Debug)]
pub struct NamespacePolicy {
    /// `None` when the selector cannot be read: `validate` refuses those at start-up, and one
    /// that slips by selects nothing rather than everything.
    selector: Option<Selector>,
    excluded: BTreeSet<String>,
    /// The label keys the selector reads: no other label can change a namespace's eligibility.
    label_keys: BTreeSet<String>,
}

/// Why a namespace is or is not served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Eligibility {
    OptedIn,
    NotSelected,
    Excluded,
}

impl NamespacePolicy {
    pub fn new(
        selector: LabelSelector,
        own_namespace: Option<&str>,
        extra_excluded: &[String],
    ) -> Self {
        let mut excluded: BTreeSet<String> =
            ALWAYS_EXCLUDED.iter().map(|s| s.to_string()).collect();
        excluded.extend(own_namespace.map(str::to_string));
        excluded.extend(extra_excluded.iter().cloned());
        let label_keys = selector
            .match_labels
            .iter()
            .flat_map(|m| m.keys().cloned())
            .chain(
                selector
                    .match_expressions
                    .iter()
                    .flatten()
                    .map(|e| e.key.clone()),
            )
            .collect();
        Self {
            selector: Selector::try_from(selector).ok(),
            excluded,
            label_keys,
        }
    }

    pub fn eligibility(
        &self,
        name: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Eligibility {
        if self.excluded.contains(name) {
            Eligibility::Excluded
        } else if self
            .selector
            .as_ref()
            .is_some_and(|s| s.matches(labels.unwrap_or(&BTreeMap::new())))
        {
            Eligibility::OptedIn
        } else {
            Eligibility::NotSelected
        }
    }

    pub(crate) fn is_excluded(&self, name: &str) -> bool {
        self.excluded.contains(name)
    }

    /// Whether a label with this key can change a namespace's eligibility: the Namespace
    /// watch keeps only those (with thousands of namespaces, other labels are most of it).
    pub(crate) fn reads_label(&self, key: &str) -> bool {
        self.label_keys.contains(key)
    }
}

/// Reports what the API server would refuse in a selector, and refuses an empty one: it would
/// select every namespace in the cluster, which is never what opting in means.
pub(crate) fn validate(selector: &LabelSelector, path: &str, err: &mut impl FnMut(&str, String)) {
    let labels = selector.match_labels.as_ref().map_or(0, BTreeMap::len);
    let exprs = selector.match_expressions.as_deref().unwrap_or_default();
    if labels == 0 && exprs.is_empty() {
        err(
            path,
            "must not be empty: an empty selector would opt in every namespace".into(),
        );
    }
    for (i, e) in exprs.iter().enumerate() {
        let here = format!("{path}.matchExpressions[{i}]");
        let n = e.values.as_ref().map_or(0, Vec::len);
        match e.operator.as_str() {
            "In" | "NotIn" if n == 0 => err(
                &format!("{here}.values"),
                format!("must not be empty for operator {}", e.operator),
            ),
            "Exists" | "DoesNotExist" if n > 0 => err(
                &format!("{here}.values"),
                format!("must be empty for operator {}", e.operator),
            ),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => err(
                &format!("{here}.operator"),
                format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotation_narrows_the_registries() {
        let configured = ["cgr.dev", "ghcr.io", "quay.io"];
        assert_eq!(registries_for(None, &configured).hosts, configured);
        let s = registries_for(Some(" quay.io,cgr.dev ,, nowhere.example"), &configured);
        assert_eq!(
            s.hosts,
            ["cgr.dev", "quay.io"],
            "configuration order, not the annotation's"
        );
        assert_eq!(s.unknown, ["nowhere.example"]);
        let s = registries_for(Some(""), &configured);
        assert!(s.hosts.is_empty() && s.unknown.is_empty());
    }
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    /// Label matching as the policy does it (kube's `Selector`).
    fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
        NamespacePolicy::new(selector.clone(), None, &[]).eligibility("ns", Some(labels))
            == Eligibility::OptedIn
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|s| s.to_string()).collect()),
        }
    }

    fn opt_in() -> LabelSelector {
        LabelSelector {
            match_labels: Some(labels(&[("inject", "enabled")])),
            match_expressions: None,
        }
    }

    #[test]
    fn match_labels_must_all_hold() {
        let s = opt_in();
        assert!(matches(&s, &labels(&[("inject", "enabled"), ("x", "y")])));
        assert!(!matches(&s, &labels(&[("inject", "disabled")])));
        assert!(!matches(&s, &labels(&[])));
    }

    #[test]
    fn expressions() {
        let s = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![
                expr("tier", "In", &["a", "b"]),
                expr("legacy", "DoesNotExist", &[]),
                expr("env", "NotIn", &["prod"]),
                expr("team", "Exists", &[]),
            ]),
        };
        assert!(matches(&s, &labels(&[("tier", "a"), ("team", "x")])));
        assert!(matches(
            &s,
            &labels(&[("tier", "b"), ("team", "x"), ("env", "dev")])
        ));
        assert!(!matches(&s, &labels(&[("tier", "c"), ("team", "x")])));
        assert!(!matches(
            &s,
            &labels(&[("tier", "a"), ("team", "x"), ("legacy", "1")])
        ));
        assert!(!matches(
            &s,
            &labels(&[("tier", "a"), ("team", "x"), ("env", "prod")])
        ));
        assert!(!matches(&s, &labels(&[("tier", "a")])));
    }

    #[test]
    fn labels_the_selector_does_not_read_change_nothing() {
        let selectors = [
            opt_in(),
            LabelSelector {
                match_labels: Some(labels(&[("inject", "enabled")])),
                match_expressions: Some(vec![
                    expr("tier", "In", &["a"]),
                    expr("legacy", "DoesNotExist", &[]),
                ]),
            },
        ];
        let namespaces = [
            labels(&[("inject", "enabled"), ("tier", "a"), ("x", "y")]),
            labels(&[
                ("inject", "enabled"),
                ("tier", "a"),
                ("legacy", "1"),
                ("x", "y"),
            ]),
            labels(&[("inject", "enabled"), ("kubernetes.io/metadata.name", "n")]),
            labels(&[("x", "y")]),
        ];
        for selector in &selectors {
            let p = NamespacePolicy::new(selector.clone(), None, &[]);
            for all in &namespaces {
                let mut read = all.clone();
                read.retain(|k, _| p.reads_label(k));
                assert_eq!(
                    p.eligibility("ns", Some(&read)),
                    p.eligibility("ns", Some(all)),
                    "{selector:?} {all:?}"
                );
            }
        }
        let p = NamespacePolicy::new(selectors[1].clone(), None, &[]);
        assert!(p.reads_label("inject") && p.reads_label("tier") && p.reads_label("legacy"));
        assert!(!p.reads_label("x"));
    }

    #[test]
    fn kube_system_and_the_own_namespace_are_never_eligible() {
        let p = NamespacePolicy::new(opt_in(), Some("injector"), &["platform".into()]);
        let on = labels(&[("inject", "enabled")]);
        assert_eq!(p.eligibility("team-a", Some(&on)), Eligibility::OptedIn);
        assert_eq!(p.eligibility("team-a", None), Eligibility::NotSelected);
        for ns in ["kube-system", "injector", "platform"] {
            assert_eq!(p.eligibility(ns, Some(&on)), Eligibility::Excluded, "{ns}");
        }
    }

    #[test]
    fn validation() {
        let mut found = Vec::new();
        let mut err = |p: &str, m: String| found.push(format!("{p}: {m}"));
        validate(&LabelSelector::default(), "sel", &mut err);
        validate(
            &LabelSelector {
                match_labels: None,
                match_expressions: Some(vec![
                    expr("a", "In", &[]),
                    expr("b", "Exists", &["x"]),
                    expr("c", "Like", &["x"]),
                ]),
            },
            "sel",
            &mut err,
        );
        assert!(found[0].starts_with("sel: must not be empty"), "{found:?}");
        assert!(
            found[1].starts_with("sel.matchExpressions[0].values"),
            "{found:?}"
        );
        assert!(
            found[2].starts_with("sel.matchExpressions[1].values"),
            "{found:?}"
        );
        assert!(
            found[3].starts_with("sel.matchExpressions[2].operator"),
            "{found:?}"
        );
        let mut none = 0;
        validate(&opt_in(), "sel", &mut |_: &str, _| none += 1);
        assert_eq!(none, 0);
    }
}
