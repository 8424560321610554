//! Kubernetes object names, checked where the configuration names them (a Secret, a Lease, a
//! ServiceAccount) so that a typo is reported at start-up rather than by the API server later.

/// RFC 1123 subdomain, as Kubernetes requires for Secret names.
pub fn validate_dns_subdomain(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !part.starts_with('-')
                && !part.ends_with('-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid Kubernetes name (lowercase letters, digits, '-' and '.', at \
             most 253 characters)"
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
    }
}
