//! Which registry access a verified identity gets: the Docker Registry v2 token protocol's
//! scopes (`repository:team-a/app:pull,push`) against the configured rules. Pure: no I/O, no
//! clock. A scope no rule grants is dropped from the answer (the registry then refuses the
//! operation), never turned into an error, as the protocol expects.

use serde::{Deserialize, Serialize};

/// One rule of the config: who (a namespace, optionally one ServiceAccount) gets which actions
/// on which repositories.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    /// The namespace, or `*` for any.
    pub namespace: String,
    /// Only this ServiceAccount of the namespace. Default: any.
    #[serde(default)]
    pub service_account: Option<String>,
    /// Repository patterns: `team-a/*` (anything under `team-a/`), `shared/base`, `*`.
    pub repositories: Vec<String>,
    /// Default `[pull]`.
    #[serde(default = "default_actions")]
    pub actions: Vec<String>,
}

fn default_actions() -> Vec<String> {
    vec!["pull".into()]
}

/// The identity a verified service-account token names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
}

impl Identity {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub(crate) fn from_subject(sub: &str) -> Option<Identity> {
        let rest = sub.strip_prefix("system:serviceaccount:")?;
        let (namespace, service_account) = rest.split_once(':')?;
        (!namespace.is_empty() && !service_account.is_empty() && !service_account.contains(':'))
            .then(|| Identity {
                namespace: namespace.into(),
                service_account: service_account.into(),
            })
    }
}

/// One requested or granted access: the token's `access` claim entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// Parses a `scope` parameter: `type:name:actions`, where the name may itself hold `:` (a port)
/// and actions are comma-separated. Malformed scopes are skipped, as the registry would.
pub(crate) fn parse_scope(scope: &str) -> Vec<Access> {
    scope
        .split(' ')
        .filter_map(|s| {
            let (kind, rest) = s.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            let actions: Vec<String> = actions
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect();
            (!kind.is_empty() && !name.is_empty() && !actions.is_empty()).then(|| Access {
                kind: kind.into(),
                name: name.into(),
                actions,
            })
        })
        .collect()
}

fn pattern_matches(pattern: &str, name: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_suffix("/*") {
        Some(prefix) => name
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1),
        None => pattern == name,
    }
}

/// Whether `name` is a repository name as distribution's reference grammar has it: path
/// components of lowercase letters and digits joined by `.`, `_`, `__` or dashes, separated by
/// single `/`, optionally after a registry host (`host[:port]/`), at most 255 characters. So no
/// `..`, `.`, empty or `*` component, and no control characters: a grant names only what the
/// registry itself would accept, not whatever a prefix pattern happens to match.
pub(crate) fn valid_repository(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let components: Vec<&str> = name.split('/').collect();
    let (first, rest) = components.split_first().unwrap_or((&"", &[]));
    let first_ok = path_component(first) || (!rest.is_empty() && domain(first));
    first_ok && rest.iter().all(|c| path_component(c))
}

fn path_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    if !bytes.first().is_some_and(|b| alnum(*b)) || !bytes.last().is_some_and(|b| alnum(*b)) {
        return false;
    }
    // Runs of separators between letters and digits: `.`, `_`, `__` or dashes only.
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let run = &c[start..i];
        if !(run == "." || run == "_" || run == "__" || run.bytes().all(|b| b == b'-')) {
            return false;
        }
    }
    true
}

/// `host[:port]`: DNS-style labels (any case) and an optional numeric port.
fn domain(c: &str) -> bool {
    let (host, port) = match c.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (c, None),
    };
    let label = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !host.is_empty()
        && host.split('.').all(label)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// What `identity` gets of `requested`: per repository scope, the requested actions some rule
