//! The webhook's TLS: TLS 1.2 and 1.3 only, and a certificate that is re-read when its files
//! change. Kubelet updates a mounted Secret by swapping a `..data` symlink, which file-change
//! notifications on the visible path miss; so each handshake checks (at most once a second)
//! whether the files' contents changed, and loads them if so. A bad new pair is logged and the
//! previous one keeps serving: a half-written rotation never takes the webhook down.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

const RECHECK_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable PEM private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A certificate and key loaded from two PEM files, reloaded when their bytes change.
pub struct ReloadingCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Loaded>,
    last_check: Mutex<Instant>,
}

struct Loaded {
    key: Arc<CertifiedKey>,
    /// The files' bytes as loaded, to notice any change however the files were replaced.
    fingerprint: (Vec<u8>, Vec<u8>),
}

impl fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let loaded = load(cert_file, key_file)?;
        Ok(Self {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(loaded),
            last_check: Mutex::new(Instant::now()),
        })
    }

    /// Reloads if the files changed. Returns whether a new certificate is now served.
    pub(crate) fn refresh(&self) -> bool {
        let (Ok(cert), Ok(key)) = (
            std::fs::read(&self.cert_file),
            std::fs::read(&self.key_file),
        ) else {
            tracing::warn!(cert = %self.cert_file.display(), "cannot read the TLS files; serving the previous certificate");
            return false;
        };
        let unchanged = {
            let current = self.current.read().unwrap_or_else(|p| p.into_inner());
            current.fingerprint.0 == cert && current.fingerprint.1 == key
        };
        if unchanged {
            return false;
        }
        match load(&self.cert_file, &self.key_file) {
            Ok(key) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = key;
                tracing::info!(cert = %self.cert_file.display(), "loaded a new TLS certificate");
                true
            }
            Err(e) => {
                // Often a rotation caught half-way (certificate written, key not yet).
                tracing::warn!(error = %e, "new TLS files are not usable yet; serving the previous certificate");
                false
            }
        }
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .key
            .clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let due = {
            let mut last = self.last_check.lock().unwrap_or_else(|p| p.into_inner());
            let due = last.elapsed() >= RECHECK_EVERY;
            if due {
                *last = Instant::now();
            }
            due
        };
        if due {
            self.refresh();
        }
        Some(self.current())
    }
}

/// A rustls server configuration: TLS 1.2+ (rustls has nothing older), HTTP/2 and HTTP/1.1.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A certificate chain (leaf first) and its private key, as read from two PEM files: the one
/// reader of PEM files, for the webhook's and the token server's certificates alike.
pub(crate) struct PemPair {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The files' bytes, to tell a changed pair from the same one.
    bytes: (Vec<u8>, Vec<u8>),
}

pub(crate) fn read_pem_pair(cert_file: &Path, key_file: &Path) -> Result<PemPair, TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.to_owned(),
            source,
        })
    };
    let (cert_pem, key_pem) = (read(cert_file)?, read(key_file)?);
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_file.to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
        path: key_file.to_owned(),
        reason: e.to_string(),
    })?;
    Ok(PemPair {
        chain,
        key,
        bytes: (cert_pem, key_pem),
    })
}

fn load(cert_file: &Path, key_file: &Path) -> Result<Loaded, TlsError> {
    let pair = read_pem_pair(cert_file, key_file)?;
    let provider = rustls::crypto::ring::default_provider();
    let certified =
        CertifiedKey::from_der(pair.chain, pair.key, &provider).map_err(|e| TlsError::BadKey {
            path: key_file.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(Loaded {
        key: Arc::new(certified),
        fingerprint: pair.bytes,
    })
}
