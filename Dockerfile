# A minimal image: a statically linked binary on a distroless base, running as non-root.
#   docker build -t pull-secret-injector:0.2.0 .
# The same binary is the kubelet credential provider (docs/credential-provider.md). To put it on
# nodes: the DaemonSet in deploy/credential-provider runs this image with
# `credential-provider --install-to <hostPath>` (it copies itself; the image has no shell), or a
# node image build copies it out:
#   COPY --from=pull-secret-injector:0.2.0 /usr/local/bin/pull-secret-injector /etc/kubernetes/credential-providers/
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY deploy/config.example.yaml ./deploy/config.example.yaml
RUN cargo build --release --locked --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/pull-secret-injector /pull-secret-injector

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /pull-secret-injector /usr/local/bin/pull-secret-injector
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/pull-secret-injector"]
CMD ["serve", "--config=/etc/pull-secret-injector/config.yaml"]
