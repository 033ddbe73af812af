# syntax=docker/dockerfile:1
# sidbooth-api: the HTTP API alone. No diffusion engine and no candle inside (docker/build.sh
# checks the dependency tree before it builds).
#
#   docker build -f docker/api.Dockerfile -t sidbooth/api:0.1.0 .
#
# The build steps are docker/build.sh's, which CI also runs outside a container. The dependency
# layer (cargo-chef's `cook`) is rebuilt only when a Cargo.toml or Cargo.lock changes.
ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=trixie

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS chef
ARG CARGO_CHEF_VERSION=0.1.77
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src

FROM chef AS planner
COPY . .
RUN docker/build.sh api --step plan --recipe /tmp/recipe.json

FROM chef AS builder
ARG PROFILE=release
COPY docker/build.sh docker/build.sh
COPY --from=planner /tmp/recipe.json /tmp/recipe.json
RUN docker/build.sh api --step deps --profile "${PROFILE}" --recipe /tmp/recipe.json
COPY . .
RUN docker/build.sh api --profile "${PROFILE}" --out /out

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: the S3 client trusts the system's roots (rustls-native-certs).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 sidbooth \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin sidbooth
COPY --chmod=0755 docker/probe.sh /usr/local/bin/sidbooth-probe
COPY --from=builder /out/sidbooth-api /usr/local/bin/sidbooth-api
# The API binds 127.0.0.1:8080 by default; in a container it must listen on every interface.
ENV SIDBOOTH_API_BIND=0.0.0.0:8080 \
    SIDBOOTH_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["sidbooth-probe", "8080", "/healthz"]
ENTRYPOINT ["/usr/local/bin/sidbooth-api"]
