# syntax=docker/dockerfile:1
# The CPU worker, and the `sidbooth` CLI beside it. Two images from one build:
#
#   docker build -f docker/worker-cpu.Dockerfile -t sidbooth/worker-cpu:0.1.0 .
#       sidbooth-worker (entrypoint) and sidbooth
#   docker build -f docker/worker-cpu.Dockerfile --target cli -t sidbooth/cli:0.1.0 .
#       sidbooth alone: `migrate` (the one-shot migration service/Job), `s3-server`,
#       `keys create`
#
# The CLI links the engine too, so it is built here rather than in the API image. Build steps:
# docker/build.sh, which CI also runs outside a container.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
ARG CARGO_CHEF_VERSION=0.1.77
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

FROM chef AS planner
COPY . .
RUN docker/build.sh worker-cpu --step plan --recipe /tmp/recipe.json

FROM chef AS builder
ARG PROFILE=release
COPY docker/build.sh docker/build.sh
COPY --from=planner /tmp/recipe.json /tmp/recipe.json
RUN docker/build.sh worker-cpu --step deps --profile "${PROFILE}" --recipe /tmp/recipe.json
COPY . .
RUN docker/build.sh worker-cpu --profile "${PROFILE}" --out /out

FROM debian:${DEBIAN_RELEASE}-slim AS runtime-base
# ca-certificates: the S3 client trusts the system's roots (rustls-native-certs).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sidbooth \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sidbooth
COPY --chmod=0755 docker/probe.sh /usr/local/bin/sidbooth-probe
ENV SIDBOOTH_LOG_FORMAT=json

FROM runtime-base AS cli
COPY --from=builder /out/sidbooth /usr/local/bin/sidbooth
# /data: `sidbooth s3-server --dir /data`'s folder (a bucket is a folder of it), owned by the
# user it runs as, so that a fresh named volume mounted there is writable.
RUN mkdir -p /data && chown 10001:10001 /data
USER 10001:10001
EXPOSE 9000
# Meaningful for `s3-server` on port 9000; a one-shot `migrate` turns it off (compose.yaml).
HEALTHCHECK --interval=10s --timeout=5s --start-period=5s --retries=3 \
    CMD ["sidbooth-probe", "9000"]
ENTRYPOINT ["/usr/local/bin/sidbooth"]
CMD ["--help"]

FROM runtime-base AS worker
COPY --from=builder /out/sidbooth-worker /out/sidbooth /usr/local/bin/
# Prometheus metrics, and the health check's target: the worker serves nothing else.
ENV SIDBOOTH_METRICS_ADDR=0.0.0.0:9100
USER 10001:10001
EXPOSE 9100
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["sidbooth-probe", "9100", "/metrics"]
ENTRYPOINT ["/usr/local/bin/sidbooth-worker"]
