//! Which registry an image reference pulls from, as container runtimes read it: the first path
//! component is a registry host when it has a `.` or a `:` or is `localhost`; otherwise the
//! image is on Docker Hub. Used by `inject: matchingImages` to patch only Pods that pull from
//! a configured registry.

/// Docker Hub's names as they appear in image references and in `auths` keys.
const DOCKER_HUB: &[&str] = &[
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "https://index.docker.io/v1/",
];

/// The registry host of `image` (`ghcr.io`, `127.0.0.1:5000`, `docker.io`).
pub(crate) fn registry_of(image: &str) -> &str {
    match image.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            first
        }
        _ => "docker.io",
    }
}

/// Whether `image` pulls from the registry keyed `host` in a `.dockerconfigjson`.
pub(crate) fn is_on(image: &str, host: &str) -> bool {
    let registry = registry_of(image);
    registry == host || (DOCKER_HUB.contains(&registry) && DOCKER_HUB.contains(&host))
}

/// Whether any of `images` pulls from any of `hosts`.
pub(crate) fn any_on<'a>(
    images: impl IntoIterator<Item = &'a str>,
    hosts: &[impl AsRef<str>],
) -> bool {
    images
        .into_iter()
        .any(|i| hosts.iter().any(|h| is_on(i, h.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_of_image_references() {
        for (image, registry) in [
            ("nginx", "docker.io"),
            ("nginx:1.27", "docker.io"),
            ("library/nginx@sha256:abc", "docker.io"),
            ("team/app:1", "docker.io"),
            ("ghcr.io/acme/app:1", "ghcr.io"),
            ("cgr.dev/chainguard/static@sha256:0123", "cgr.dev"),
            ("127.0.0.1:5000/team-a/app", "127.0.0.1:5000"),
            ("localhost/app", "localhost"),
            (
                "registry.example.com:443/a/b/c:tag",
                "registry.example.com:443",
            ),
        ] {
            assert_eq!(registry_of(image), registry, "{image}");
        }
    }

    #[test]
    fn matching_is_by_host_with_docker_hub_aliases() {
        assert!(is_on("ghcr.io/acme/app", "ghcr.io"));
        assert!(
            !is_on("ghcr.io/acme/app", "ghcr.io:443"),
            "a different auths key is a different registry"
        );
        assert!(!is_on("ghcr.io.evil.example/app", "ghcr.io"));
        assert!(is_on("nginx", "https://index.docker.io/v1/"));
        assert!(is_on("docker.io/library/nginx", "index.docker.io"));
        assert!(any_on(["nginx", "cgr.dev/x/y"], &["cgr.dev"]));
        assert!(!any_on(["nginx", "quay.io/x/y"], &["cgr.dev", "ghcr.io"]));
        assert!(!any_on([], &["cgr.dev"]));
    }
}
