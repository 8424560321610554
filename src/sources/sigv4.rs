//! AWS Signature Version 4, for the one signed call the `ecr` source makes
//! (`GetAuthorizationToken`; the STS exchange before it is authorised by the token itself). Pure: the caller gives
//! the request's parts and the clock, and gets the headers to add. Checked against AWS's
//! published examples (the SigV4 test suite's `get-vanilla` cases and the IAM `ListUsers`
//! example of the signing documentation).

use jiff::Timestamp;
use ring::{digest, hmac};

/// Temporary or long-term AWS keys.
pub struct AwsKeys<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
}

/// What is signed: method, host, path, query pairs, the other headers to sign, and the body.
pub struct SignableRequest<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub query: &'a [(&'a str, &'a str)],
    /// Lower-case names; `host`, `x-amz-date` and `x-amz-security-token` are added here.
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// The headers to send with the request: `x-amz-date`, `authorization` and, with a session
/// token, `x-amz-security-token`.
pub fn sign(
    request: &SignableRequest,
    keys: &AwsKeys,
    region: &str,
    service: &str,
    now: Timestamp,
) -> Vec<(String, String)> {
    let amz_date = now.strftime("%Y%m%dT%H%M%SZ").to_string();
    let date = &amz_date[..8];
    let mut headers: Vec<(String, String)> = request
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), normalise_value(v)))
        .collect();
    headers.push(("host".into(), request.host.to_string()));
    headers.push(("x-amz-date".into(), amz_date.clone()));
    if let Some(t) = keys.session_token {
        headers.push(("x-amz-security-token".into(), t.to_string()));
    }
    headers.sort();
    let signed_headers = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        request.method,
        canonical_path(request.path),
        canonical_query(request.query),
        canonical_headers,
        signed_headers,
        hex(digest::digest(&digest::SHA256, request.body).as_ref()),
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref())
    );
    let key = signing_key(keys.secret_access_key, date, region, service);
    let signature = hex(hmac::sign(&key, string_to_sign.as_bytes()).as_ref());
    let mut out = vec![
        ("x-amz-date".to_string(), amz_date),
        (
            "authorization".to_string(),
            format!("AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}", keys.access_key_id),
        ),
    ];
    if let Some(t) = keys.session_token {
        out.push(("x-amz-security-token".into(), t.to_string()));
    }
    out
}

fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> hmac::Key {
    let step = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
    };
    let k_date = step(format!("AWS4{secret}").as_bytes(), date);
    let k_region = step(k_date.as_ref(), region);
    let k_service = step(k_region.as_ref(), service);
    let k_signing = step(k_service.as_ref(), "aws4_request");
    hmac::Key::new(hmac::HMAC_SHA256, k_signing.as_ref())
}

/// RFC 3986 percent-encoding of everything but the unreserved characters, as SigV4 wants.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn canonical_path(path: &str) -> String {
    if path.is_empty() {
        return "/".into();
    }
    path.split('/').map(encode).collect::<Vec<_>>().join("/")
}

fn canonical_query(query: &[(&str, &str)]) -> String {
    let mut pairs: Vec<(String, String)> =
        query.iter().map(|(k, v)| (encode(k), encode(v))).collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Trimmed, with runs of spaces collapsed.
fn normalise_value(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEYS: AwsKeys = AwsKeys {
        access_key_id: "AKIDEXAMPLE",
        secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        session_token: None,
    };

    fn at() -> Timestamp {
        "2015-08-30T12:36:00Z".parse().unwrap()
    }

    fn authorization(headers: &[(String, String)]) -> &str {
        &headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .unwrap()
            .1
    }

    #[test]
    fn get_vanilla() {
        let r = SignableRequest {
            method: "GET",
            host: "example.amazonaws.com",
            path: "/",
            query: &[],
            headers: &[],
            body: b"",
        };
        let h = sign(&r, &KEYS, "us-east-1", "service", at());
        assert_eq!(
            authorization(&h),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        assert!(h.contains(&("x-amz-date".into(), "20150830T123600Z".into())));
    }

    #[test]
    fn get_vanilla_query_order_key_case() {
        let query = [("Param2", "value2"), ("Param1", "value1")];
        let r = SignableRequest {
            method: "GET",
            host: "example.amazonaws.com",
            path: "/",
            query: &query,
            headers: &[],
            body: b"",
        };
        let h = sign(&r, &KEYS, "us-east-1", "service", at());
        assert!(
            authorization(&h).ends_with(
                "Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
            ),
            "{h:?}"
        );
    }

    #[test]
    fn iam_list_users_example() {
        let query = [("Action", "ListUsers"), ("Version", "2010-05-08")];
        let headers = [(
            "content-type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )];
        let r = SignableRequest {
            method: "GET",
            host: "iam.amazonaws.com",
            path: "/",
            query: &query,
            headers: &headers,
            body: b"",
        };
        let h = sign(&r, &KEYS, "us-east-1", "iam", at());
        assert_eq!(
            authorization(&h),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    #[test]
    fn session_token_is_signed_and_sent() {
        let keys = AwsKeys {
            session_token: Some("session-token"),
            ..KEYS
        };
        let r = SignableRequest {
            method: "POST",
            host: "api.ecr.us-east-1.amazonaws.com",
            path: "/",
            query: &[],
            headers: &[],
            body: b"{}",
        };
        let h = sign(&r, &keys, "us-east-1", "ecr", at());
        assert!(
            authorization(&h).contains("SignedHeaders=host;x-amz-date;x-amz-security-token,"),
            "{h:?}"
        );
        assert!(h.contains(&("x-amz-security-token".into(), "session-token".into())));
        // A different body signs differently.
        let r2 = SignableRequest { body: b"{ }", ..r };
        assert_ne!(
            authorization(&h),
            authorization(&sign(&r2, &keys, "us-east-1", "ecr", at()))
        );
    }

    #[test]
    fn encoding_follows_rfc3986() {
        assert_eq!(encode("a b/c~d*e"), "a%20b%2Fc~d%2Ae");
        assert_eq!(
            canonical_query(&[("b", "2"), ("a", "1"), ("A", "0")]),
            "A=0&a=1&b=2"
        );
        assert_eq!(canonical_path("/x y/z"), "/x%20y/z");
    }
}
