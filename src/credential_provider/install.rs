//! Putting the plugin on a node: this binary and its config copied into the kubelet's
//! `--image-credential-provider-bin-dir`, each written beside its final name and renamed over
//! it, so that a kubelet running the plugin meanwhile sees the old file or the new one, never
//! half of one. A DaemonSet's init container does this from the image, which has no shell.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("installing into {dir}: {message}")]
pub struct InstallError {
    pub dir: PathBuf,
    pub message: String,
}

/// Copies `binary` to `dir/name` (mode 0755) and `config` to `dir/name.yaml`; returns the paths.
pub fn install(
    binary: &Path,
    config: &Path,
    dir: &Path,
    name: &str,
) -> Result<Vec<PathBuf>, InstallError> {
    let fail = |message: String| InstallError {
        dir: dir.to_path_buf(),
        message,
    };
    if name.is_empty() || name.contains('/') || name.contains(' ') || name == "." || name == ".." {
        // The kubelet's own rules for a provider's name, which is this file's name.
        return Err(fail(format!(
            "{name:?} cannot be a provider name (no '/', no spaces)"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    let targets = [
        (binary, dir.join(name), 0o755),
        (config, dir.join(format!("{name}.yaml")), 0o644),
    ];
    for (from, to, mode) in &targets {
        let partial = dir.join(format!(".{}.partial", file_name(to)));
        std::fs::copy(from, &partial)
            .map_err(|e| fail(format!("copying {}: {e}", from.display())))?;
        set_mode(&partial, *mode).map_err(|e| fail(e.to_string()))?;
        std::fs::rename(&partial, to)
            .map_err(|e| fail(format!("renaming to {}: {e}", to.display())))?;
    }
    Ok(targets.into_iter().map(|(_, to, _)| to).collect())
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_replace_what_was_there() {
        let dir = tempfile::tempdir().unwrap();
        let (binary, config) = (dir.path().join("bin"), dir.path().join("c.yaml"));
        std::fs::write(&binary, "new binary").unwrap();
        std::fs::write(&config, "registries: []").unwrap();
        let into = dir.path().join("providers");
        std::fs::create_dir_all(&into).unwrap();
        std::fs::write(into.join("psi"), "old binary").unwrap();
        let paths = install(&binary, &config, &into, "psi").unwrap();
        assert_eq!(paths, [into.join("psi"), into.join("psi.yaml")]);
        assert_eq!(
            std::fs::read_to_string(into.join("psi")).unwrap(),
            "new binary"
        );
        assert_eq!(
            std::fs::read_to_string(into.join("psi.yaml")).unwrap(),
            "registries: []"
        );
        let mut left: Vec<_> = std::fs::read_dir(&into)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["psi", "psi.yaml"], "no partial files left");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(into.join("psi"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o755);
        }
        let e = install(&binary, &config, &into, "a/b").unwrap_err();
        assert!(e.to_string().contains("cannot be a provider name"), "{e}");
    }
}
