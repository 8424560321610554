//! The served certificate follows its files, including kubelet's `..data` symlink swap, without
//! dropping open connections; a broken new pair never replaces a working one.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};

struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
}

fn ca() -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "reload test CA");
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { params, key, pem }
}

/// Writes a serving certificate named `cn` into `dir/tls.crt` and `dir/tls.key`.
fn leaf(ca: &Ca, cn: &str, dir: &Path) -> Vec<u8> {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    params.distinguished_name.push(DnType::CommonName, cn);
    let cert = params
        .signed_by(&key, &Issuer::from_params(&ca.params, &ca.key))
        .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    cert.der().to_vec()
}

/// Points `dir/..data` at `target` atomically, as kubelet does.
fn swap(dir: &Path, target: &str) {
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

/// The service serving certificates from `dir`, with an API server that accepts connections but
/// never answers: serving TLS and HTTP needs none. `extra` is appended to the config.
async fn start_offline(dir: &Path, extra: &str) -> pull_secret_injector::Service {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let kube = kube::Client::try_from(kube::Config::new(
        format!("http://{}", dead.local_addr().unwrap())
            .parse()
            .unwrap(),
    ))
    .unwrap();
    // Keep the listener open for the life of the test process: a closed port would fail fast.
    std::mem::forget(dead);
    let yaml = format!(
        "listen: 127.0.0.1:0\ntls: {{certFile: {0}/tls.crt, keyFile: {0}/tls.key}}\nregistries: [{{host: r.example.com, kubernetes: {{audience: a}}}}]\n{extra}",
        dir.display()
    );
    pull_secret_injector::Service::start(
        pull_secret_injector::settings::Settings::new(
            pull_secret_injector::config::Config::from_yaml(&yaml).unwrap(),
            &Default::default(),
        )
        .unwrap(),
        kube,
    )
    .await
    .unwrap()
}

struct Conn {
    tls: rustls::StreamOwned<rustls::ClientConnection, TcpStream>,
}

impl Conn {
    fn open(addr: std::net::SocketAddr, ca_pem: &str) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        let ca = rustls::pki_types::pem::PemObject::from_pem_slice(ca_pem.as_bytes()).unwrap();
        roots.add(ca).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let conn = rustls::ClientConnection::new(
            Arc::new(config),
            ServerName::try_from("127.0.0.1").unwrap(),
        )
        .unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut me = Conn {
            tls: rustls::StreamOwned::new(conn, tcp),
        };
        assert_eq!(me.get_healthz(), 200);
        me
    }

    fn peer(&self) -> CertificateDer<'static> {
        self.tls.conn.peer_certificates().unwrap()[0]
            .clone()
            .into_owned()
    }

    /// Sends `head` and the first half of `body`, leaving the request in flight.
    fn start_post(&mut self, body: &[u8]) {
        let head = format!("POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len());
        self.tls.write_all(head.as_bytes()).unwrap();
        self.tls.write_all(&body[..body.len() / 2]).unwrap();
        self.tls.flush().unwrap();
    }

    /// Sends the rest of `body` and reads the response: (status, body).
    fn finish_post(&mut self, body: &[u8]) -> (u16, String) {
        self.tls.write_all(&body[body.len() / 2..]).unwrap();
        self.tls.flush().unwrap();
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while !text.contains("\r\n\r\n") || !text.trim_end().ends_with('}') {
            let n = self.tls.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        (
            status,
            text.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
        )
    }

    /// One keep-alive HTTP/1.1 request on this connection; returns the status.
    fn get_healthz(&mut self) -> u16 {
        self.tls
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = self.tls.read(&mut buf).unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        head.split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_by_symlink_swap_is_picked_up_without_dropping_connections() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    let first = leaf(&ca, "first", &dir.path().join("..2026_01"));
    swap(dir.path(), "..2026_01");
    for f in ["tls.crt", "tls.key"] {
        std::os::unix::fs::symlink(format!("..data/{f}"), dir.path().join(f)).unwrap();
    }

    let service = start_offline(dir.path(), "").await;
    let addr = service.local_addr;

    let (ca_pem, d) = (ca.pem.clone(), dir.path().to_owned());
    tokio::task::spawn_blocking(move || {
        let mut old = Conn::open(addr, &ca_pem);
        assert_eq!(old.peer().as_ref(), first.as_slice());

        let second = leaf(&ca, "second", &d.join("..2026_02"));
        swap(&d, "..2026_02");
        std::thread::sleep(Duration::from_millis(1500));
        let fresh = Conn::open(addr, &ca_pem);
        assert_eq!(
            fresh.peer().as_ref(),
            second.as_slice(),
            "a new connection gets the new certificate"
        );
        assert_eq!(
            old.get_healthz(),
            200,
            "the connection opened before the swap still works"
        );

        // A half-written rotation (certificate without its key) is not served.
        let broken = d.join("..2026_03");
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::write(
            broken.join("tls.crt"),
            "-----BEGIN CERTIFICATE-----\nnot really\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        std::fs::write(broken.join("tls.key"), "").unwrap();
        swap(&d, "..2026_03");
        std::thread::sleep(Duration::from_millis(1500));
        let after_broken = Conn::open(addr, &ca_pem);
        assert_eq!(
            after_broken.peer().as_ref(),
            second.as_slice(),
            "the last good certificate keeps serving"
        );
    })
    .await
    .unwrap();
    service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_admission_in_flight_finish() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    leaf(&ca, "only", dir.path());
    let service = start_offline(dir.path(), "").await;
    let addr = service.local_addr;
    let body = serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": "in-flight", "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
                    "namespace": "team-a", "operation": "CREATE", "object": {}}
    }))
    .unwrap();
    let ca_pem = ca.pem.clone();
    let (b, conn) = (
        body.clone(),
        tokio::task::spawn_blocking(move || {
            let mut c = Conn::open(addr, &ca_pem);
            c.start_post(&body);
            c
        })
        .await
        .unwrap(),
    );
    // Let the server read the headers: from then on the request is in flight (a connection whose
    // request has not begun is idle, and graceful shutdown rightly closes idle connections).
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Shutdown begins while the request is half sent...
    let stopping = tokio::spawn(service.shutdown());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stopping.is_finished(),
        "shutdown waits for the request in flight"
    );
    // ...and the request still completes with a proper answer.
    let (status, answer) = tokio::task::spawn_blocking(move || {
        let mut conn = conn;
        conn.finish_post(&b)
    })
    .await
    .unwrap();
    assert_eq!(status, 200, "{answer}");
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["response"]["uid"], "in-flight");
    assert_eq!(answer["response"]["allowed"], true);
    stopping.await.unwrap();
    assert!(
        std::net::TcpStream::connect(addr).is_err(),
        "a stopped server accepts no connections"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_hold_connections() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = ca();
    let dir = tempfile::tempdir().unwrap();
    leaf(&ca, "only", dir.path());
    let service = start_offline(dir.path(), "admission: {readTimeout: 1s}\n").await;
    let addr = service.local_addr;
    let ca_pem = ca.pem.clone();
    tokio::task::spawn_blocking(move || {
        // Headers that never finish: the connection is closed after the read timeout.
        let mut slow_head = Conn::open(addr, &ca_pem);
        slow_head.tls.write_all(b"POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(2500));
        let mut buf = [0u8; 512];
        // (The socket's own read timeout is 5 s: running into it means the server kept waiting.)
        match slow_head.tls.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => assert!(String::from_utf8_lossy(&buf[..n]).contains(" 408 "), "{}", String::from_utf8_lossy(&buf[..n])),
            Err(e) => assert!(
                !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
                "the server kept a connection with unfinished headers open"
            ),
        }

        // A body that never finishes: 408 with a JSON error.
        let mut slow_body = Conn::open(addr, &ca_pem);
        slow_body
            .tls
            .write_all(b"POST /mutate HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"apiVersion\"")
            .unwrap();
        let started = std::time::Instant::now();
        let n = slow_body.tls.read(&mut buf).unwrap();
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("not received within 1000ms"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(4));
    })
    .await
    .unwrap();
    service.shutdown().await;
}
