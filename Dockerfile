# syntax=docker/dockerfile:1
#
# A static lease-exec binary on an empty, non-root image:
#
#   docker build -t lease-exec .
#
# Most images copy the binary in and prefix their own entrypoint:
#
#   FROM my-worker-image
#   COPY --from=lease-exec /lease-exec /usr/local/bin/lease-exec
#   ENTRYPOINT ["/usr/local/bin/lease-exec", "my-worker", "--"]
#   CMD ["/worker", "--flag"]

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src

# Dependencies in their own layer: rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && cargo build --release --locked --target x86_64-unknown-linux-musl \
 && rm -rf src

COPY src ./src
# Make sure cargo sees the real sources as newer than the placeholder build.
RUN touch src/main.rs src/lib.rs \
 && cargo build --release --locked --target x86_64-unknown-linux-musl \
 && cp target/x86_64-unknown-linux-musl/release/lease-exec /lease-exec

FROM scratch
# CA roots for API servers reached through a kubeconfig; in a pod the service-account CA is used.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /lease-exec /lease-exec
USER 65532:65532
ENTRYPOINT ["/lease-exec"]
