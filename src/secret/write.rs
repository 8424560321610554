//! The write plan, pure: given the registries configured, what was just minted, what failed and
//! what the stored Secret still holds, the credentials the next version holds, or why there is
//! nothing worth writing. The provisioner mints, reports and writes around it.

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::error::ProvisionError;
use crate::core::credential::Credential;

/// The next version of a Secret: its credentials in configuration order, and how many mints
/// failed (their registries keep a stored credential while it is unexpired).
#[derive(Debug)]
pub(crate) struct NextVersion {
    pub credentials: Vec<(String, Credential)>,
    pub failed: usize,
}

/// What a round of mints gives the next version. `dropping`: the plan removes a registry no
/// longer configured, which is worth a write even when no mint succeeded.
pub(crate) fn next_version(
    configured: &[&str],
    minted: &[(String, Credential)],
    failures: &[(String, ProvisionError)],
    mut carried: BTreeMap<String, Credential>,
    dropping: bool,
    now: Timestamp,
) -> Result<NextVersion, ProvisionError> {
    if let Some((_, e)) = failures.first().filter(|_| minted.is_empty() && !dropping) {
        // Nothing new to write: the stored Secret, if any, stays as it is.
        return Err(e.clone());
    }
    let mut credentials = Vec::new();
    for host in configured {
        let fresh = minted
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, c)| c.clone());
        let kept = || carried.remove(*host).filter(|c| c.expires_at > now);
        if let Some(c) = fresh.or_else(kept) {
            credentials.push((host.to_string(), c));
        }
    }
    if credentials.is_empty() {
        return Err(ProvisionError::NoUsableCredential {
            registries: configured.join(", "),
        });
    }
    Ok(NextVersion {
        credentials,
        failed: failures.len(),
    })
}

/// The note of the `MintFailed` Event: what failed, and which registries keep their stored,
/// unexpired credentials meanwhile.
pub(crate) fn mint_failed_note(
    failures: &[(String, ProvisionError)],
    carried: &BTreeMap<String, Credential>,
    now: Timestamp,
) -> String {
    let kept: Vec<&str> = failures
        .iter()
        .filter(|(h, _)| carried.get(h).is_some_and(|c| c.expires_at > now))
        .map(|(h, _)| h.as_str())
        .collect();
    let summary = failures
        .iter()
        .map(|(_, e)| e.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    if kept.is_empty() {
        format!("{summary}; minting is retried")
    } else {
        format!(
            "{summary}; the current credentials for {} stay in place until they expire, and \
             minting is retried",
            kept.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::credential::Sensitive;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn cred(password: &str, expires: i64) -> Credential {
        Credential {
            username: "u".into(),
            password: Sensitive::new(password),
            issued_at: at(0),
            expires_at: at(expires),
        }
    }

    fn failed(host: &str) -> (String, ProvisionError) {
        let e = ProvisionError::Mint {
            registry: host.to_string(),
            source: std::sync::Arc::new(crate::sources::MintError::Unusable {
                source_name: "test",
                reason: "refused".into(),
            }),
        };
        (host.to_string(), e)
    }

    /// The next version in words: `host=password` in order, and the failures, or the error.
    fn outcome(r: Result<NextVersion, ProvisionError>) -> String {
        match r {
            Ok(v) => {
                let hosts: Vec<String> = v
                    .credentials
                    .iter()
                    .map(|(h, c)| format!("{h}={}", c.password.expose()))
                    .collect();
                format!("write {} failed={}", hosts.join(","), v.failed)
            }
            Err(ProvisionError::NoUsableCredential { .. }) => "error: none usable".into(),
            Err(e) => format!("error: {e}"),
        }
    }

    #[test]
    fn every_branch() {
        let configured = ["a.example", "b.example"];
        let now = at(100);
        let stored = |a: i64, b: i64| {
            BTreeMap::from([
                ("a.example".to_string(), cred("old-a", a)),
                ("b.example".to_string(), cred("old-b", b)),
            ])
        };
        // (what, minted, failed, carried, dropping, expected)
        type Minted = Vec<(String, Credential)>;
        type Failed = Vec<(String, ProvisionError)>;
        type Case<'a> = (
            &'a str,
            Minted,
            Failed,
            BTreeMap<String, Credential>,
            bool,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                "both minted, in configuration order",
                vec![("b.example".into(), cred("new-b", 900)), ("a.example".into(), cred("new-a", 900))],
                vec![],
                BTreeMap::new(),
                false,
                "write a.example=new-a,b.example=new-b failed=0",
            ),
            (
                "one minted, the other not due: carried over",
                vec![("a.example".into(), cred("new-a", 900))],
                vec![],
                stored(50, 500),
                false,
                "write a.example=new-a,b.example=old-b failed=0",
            ),
            (
                "one failed: its unexpired credential stays",
                vec![("a.example".into(), cred("new-a", 900))],
                vec![failed("b.example")],
                stored(50, 500),
                false,
                "write a.example=new-a,b.example=old-b failed=1",
            ),
            (
                "one failed and its credential expired: left out",
                vec![("a.example".into(), cred("new-a", 900))],
                vec![failed("b.example")],
                stored(50, 100),
                false,
                "write a.example=new-a failed=1",
            ),
            (
                "every mint failed: nothing new to write",
                vec![],
                vec![failed("a.example"), failed("b.example")],
                stored(500, 500),
                false,
                "error: minting a credential for a.example failed: test returned an unusable credential: refused",
            ),
            (
                "every mint failed, but a registry is dropped: written with what is stored",
                vec![],
                vec![failed("a.example")],
                stored(500, 500),
                true,
                "write a.example=old-a,b.example=old-b failed=1",
            ),
            (
                "a registry dropped, nothing usable left",
                vec![],
                vec![],
                stored(50, 100),
                true,
                "error: none usable",
            ),
        ];
        for (what, minted, failures, carried, dropping, expected) in cases {
            let got = outcome(next_version(
                &configured,
                &minted,
                &failures,
                carried,
                dropping,
                now,
            ));
            assert_eq!(got, expected, "{what}");
        }
    }

    #[test]
    fn the_mint_failed_note_names_what_stays_in_place() {
        let now = at(100);
        let carried = BTreeMap::from([
            ("a.example".to_string(), cred("old-a", 500)),
            ("b.example".to_string(), cred("old-b", 50)),
        ]);
        let note = mint_failed_note(&[failed("a.example"), failed("b.example")], &carried, now);
        assert!(
            note.ends_with(
                "; the current credentials for a.example stay in place until they expire, and \
                 minting is retried"
            ),
            "{note}"
        );
        let note = mint_failed_note(&[failed("b.example")], &carried, now);
        assert!(
            note.ends_with(
                "b.example failed: test returned an unusable credential: refused; minting is retried"
            ),
            "{note}"
        );
    }
}
