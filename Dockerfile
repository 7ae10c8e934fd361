# syntax=docker/dockerfile:1
#
# A static lease-exec binary on an empty, non-root image, for linux/amd64 and linux/arm64:
#
#   docker build -t lease-exec .                       # the builder's own platform
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/lease-exec:TAG --push .
#
# Most images copy the binary in and prefix their own entrypoint:
#
#   FROM my-worker-image
#   COPY --from=lease-exec /lease-exec /usr/local/bin/lease-exec
#   ENTRYPOINT ["/usr/local/bin/lease-exec", "my-worker", "--"]
#   CMD ["/worker", "--flag"]
#
# The build stage runs on the builder's own platform and cross-compiles to TARGETARCH's musl
# target, so nothing is emulated while building. The compiler, linker and checks for each
# architecture are in .ci/static-build. .ci/image-check follows this stage's steps from WORKDIR on,
# as written here (COPY from the repository, RUN with sh -c and TARGETARCH set), for amd64 and
# arm64, then runs both binaries against a real API server: the steps before WORKDIR, the
# toolchain, are what .ci/run installs on its machine (static-build --packages and --target).

FROM --platform=$BUILDPLATFORM rust:1.95-bookworm AS build
ARG TARGETARCH
COPY .ci/static-build /usr/local/bin/static-build
RUN apt-get update \
 && apt-get install -y --no-install-recommends $(static-build --packages "$TARGETARCH") \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add "$(static-build --target "$TARGETARCH")"
WORKDIR /src

# Dependencies in their own layer: rebuilt only when Cargo.toml or Cargo.lock change. Cargo reads
# every target Cargo.toml declares, so the declared example gets a placeholder too (it is not
# built: static-build builds the library and the binary).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src examples/jepsen \
 && echo 'fn main() {}' > src/main.rs \
 && touch src/lib.rs \
 && echo 'fn main() {}' > examples/jepsen/main.rs \
 && static-build "$TARGETARCH" \
 && rm -rf src

COPY src ./src
# Make sure cargo sees the real sources as newer than the placeholder build.
RUN touch src/main.rs src/lib.rs \
 && bin=$(static-build "$TARGETARCH") \
 && cp "$bin" lease-exec

FROM scratch
# CA roots for API servers reached through a kubeconfig; in a pod the service-account CA is used.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /src/lease-exec /lease-exec
USER 65532:65532
ENTRYPOINT ["/lease-exec"]
