# The Outpost image: both binaries (`outpost`, the control plane, and `outpost-agent`) on
# Debian bookworm-slim, with the PostgreSQL client tools the agent runs.
#
#   docker build -t outpost .                          # compiles from source (Rust + Node images)
#   docker build --build-arg BINARIES=host -t outpost .  # copies target/release/ from the host
#
# The second form runs the same runtime stage on binaries built on the host with
# `cargo build --release` (glibc of Debian 12 or older); `just appliance` uses it.
ARG BINARIES=source

# --- The web UI, embedded into `outpost` when it is compiled.
FROM node:20-bookworm-slim AS web
WORKDIR /src/control-plane/web
COPY control-plane/web/package.json control-plane/web/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error
COPY control-plane/web/ ./
RUN npm run build --silent

# --- Binaries compiled from source.
FROM rust:1.95-bookworm AS source
WORKDIR /src
COPY . .
COPY --from=web /src/control-plane/web/dist control-plane/web/dist
RUN cargo build --release --locked -p agent -p control-plane --bins \
 && mkdir /out && cp target/release/outpost target/release/outpost-agent /out/

# --- Binaries built on the host (`cargo build --release` after `just web`).
FROM scratch AS host
COPY target/release/outpost target/release/outpost-agent /out/

FROM ${BINARIES} AS binaries

# --- The runtime stage.
FROM debian:bookworm-slim AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="Outpost" \
      org.opencontainers.image.description="Control plane and agent for PostgreSQL fleets in isolated networks" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="README.md, section Install the appliance"
# tini is PID 1: it forwards SIGTERM to the process and reaps orphans (psql, task wrappers).
# openssl makes the appliance's certificate on first start (outpost-tls-init).
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends ca-certificates postgresql-client-15 tini openssl >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 outpost \
 && useradd --no-create-home --uid 10001 --gid outpost --home-dir /var/lib/outpost --shell /usr/sbin/nologin outpost \
 && install -d -o outpost -g outpost -m 0700 /var/lib/outpost /var/lib/outpost-agent /var/lib/outpost-demo \
 && install -d -o outpost -g outpost -m 0755 /certs
COPY --from=binaries /out/outpost /out/outpost-agent /usr/local/bin/
COPY deploy/image/ /usr/local/bin/
USER outpost
WORKDIR /var/lib/outpost
ENV OUTPOST_LISTEN=0.0.0.0:8080 \
    OUTPOST_DATA_DIR=/var/lib/outpost
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["outpost", "healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["outpost", "serve"]
