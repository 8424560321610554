//! Issue 22: the README's commands, as a user pastes them. Every ```sh block carries, on the
//! line before its fence, `<!-- readme: run by WHO -->` or `<!-- readme: not run here: WHY -->`;
//! the blocks this file owns run verbatim (placeholders filled in) with `bash` against the
//! harness's API server, with kubectl, helm and this binary on `PATH`.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use support::{create_namespace, repo, wait_for, ControlPlane};

const OWN: &str = "run by tests/readme.rs: ";
/// The blocks this file runs, in the order it runs them.
const RUN_HERE: [&str; 8] = [
    "install-kustomize",
    "check-config-and-status",
    "credential-provider",
    "uninstall-kustomize",
    "token-server-kustomize",
    "install-helm",
    "token-server-helm",
    "uninstall-helm",
];

struct Block {
    line: usize,
    marker: Option<String>,
    text: String,
}

/// Every ```sh block of `file`, with the `readme:` comment before it, if any.
fn sh_blocks(file: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_start().starts_with("```") {
            let fence = lines[i].trim();
            let end = (i + 1..lines.len())
                .find(|&j| lines[j].trim() == "```")
                .unwrap_or_else(|| panic!("{}:{}: unclosed block", file.display(), i + 1));
            if fence == "```sh" {
                let marker = i
                    .checked_sub(1)
                    .and_then(|p| lines[p].trim().strip_prefix("<!-- readme: "))
                    .and_then(|m| m.strip_suffix(" -->"))
                    .map(str::to_owned);
                blocks.push(Block {
                    line: i + 1,
                    marker,
                    text: lines[i + 1..end].join("\n"),
                });
            }
            i = end + 1;
        } else {
            i += 1;
        }
    }
    blocks
}

fn readme_blocks() -> Vec<Block> {
    sh_blocks(&repo().join("README.md"))
}

/// The block `name` of this file, as it stands in the README.
fn own_block(name: &str) -> String {
    let marker = format!("{OWN}{name}");
    let found: Vec<Block> = readme_blocks()
        .into_iter()
        .filter(|b| b.marker.as_deref() == Some(&marker))
        .collect();
    assert_eq!(found.len(), 1, "exactly one README block is {marker:?}");
    found.into_iter().next().unwrap().text
}

/// No cluster needed: a new command block cannot land without saying how it is checked.
#[test]
fn every_command_block_says_which_test_runs_it_or_why_none_can() {
    let blocks = readme_blocks();
    assert!(blocks.len() >= RUN_HERE.len(), "README has its blocks");
    let mut own = Vec::new();
    for b in &blocks {
        let at = format!("README.md:{}", b.line);
        let marker = b.marker.as_deref().unwrap_or_else(|| {
            panic!("{at}: no `<!-- readme: run by ... -->` or `<!-- readme: not run here: ... -->` before the block:\n{}", b.text)
        });
        if let Some(name) = marker.strip_prefix(OWN) {
            assert!(
                RUN_HERE.contains(&name),
                "{at}: {name:?} is not run by this file"
            );
            own.push(name);
        } else if let Some(who) = marker.strip_prefix("run by ") {
            let file = who.split_whitespace().next().unwrap_or_default();
            let path = repo().join(file);
            assert!(path.is_file(), "{at}: {file} does not exist");
            if file == ".ci/run" {
                // CI runs each command of the block itself.
                let ci = std::fs::read_to_string(&path).unwrap();
                for command in b.text.lines().filter_map(|l| l.split_whitespace().next()) {
                    assert!(ci.contains(command), "{at}: .ci/run does not run {command}");
                }
            }
        } else {
            let why = marker.strip_prefix("not run here: ");
            assert!(
                why.is_some_and(|w| w.len() > 20),
                "{at}: say which test runs it, or why none can: {marker:?}"
            );
        }
    }
    own.sort();
    let mut expected = RUN_HERE.to_vec();
    expected.sort();
    assert_eq!(own, expected, "each block of this file once");
}

/// A directory for `PATH` with kubectl of the cluster's release, helm, and this build's binary.
fn tools(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for tool in ["kubectl", "helm"] {
        let out = Command::new(repo().join("hack/build-kubernetes"))
            .args(["path", tool])
            .output()
            .unwrap();
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            path.is_file(),
            "{tool} is not built ({}): hack/test builds it (hack/build-kubernetes node, helm)",
            path.display()
        );
        std::os::unix::fs::symlink(&path, bin.join(tool)).unwrap();
    }
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_pull-secret-injector"),
        bin.join("pull-secret-injector"),
    )
    .unwrap();
    bin
}

