//! A real HTTP CONNECT proxy on loopback: Debian's `tinyproxy` (`hack/test` installs it), with
//! its log in a temporary directory, so a test can prove which connections went through it.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Proxy {
    /// `http://127.0.0.1:PORT`, for `$HTTPS_PROXY`.
    pub url: String,
    log: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Proxy {
    /// Starts tinyproxy, or `None` outside CI when it is not installed (in CI its absence
    /// fails the test).
    pub fn start() -> Option<Proxy> {
        let present = Command::new("sh")
            .args(["-c", "command -v tinyproxy"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            assert!(
                std::env::var_os("CI").is_none(),
                "tinyproxy is required in CI (hack/test installs it)"
            );
            eprintln!("SKIPPED: tinyproxy is not installed (apt-get install tinyproxy)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = super::registry::free_port("127.0.0.1");
        let log = dir.path().join("tinyproxy.log");
        let conf = dir.path().join("tinyproxy.conf");
        // No ConnectPort line: CONNECT to any port (the stand-ins listen on random ones).
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Connect\nMaxClients 50\nAllow 127.0.0.1\n",
                log.display()
            ),
        )
        .unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tinyproxy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tinyproxy did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Proxy {
            url: format!("http://127.0.0.1:{port}"),
            log,
            child,
            _dir: dir,
        })
    }

    /// How many CONNECT requests to `host_port` the proxy has logged.
    pub fn connects_to(&self, host_port: &str) -> usize {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let needle = format!(": CONNECT {host_port} ");
        text.lines().filter(|l| l.contains(&needle)).count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
