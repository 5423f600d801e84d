# syntax=docker/dockerfile:1
#
# presence-service container image: one image for every role (PRESENCE_ROLE=all|gateway|shard).
#
#   docker build -t presence-service:0.1.0 .
#   docker build --build-arg CARGO_PROFILE=dev -t presence-service:debug .
#
# Build arguments:
#   RUST_IMAGE     builder image (default rust:1.95-slim-bookworm; any Debian 12 Rust >= 1.85)
#   RUNTIME_IMAGE  runtime base (default gcr.io/distroless/cc-debian12:nonroot: glibc, libgcc,
#                  CA certificates, no shell, user 65532). Must be glibc-based Debian 12 or newer.
#   CARGO_PROFILE  cargo profile to build: release (default) or dev
#   APP_UID        numeric user the service runs as (default 65532, distroless "nonroot")
#
# The build needs no system protoc (build.rs uses a vendored one) and no OpenSSL (rustls).
# Ports: 8004 HTTP API, health (/livez, /readyz) and /metrics; 9004 gRPC (shards).

ARG RUST_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
ARG CARGO_PROFILE=release
WORKDIR /src
# Manifests first, so the dependency download layer is reused while only sources change.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY loadgen ./loadgen
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --locked --profile "${CARGO_PROFILE}" --bin presence-service \
    && dir="${CARGO_PROFILE}" \
    && if [ "${CARGO_PROFILE}" = "dev" ]; then dir=debug; fi \
    && cp "target/${dir}/presence-service" /presence-service

FROM ${RUNTIME_IMAGE}
ARG APP_UID=65532
LABEL org.opencontainers.image.title="presence-service" \
      org.opencontainers.image.description="Kubernetes-native, horizontally sharded presence service for instant messaging" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /presence-service /usr/local/bin/presence-service
USER ${APP_UID}:${APP_UID}
ENV PRESENCE_LISTEN=0.0.0.0:8004 \
    PRESENCE_GRPC_LISTEN=0.0.0.0:9004 \
    PRESENCE_LOG_FORMAT=json
EXPOSE 8004 9004
ENTRYPOINT ["/usr/local/bin/presence-service"]
