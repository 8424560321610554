//! Registry tokens: JWTs signed ES256 with the token server's key, carrying its certificate in
//! `x5c`, so a registry that trusts that certificate (distribution's `rootcertbundle`) accepts
//! them. Claims as distribution 2.8 reads them: `iss`, `sub`, `aud` (one string: the registry's
//! `service`), `exp`, `nbf`, `iat`, `jti` and `access`.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use jiff::Timestamp;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use rustls::pki_types::PrivateKeyDer;
use serde_json::json;

use super::rules::Access;
use crate::core::jwt;
use crate::tls::{self, PemPair, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("signing certificate {path}: {message}")]
    Certificate { path: String, message: String },
    #[error("signing key {path}: {message}")]
    Key { path: String, message: String },
}

pub(crate) struct Signer {
    key: EcdsaKeyPair,
    /// The certificate chain, leaf first, as `x5c` wants it (standard base64 DER).
    x5c: Vec<String>,
    issuer: String,
    rng: SystemRandom,
}

impl Signer {
    /// `cert_file`: PEM chain, leaf first. `key_file`: the leaf's P-256 key, PEM PKCS#8.
    pub(crate) fn from_files(
        cert_file: &Path,
        key_file: &Path,
        issuer: &str,
    ) -> Result<Self, SignerError> {
        let cert_error = |message: String| SignerError::Certificate {
            path: cert_file.display().to_string(),
            message,
        };
        let key_error = |message: String| SignerError::Key {
            path: key_file.display().to_string(),
            message,
        };
        let PemPair { chain, key, .. } =
            tls::read_pem_pair(cert_file, key_file).map_err(|e| match e {
                TlsError::BadKey { reason, .. } => key_error(reason),
                TlsError::Read { path, source } if path == key_file => {
                    key_error(source.to_string())
                }
                TlsError::NoCertificate { .. } => cert_error("no PEM certificate in it".into()),
                other => cert_error(other.to_string()),
            })?;
        let PrivateKeyDer::Pkcs8(pkcs8) = key else {
            return Err(key_error(
                "must be a PKCS#8 key (convert with `openssl pkcs8 -topk8 -nocrypt`)".into(),
            ));
        };
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.secret_pkcs8_der(),
            &rng,
        )
        .map_err(|e| key_error(format!("not a P-256 ECDSA key ({e})")))?;
        let x5c = chain
            .iter()
            .map(|c| base64::engine::general_purpose::STANDARD.encode(c.as_ref()))
            .collect();
        Ok(Self {
            key,
            x5c,
            issuer: issuer.to_string(),
            rng,
        })
    }

    /// A token for `subject` with `access` at `service`, valid `lifetime` from `now`.
    pub(crate) fn sign(
        &self,
        subject: &str,
        service: &str,
        access: &[Access],
        now: Timestamp,
        lifetime: Duration,
    ) -> Result<String, ring::error::Unspecified> {
        let b64 = jwt::encode_part;
        let mut jti = [0u8; 16];
        self.rng.fill(&mut jti)?;
        let iat = now.as_second();
        let header = json!({"alg": "ES256", "typ": "JWT", "x5c": self.x5c});
        let claims = json!({
            "iss": self.issuer,
            "sub": subject,
            "aud": service,
            "iat": iat,
            "nbf": iat - 5,
            "exp": iat + lifetime.as_secs() as i64,
            "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self.key.sign(&self.rng, input.as_bytes())?;
        Ok(format!("{input}.{}", b64(signature.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    #[test]
    fn tokens_carry_the_chain_and_verify_with_the_certificate_key() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        let signer = Signer::from_files(&c, &k, "psi-token-server").unwrap();
        let access = vec![Access {
            kind: "repository".into(),
            name: "team-a/app".into(),
            actions: vec!["pull".into()],
        }];
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let token = signer
            .sign(
                "system:serviceaccount:team-a:default",
                "registry.test",
                &access,
                now,
                Duration::from_secs(300),
            )
            .unwrap();
        let parts = jwt::split(&token).unwrap();
        let d = |s: &str| jwt::decode_part(s).unwrap();
        let header: serde_json::Value = serde_json::from_slice(&d(parts[0])).unwrap();
        let claims: serde_json::Value = serde_json::from_slice(&d(parts[1])).unwrap();
        assert_eq!(header["alg"], "ES256");
        assert_eq!(
            header["x5c"][0],
            base64::engine::general_purpose::STANDARD.encode(cert.der())
        );
        assert_eq!(
            claims["aud"], "registry.test",
            "distribution 2.8 reads aud as one string"
        );
        assert_eq!(claims["exp"], 1_800_000_300i64);
        assert_eq!(
            claims["access"][0],
            json!({"type": "repository", "name": "team-a/app", "actions": ["pull"]})
        );
        let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.public_key_raw());
        public
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &d(parts[2]),
            )
            .expect("signature verifies");
    }

    #[test]
    fn bad_key_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let c = dir.path().join("c.pem");
        std::fs::write(&c, "not pem").unwrap();
        let e = Signer::from_files(&c, &c, "x").err().unwrap();
        assert!(e.to_string().starts_with("signing certificate"), "{e}");
    }
}
