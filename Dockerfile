# syntax=docker/dockerfile:1
# warren: warren-broker, warren-ctl and warren-lb in one image (docs/deploy.md).
#
#   docker build -t warren .
#   docker run --rm warren warren-broker --help
#
# Stage 1 builds the three binaries with the Rust toolchain image; stage 2 runs them on a slim
# Debian as a non-root user, with the broker's data directory as a volume.

ARG RUST_VERSION=1.85
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# Only the three shipped binaries (the workspace's other members are tests and tools). The
# cache mounts keep the registry and the target directory between builds; the binaries are
# copied out of the cached target directory, which is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p warren-broker -p warren-ctl -p warren-lb --bins \
    && mkdir -p /out \
    && cp target/release/warren-broker target/release/warren-ctl target/release/warren-lb /out/

FROM debian:${DEBIAN_RELEASE}-slim
# curl: the Kubernetes probes and pre-stop hook ask the management API's health checks from
# inside the pod (deploy/k8s/broker.yaml); tini: PID 1 that forwards SIGTERM and reaps.
# Unpinned: the release's security updates come with each rebuild (pinned point versions vanish
# from the archive as they are superseded).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 999 warren \
    && useradd --system --uid 999 --gid warren --home-dir /var/lib/warren --shell /usr/sbin/nologin warren \
    && mkdir -p /var/lib/warren /run/warren \
    && chown warren:warren /var/lib/warren /run/warren
COPY --from=build /out/warren-broker /out/warren-ctl /out/warren-lb /usr/local/bin/
# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 999:999
WORKDIR /var/lib/warren
VOLUME ["/var/lib/warren"]
# AMQP, management HTTP (API and UI), inter-node (cluster) traffic, Prometheus /metrics.
EXPOSE 5672 15672 25672 15692
ENTRYPOINT ["/usr/bin/tini", "--"]
# Every listener on every interface; a clustered node adds --cluster-listen 0.0.0.0:25672,
# --node-name warren@HOST (HOST: the name its peers reach it at), --cluster-secret-file and --join.
CMD ["warren-broker", "--data-dir", "/var/lib/warren", "--amqp", "0.0.0.0:5672", "--mgmt", "0.0.0.0:15672"]
