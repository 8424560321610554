//! Issue 27, a release that can be verified. Without a cluster: the version is the same
//! everywhere a user reads it (Cargo.toml, both charts, the image tags in `deploy/`, the top
//! CHANGELOG entry). On the real node: `hack/release` builds the image, its SBOM (syft), a
//! cosign signature and SBOM attestation, and the chart as a signed OCI artifact, into the
//! harness's private registry; then the checks a user runs pass for the release and fail for a
//! tampered image, and `helm install oci://...` installs the pushed chart on the node.

// The `serial()` guard is held across awaits on purpose: these tests take turns.
#![allow(clippy::await_holding_lock)]

mod support;

use std::path::Path;

use serde_json::Value;
use support::repo;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_yaml::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `version = "..."` of the [package] table.
fn cargo_version() -> String {
    let text = read("Cargo.toml");
    let package = text
        .split("\n[")
        .find(|t| t.starts_with("[package]") || t.starts_with("package]"))
        .expect("Cargo.toml has [package]");
    package
        .lines()
        .find_map(|l| l.strip_prefix("version = "))
        .expect("[package] has a version")
        .trim_matches('"')
        .to_string()
}

/// The version of the first `## ` heading of CHANGELOG.md ("0.2.0 (unreleased)" is 0.2.0).
fn changelog_version() -> String {
    let text = read("CHANGELOG.md");
    let heading = text
        .lines()
        .find_map(|l| l.strip_prefix("## "))
        .expect("CHANGELOG.md has an entry");
    heading.split_whitespace().next().unwrap().to_string()
}

/// Every `image:` in the YAML files under `dir` that names this project's image: its tag.
fn deploy_image_tags(dir: &Path, found: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            deploy_image_tags(&path, found);
            continue;
        }
        if !path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            let Some(image) = line.trim().strip_prefix("image:") else {
                continue;
            };
            let image = image.trim().trim_matches('"');
            if let Some((name, tag)) = image.rsplit_once(':') {
                if name.rsplit('/').next() == Some("pull-secret-injector") {
                    let at = path.strip_prefix(repo()).unwrap().display().to_string();
                    found.push((at, tag.to_string()));
                }
            }
        }
    }
}

/// What a user reads as "the version" agrees everywhere: the crate, both charts (version and
/// appVersion), their default image tags, every image tag in `deploy/` and the top CHANGELOG
/// entry. A release bumps them together or this fails, naming the one left behind.
#[test]
fn the_version_is_the_same_everywhere() {
    let version = cargo_version();
    let mut seen = vec![("CHANGELOG.md (top entry)".to_string(), changelog_version())];
    for chart in ["pull-secret-injector", "token-server"] {
        let dir = format!("deploy/helm/{chart}");
        let meta = yaml(&format!("{dir}/Chart.yaml"));
        let values = yaml(&format!("{dir}/values.yaml"));
        for (key, value) in [
            ("Chart.yaml version", &meta["version"]),
            ("Chart.yaml appVersion", &meta["appVersion"]),
            ("values.yaml image.tag", &values["image"]["tag"]),
        ] {
            let value = value
                .as_str()
                .unwrap_or_else(|| panic!("{dir} {key} is a string: {value:?}"));
            seen.push((format!("{dir} {key}"), value.to_string()));
        }
    }
    let mut tags = Vec::new();
    deploy_image_tags(&repo().join("deploy"), &mut tags);
    let yaml_files = tags.iter().filter(|(at, _)| at.ends_with(".yaml")).count();
    assert!(
        yaml_files >= 4,
        "the kustomize base (2), token server and credential provider name the image: {tags:?}"
    );
    seen.extend(tags.into_iter().filter(|(_, tag)| !tag.contains("{{")));
    let wrong: Vec<_> = seen.iter().filter(|(_, v)| *v != version).collect();
    assert!(
        wrong.is_empty(),
        "Cargo.toml says {version}; these differ: {wrong:#?}"
    );
}
