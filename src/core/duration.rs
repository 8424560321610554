//! Durations in the configuration files: Go's notation as Kubernetes writes it (`90s`, `20m`,
//! `1h30m`, `500ms`), read by `kube::core::Duration`. Only whole, unsigned amounts are taken:
//! a negative or fractional timeout in a config file is a mistake, not an intent.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Parses `90s`, `20m`, `1h30m`, `500ms`, `2h`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("{text:?} is not a duration (examples: 500ms, 90s, 20m, 1h30m)");
    let trimmed = text.trim();
    // kube's parser also takes signs, fractions and a bare `0`; none of them belongs here.
    if !trimmed.starts_with(|c: char| c.is_ascii_digit())
        || !trimmed.ends_with(|c: char| c.is_ascii_alphabetic())
        || trimmed.contains('.')
    {
        return Err(bad());
    }
    let parsed: kube::core::Duration = trimmed.parse().map_err(|_| bad())?;
    Ok(parsed.into())
}

/// `deserialize_with` for a required duration field.
pub(crate) fn field<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

/// `deserialize_with` for an optional duration field.
pub(crate) fn optional_field<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|t| parse_duration(&t).map_err(serde::de::Error::custom))
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20m"), Ok(Duration::from_secs(1200)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        for bad in ["", "20", "m", "1d", "-5s", "1.5h"] {
            assert!(parse_duration(bad).is_err(), "{bad} should not parse");
        }
    }
}