/// allows; scopes with nothing allowed, and non-repository scopes, are left out.
pub(crate) fn grant(rules: &[Rule], identity: &Identity, requested: &[Access]) -> Vec<Access> {
    let applicable: Vec<&Rule> = rules
        .iter()
        .filter(|r| r.namespace == "*" || r.namespace == identity.namespace)
        .filter(|r| {
            r.service_account
                .as_ref()
                .is_none_or(|sa| *sa == identity.service_account)
        })
        .collect();
    requested
        .iter()
        .filter(|a| a.kind == "repository" && valid_repository(&a.name))
        .filter_map(|a| {
            let allowed: Vec<String> = a
                .actions
                .iter()
                .filter(|action| {
                    applicable.iter().any(|r| {
                        r.repositories.iter().any(|p| pattern_matches(p, &a.name))
                            && r.actions.iter().any(|x| x == *action || x == "*")
                    })
                })
                .cloned()
                .collect();
            (!allowed.is_empty()).then(|| Access {
                kind: a.kind.clone(),
                name: a.name.clone(),
                actions: allowed,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<Rule> {
        serde_yaml::from_str(
            r#"
- {namespace: team-a, repositories: ["team-a/*", "shared/*"]}
- {namespace: ci, serviceAccount: pusher, repositories: ["team-a/*"], actions: [pull, push]}
- {namespace: "*", repositories: [public/base]}
"#,
        )
        .unwrap()
    }

    fn who(ns: &str, sa: &str) -> Identity {
        Identity {
            namespace: ns.into(),
            service_account: sa.into(),
        }
    }

    #[test]
    fn scopes_parse_with_ports_and_several_actions() {
        let s = parse_scope("repository:team-a/app:pull,push repository:127.0.0.1:5000/x:pull registry:catalog:* bad");
        assert_eq!(s.len(), 3);
        assert_eq!(
            s[0],
            Access {
                kind: "repository".into(),
                name: "team-a/app".into(),
                actions: vec!["pull".into(), "push".into()]
            }
        );
        assert_eq!(s[1].name, "127.0.0.1:5000/x");
        assert_eq!(s[2].kind, "registry");
        assert!(parse_scope("").is_empty());
        assert!(parse_scope("repository:x:").is_empty());
    }

    #[test]
    fn namespaces_get_their_repositories_and_nothing_else() {
        let req = parse_scope(
            "repository:team-a/app:pull,push repository:team-b/app:pull repository:shared/x:pull",
        );
        let g = grant(&rules(), &who("team-a", "default"), &req);
        assert_eq!(g.len(), 2);
        assert_eq!(
            (g[0].name.as_str(), g[0].actions.clone()),
            ("team-a/app", vec!["pull".to_string()]),
            "push is not granted"
        );
        assert_eq!(g[1].name, "shared/x");
        assert!(grant(
            &rules(),
            &who("team-b", "default"),
            &parse_scope("repository:team-a/app:pull")
        )
        .is_empty());
    }

    #[test]
    fn a_rule_can_require_a_service_account() {
        let req = parse_scope("repository:team-a/app:pull,push");
        assert_eq!(
            grant(&rules(), &who("ci", "pusher"), &req)[0].actions,
            ["pull", "push"]
        );
        assert!(grant(&rules(), &who("ci", "default"), &req).is_empty());
    }

    #[test]
    fn patterns_match_whole_path_segments() {
        assert!(pattern_matches("team-a/*", "team-a/app"));
        assert!(pattern_matches("team-a/*", "team-a/tools/app"));
        assert!(!pattern_matches("team-a/*", "team-ab/app"));
        assert!(!pattern_matches("team-a/*", "team-a"));
        assert!(!pattern_matches("team-a/*", "team-a/"));
        assert!(pattern_matches("public/base", "public/base"));
        assert!(!pattern_matches("public/base", "public/base2"));
        assert!(
            grant(
                &rules(),
                &who("anyone", "x"),
                &parse_scope("repository:public/base:pull")
            )
            .len()
                == 1
        );
        assert!(
            grant(
                &rules(),
                &who("team-a", "x"),
                &parse_scope("registry:catalog:*")
            )
            .is_empty(),
            "only repository scopes"
        );
    }

    #[test]
    fn subjects_name_service_accounts() {
        assert_eq!(
            Identity::from_subject("system:serviceaccount:team-a:default"),
            Some(who("team-a", "default"))
        );
        assert_eq!(Identity::from_subject("system:node:n1"), None);
        assert_eq!(
            Identity::from_subject("system:serviceaccount:team-a:"),
            None
        );
        assert_eq!(Identity::from_subject("system:serviceaccount:a:b:c"), None);
    }

    /// Names that a `team-a/*` prefix would match but distribution's grammar refuses: never
    /// granted.
    #[test]
    fn grants_name_only_what_the_repository_grammar_accepts() {
        let all = [Rule {
            namespace: "team-a".into(),
            service_account: None,
            repositories: vec!["team-a/*".into()],
            actions: vec!["pull".into()],
        }];
        for bad in [
            "team-a/../team-b/app",
            "team-a/./app",
            "team-a//app",
            "team-a/*",
            "team-a/app\n",
            "team-a/App",
            "team-a/-app",
            "team-a/app.",
            "team-a/a...b",
            "team-a/a___b",
        ] {
            let req = [Access {
                kind: "repository".into(),
                name: bad.into(),
                actions: vec!["pull".into()],
            }];
            assert!(grant(&all, &who("team-a", "d"), &req).is_empty(), "{bad:?}");
        }
        for good in ["team-a/app", "team-a/a.b_c__d--e/f", "team-a/x/y/z"] {
            let req = parse_scope(&format!("repository:{good}:pull"));
            assert_eq!(grant(&all, &who("team-a", "d"), &req).len(), 1, "{good}");
        }
        assert!(valid_repository("localhost:5000/team-a/app"));
        assert!(valid_repository("Registry.Example.com/app"));
        assert!(!valid_repository("registry.example.com/"));
        assert!(!valid_repository(&format!("team-a/{}", "a".repeat(250))));
    }
}
