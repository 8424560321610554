//! JWTs in their compact form: split and base64url, for every reader and writer of them here,
//! and the expiry of one a registry handed back (chainguard, quay, acr refresh tokens).
//! The signature is not checked: the token is only passed on, and its issuer verifies it;
//! `exp` tells us when to renew. Errors describe the shape, never echo the token.

use base64::Engine;
use jiff::Timestamp;

/// The three parts of a compact JWT (header, payload, signature), still base64url-encoded.
pub(crate) fn split(token: &str) -> Option<[&str; 3]> {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(payload), Some(signature), None) => Some([header, payload, signature]),
        _ => None,
    }
}

/// One part decoded (base64url; padding tolerated, though JWTs carry none).
pub(crate) fn decode_part(part: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()
}

/// Bytes encoded as a JWT part.
pub(crate) fn encode_part(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The claims of `token`, unverified, or why they cannot be read.
pub(crate) fn claims(token: &str) -> Result<serde_json::Value, String> {
    let [_header, payload, _signature] =
        split(token).ok_or("not a JWT (expected three dot-separated parts)")?;
    let bytes = decode_part(payload).ok_or("JWT payload is not base64url")?;
    match serde_json::from_slice(&bytes) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(v),
        _ => Err("JWT payload is not a JSON object".to_string()),
    }
}

/// The `exp` claim of `token`, or why it cannot be read.
pub(crate) fn expiry(token: &str) -> Result<Timestamp, String> {
    let claims = claims(token)?;
    let exp = claims
        .get("exp")
        .and_then(serde_json::Value::as_i64)
        .ok_or("JWT has no numeric exp claim")?;
    Timestamp::from_second(exp).map_err(|_| format!("JWT exp {exp} is out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        let b = |s: &str| encode_part(s.as_bytes());
        format!("{}.{}.c2lnbmF0dXJl", b(r#"{"alg":"RS256"}"#), b(claims))
    }

    #[test]
    fn reads_exp() {
        let t = jwt(r#"{"sub":"x","exp":1800000000,"iat":1799996400}"#);
        assert_eq!(
            expiry(&t).unwrap(),
            Timestamp::from_second(1_800_000_000).unwrap()
        );
    }

    #[test]
    fn malformed_tokens_are_refused_without_echoing_them() {
        let secret = "opaque-secret-refresh-token";
        for bad in [
            secret.to_string(),
            format!("a.{secret}.c"),
            jwt(r#"{"sub":"opaque-secret"}"#),
            jwt(r#"{"exp":"soon"}"#),
        ] {
            let e = expiry(&bad).unwrap_err();
            assert!(!e.contains("secret"), "{e}");
        }
    }
}