/// Runs a README block with bash, from the repository, as the cluster's admin; its output.
fn paste(cp: &ControlPlane, bin: &Path, name: &str) -> String {
    let text = own_block(name).replace("<your-registry>", "registry.invalid");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &text])
        .current_dir(repo())
        .env("PATH", path)
        .env("KUBECONFIG", cp.kubeconfig())
        .env("HOME", bin.parent().unwrap())
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "README block {name} failed:\n{text}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    eprintln!("README block {name}:\n{stdout}{stderr}");
    stdout.into_owned()
}

async fn exists<K>(api: &Api<K>, name: &str) -> bool
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.unwrap().is_some()
}

async fn gone<K>(api: &Api<K>, name: &str, what: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    wait_for(what, Duration::from_secs(120), || async {
        !exists(api, name).await
    })
    .await;
}

/// The install, the checks, the token server, the credential provider and the uninstall, by
/// kustomize then by Helm, each block exactly as the README prints it. There is no node here:
/// the objects are what the API server accepts and keeps (tests/install_node.rs runs them).
#[tokio::test]
async fn the_readme_blocks_run_as_pasted() {
    let cp = ControlPlane::get();
    let c = cp.client().await;
    let dir = tempfile::tempdir().unwrap();
    let bin = tools(dir.path());
    let ns = "pull-secret-injector";
    let namespaces: Api<Namespace> = Api::all(c.clone());
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(c.clone());
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), ns);

    paste(cp, &bin, "install-kustomize");
    assert!(exists(&deployments, "pull-secret-injector").await);
    assert!(exists(&webhooks, "pull-secret-injector").await);

    create_namespace(
        &c,
        "team-a",
        [(
            "pull-secret-injector.io/inject".to_string(),
            "enabled".to_string(),
        )]
        .into(),
    )
    .await;
    let out = paste(cp, &bin, "check-config-and-status");
    assert!(out.contains("deploy/config.example.yaml: ok"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("team-a ")),
        "status lists the opted-in namespace: {out}"
    );

    let out = paste(cp, &bin, "credential-provider");
    assert!(out.contains("pull-secret-injector.yaml: ok"), "{out}");
    let daemonsets: Api<DaemonSet> = Api::namespaced(c.clone(), "kube-system");
    assert!(exists(&daemonsets, "pull-secret-injector-credential-provider").await);
    kubectl(cp, &bin, "delete -k deploy/credential-provider");

    paste(cp, &bin, "uninstall-kustomize");
    assert!(!exists(&webhooks, "pull-secret-injector").await);
    gone(
        &namespaces,
        ns,
        "the namespace deleted by kubectl delete -k",
    )
    .await;

    // Its overlay brings the namespace too, so it goes on its own: deleting it takes the
    // namespace with it.
    paste(cp, &bin, "token-server-kustomize");
    assert!(exists(&deployments, "token-server").await);
    kubectl(cp, &bin, "delete -k deploy/kustomize/token-server");
    gone(&namespaces, ns, "the token server's namespace").await;

    let out = paste(cp, &bin, "install-helm");
    assert!(out.contains("STATUS: deployed"), "{out}");
    assert!(exists(&deployments, "pull-secret-injector").await);
    let image = deployments
        .get("pull-secret-injector")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.template.spec)
        .map(|p| p.containers[0].image.clone().unwrap_or_default())
        .unwrap_or_default();
    assert!(
        image.starts_with("registry.invalid/pull-secret-injector:"),
        "{image}"
    );
    assert!(exists(&webhooks, "pull-secret-injector").await);

    paste(cp, &bin, "token-server-helm");
    assert!(exists(&deployments, "token-server").await);
    helm(cp, &bin, "uninstall token-server -n pull-secret-injector");

    paste(cp, &bin, "uninstall-helm");
    assert!(!exists(&webhooks, "pull-secret-injector").await);
    gone(&namespaces, ns, "the namespace Helm made").await;
}

fn run_tool(cp: &ControlPlane, bin: &Path, tool: &str, args: &str) {
    let out = Command::new(bin.join(tool))
        .args(args.split_whitespace())
        .current_dir(repo())
        .env("KUBECONFIG", cp.kubeconfig())
        .env("HOME", bin.parent().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{tool} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn kubectl(cp: &ControlPlane, bin: &Path, args: &str) {
    run_tool(cp, bin, "kubectl", args)
}

fn helm(cp: &ControlPlane, bin: &Path, args: &str) {
    run_tool(cp, bin, "helm", args)
}
