//! Reads the expiry of a JWT a registry handed back (chainguard, quay, acr refresh tokens).
//! The signature is not checked: the token is only passed on, and its issuer verifies it;
//! `exp` tells us when to renew. Errors describe the shape, never echo the token.

use base64::Engine;
use jiff::Timestamp;

/// The `exp` claim of `token`, or why it cannot be read.
pub fn expiry(token: &str) -> Result<Timestamp, String> {
    let mut parts = token.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a JWT (expected three dot-separated parts)".into());
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| "JWT payload is not base64url".to_string())?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| "JWT payload is not JSON".to_string())?;
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
        let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
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
