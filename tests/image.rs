//! The image `hack/image` builds without a container engine, against the Dockerfile users with an
//! engine build: the same entrypoint, arguments, user and binary path, a binary that needs
//! nothing from the file system it runs in, and a user the image's `/etc/passwd` knows.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use support::repo;

/// What the Dockerfile's final stage says: ENTRYPOINT, CMD, USER and where COPY puts files.
struct Dockerfile {
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    user: String,
    copied_to: Vec<String>,
}

fn dockerfile() -> Dockerfile {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    // Instructions, with continuation lines joined and comments dropped.
    let joined = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
        .replace("\\\n", " ");
    let last_stage = joined
        .rsplit_once("\nFROM ")
        .expect("a multi-stage build")
        .1;
    let mut file = Dockerfile {
        entrypoint: vec![],
        cmd: vec![],
        user: String::new(),
        copied_to: vec![],
    };
    for line in last_stage.lines() {
        let (instruction, rest) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
        let exec_form = || -> Vec<String> {
            serde_json::from_str(rest.trim()).unwrap_or_else(|e| {
                panic!("{instruction} must be in exec form (a JSON array): {rest}: {e}")
            })
        };
        match instruction {
            "ENTRYPOINT" => file.entrypoint = exec_form(),
            "CMD" => file.cmd = exec_form(),
            "USER" => file.user = rest.trim().to_string(),
            "COPY" => file
                .copied_to
                .push(rest.split_whitespace().last().unwrap().to_string()),
            _ => {}
        }
    }
    file
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image built by `hack/image` (the release build is incremental), unpacked: its config and
/// its one layer's file system.
fn built_image(dir: &Path) -> (Value, PathBuf) {
    let archive = dir.join("image.tar");
    run(Command::new(repo().join("hack/image"))
        .arg("--out")
        .arg(&archive)
        .args(["--name", "registry.test/pull-secret-injector:test"]));
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(&archive)
        .arg("-C")
        .arg(&layout));
    let read = |digest: &str| {
        std::fs::read(
            layout
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap()
    };
    let index: Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest: Value =
        serde_json::from_slice(&read(index["manifests"][0]["digest"].as_str().unwrap())).unwrap();
    let config: Value =
        serde_json::from_slice(&read(manifest["config"]["digest"].as_str().unwrap())).unwrap();
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    let layer = layout.join("blobs/sha256").join(
        layers[0]["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:"),
    );
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&layer)
        .arg("-C")
        .arg(&root));
    (config, root)
}

/// Whether an ELF file asks for a program interpreter (a dynamic loader), from its headers.
fn elf_interpreter(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    assert_eq!(bytes[4], 2, "64-bit");
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap()) as usize;
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap()) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let p_type = u32::from_le_bytes(
            bytes[phoff + i * phentsize..phoff + i * phentsize + 4]
                .try_into()
                .unwrap(),
        );
        p_type == 3 // PT_INTERP
    })
}

#[test]
fn the_engine_free_image_matches_the_dockerfile_and_runs_alone_as_its_user() {
    let docker = dockerfile();
    let dir = tempfile::tempdir().unwrap();
    let (config, root) = built_image(dir.path());
    let c = &config["config"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    assert_eq!(strings(&c["Entrypoint"]), docker.entrypoint, "entrypoint");
    assert_eq!(strings(&c["Cmd"]), docker.cmd, "arguments");
    assert_eq!(c["User"], docker.user.as_str(), "user");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");

    // What the Dockerfile copies is where it puts it, and the entrypoint is that binary.
    for path in &docker.copied_to {
        let file = root.join(path.trim_start_matches('/'));
        assert!(file.is_file(), "{path} is in the image");
    }
    let binary = root.join(docker.entrypoint[0].trim_start_matches('/'));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&binary).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert!(
        !elf_interpreter(&binary),
        "statically linked: no dynamic loader, like distroless/static"
    );

    // The user, as distroless' nonroot: UID and GID 65532, in /etc/passwd and /etc/group.
    let (uid, gid) = docker.user.split_once(':').expect("USER uid:gid");
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f[2] == uid)
        .unwrap_or_else(|| panic!("no /etc/passwd entry for UID {uid}: {passwd}"));
    assert_eq!(
        (entry[0], entry[3], entry[5]),
        ("nonroot", gid, "/home/nonroot")
    );
    assert!(std::fs::read_to_string(root.join("etc/group"))
        .unwrap()
        .lines()
        .any(|l| l.split(':').nth(2) == Some(gid)));
    assert!(root.join("home/nonroot").is_dir());
    assert_eq!(
        std::fs::metadata(root.join("tmp"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o1777
    );
    // Name lookups with glibc's built-in modules only (hack/image explains why).
    assert_eq!(
        std::fs::read_to_string(root.join("etc/nsswitch.conf")).unwrap(),
        "hosts: files dns\n"
    );
    // CA certificates where rustls-native-certs (and SSL_CERT_FILE) look.
    let bundle = std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(bundle.matches("BEGIN CERTIFICATE").count() > 50);
    assert!(strings(&c["Env"]).contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt".into()));

    // It runs with only the image's files, as its user: check-config of the shipped config
    // (listen and TLS paths as in the Deployment).
    let config_dir = root.join("etc/pull-secret-injector");
    std::fs::create_dir_all(&config_dir).unwrap();
    let shipped =
        std::fs::read_to_string(repo().join("deploy/kustomize/base/configmap.yaml")).unwrap();
    let cm: Value = serde_yaml::from_str(&shipped).unwrap();
    std::fs::write(
        config_dir.join("config.yaml"),
        cm["data"]["config.yaml"].as_str().unwrap(),
    )
    .unwrap();
    let out = run(Command::new("/usr/sbin/chroot")
        .arg(format!("--userspec={}", docker.user))
        .arg(&root)
        .args(&docker.entrypoint)
        .args([
            "check-config",
            "--config=/etc/pull-secret-injector/config.yaml",
        ])
        .env_clear()
        .env("POD_NAMESPACE", "pull-secret-injector"));
    assert!(out.contains(": ok"), "{out}");
}
