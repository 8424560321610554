//! A registry credential as it travels from a source into a Secret. Its secret part is a
//! [`Sensitive`], so that no log line, error or `Debug` print can show it.

use std::fmt;

use jiff::Timestamp;

/// A value that must never be printed: its `Debug` is redacted and it has no `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Sensitive(String);

impl Sensitive {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must write it (the pull Secret's data).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sensitive(<redacted>)")
    }
}

/// A registry credential and how long it lasts.
#[derive(Clone, Debug)]
pub struct Credential {
    pub username: String,
    pub password: Sensitive,
    pub issued_at: Timestamp,
    /// As the source reported it, never assumed from what was asked for.
    pub expires_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sensitive_values_do_not_print() {
        let c = Credential {
            username: "u".into(),
            password: Sensitive::new("eyJhbGciOi.secret-token"),
            issued_at: Timestamp::UNIX_EPOCH,
            expires_at: Timestamp::UNIX_EPOCH,
        };
        let printed = format!("{c:?} {c:#?}");
        assert!(!printed.contains("secret-token"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }
}
