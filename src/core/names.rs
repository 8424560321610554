//! Kubernetes object names: checked where the configuration names them (a Secret, a Lease, a
//! ServiceAccount) so that a typo is reported at start-up rather than by the API server later,
//! and where a request names them (an AdmissionReview's namespace, object and ServiceAccount):
//! a name goes into API paths, cache keys and Events only once it is one Kubernetes allows.

/// The longest name quoted back in an error: a hostile name can be megabytes long.
const QUOTED: usize = 64;

fn label_ok(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 63
        && part
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !part.starts_with('-')
        && !part.ends_with('-')
}

/// RFC 1123 label, as Kubernetes requires for Namespace names: at most 63 characters.
pub(crate) fn is_dns_label(name: &str) -> bool {
    label_ok(name)
}

/// RFC 1123 subdomain, as Kubernetes requires for Secret and ServiceAccount names.
pub(crate) fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)
}

/// `name` for an error message: quoted and escaped, cut to a few dozen characters.
pub(crate) fn quoted(name: &str) -> String {
    match name.char_indices().nth(QUOTED) {
        Some((end, _)) => format!("{:?}...", &name[..end]),
        None => format!("{name:?}"),
    }
}

pub(crate) fn validate_dns_subdomain(name: &str) -> Result<(), String> {
    if is_dns_subdomain(name) {
        Ok(())
    } else {
        Err(format!(
            "{} is not a valid Kubernetes name (lowercase letters, digits, '-' and '.', at \
             most 253 characters)",
            quoted(name)
        ))
    }
}

pub(crate) fn validate_dns_label(name: &str) -> Result<(), String> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(format!(
            "{} is not a valid Kubernetes namespace name (lowercase letters, digits and '-', at \
             most 63 characters)",
            quoted(name)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names() {
        assert!(validate_dns_subdomain("pull-secret").is_ok());
        assert!(validate_dns_subdomain("a.b-c").is_ok());
        for bad in ["", "Pull", "a_b", "-a", "a-", "a..b"] {
            assert!(validate_dns_subdomain(bad).is_err(), "{bad}");
        }
        assert!(is_dns_subdomain(
            &["a".repeat(63), "b".repeat(63)].join(".")
        ));
        assert!(!is_dns_subdomain(&"a".repeat(254)));
    }

    /// What a hostile review put in `request.namespace`: each would have gone into an API path.
    #[test]
    fn namespace_names() {
        assert!(is_dns_label("team-a"));
        assert!(is_dns_label(&"a".repeat(63)));
        for bad in [
            "team-a?watch=true",
            "team-a?x=1",
            "team-a/",
            "team-a//",
            "team%2Da",
            "team-a#x",
            "..",
            "team.a",
            "Team-a",
            "team-a\n",
            "",
            &"a".repeat(64),
        ] {
            assert!(!is_dns_label(bad), "{bad:?}");
            assert!(validate_dns_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn long_names_are_quoted_short() {
        let e = validate_dns_label(&"x".repeat(100_000)).unwrap_err();
        assert!(e.len() < 200, "{e}");
        assert!(validate_dns_label("é\n").unwrap_err().contains("\\n"));
    }
}
