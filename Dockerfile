# A minimal image: a statically linked binary on a distroless base, running as non-root.
#   docker build -t pull-secret-injector:0.2.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t <your-registry>/pull-secret-injector:0.2.0 --push .
# The build stage runs on the builder's own platform (BUILDPLATFORM) and cross-compiles for
# each TARGETPLATFORM: linux/amd64 -> x86_64-unknown-linux-musl, linux/arm64 ->
# aarch64-unknown-linux-musl, with zig as the C compiler and linker (cargo-zigbuild), so no
# emulation is needed. Only linux/amd64 is built and tested by this repository's tests (with
# hack/image, the engine-free build of the same file system; see the README).
# The same binary is the kubelet credential provider (docs/credential-provider.md). To put it on
# nodes: the DaemonSet in deploy/credential-provider runs this image with
# `credential-provider --install-to <hostPath>` (it copies itself; the image has no shell), or a
# node image build copies it out:
#   COPY --from=pull-secret-injector:0.2.0 /usr/local/bin/pull-secret-injector /etc/kubernetes/credential-providers/
FROM --platform=$BUILDPLATFORM rust:1-bookworm AS build
ARG TARGETPLATFORM
RUN case "${TARGETPLATFORM:-linux/amd64}" in \
      linux/amd64) echo x86_64-unknown-linux-musl ;; \
      linux/arm64|linux/arm64/v8) echo aarch64-unknown-linux-musl ;; \
      *) echo "unsupported platform ${TARGETPLATFORM}: linux/amd64 or linux/arm64" >&2; exit 1 ;; \
    esac >/rust-target \
 && rustup target add "$(cat /rust-target)" \
 && apt-get update && apt-get install -y --no-install-recommends python3-pip && rm -rf /var/lib/apt/lists/* \
 && pip3 install --no-cache-dir --break-system-packages cargo-zigbuild==0.24.0 ziglang==0.17.0
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY deploy/config.example.yaml ./deploy/config.example.yaml
RUN cargo zigbuild --release --locked --target "$(cat /rust-target)" \
 && cp "target/$(cat /rust-target)/release/pull-secret-injector" /pull-secret-injector

# distroless publishes static-debian12 for amd64 and arm64; the engine picks TARGETPLATFORM's.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /pull-secret-injector /usr/local/bin/pull-secret-injector
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/pull-secret-injector"]
CMD ["serve", "--config=/etc/pull-secret-injector/config.yaml"]
