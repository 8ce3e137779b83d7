# syntax=docker/dockerfile:1
# mde-forwarder container image: build with the same cargo command as CI
# (locked dependencies), run as an unprivileged user on a slim Debian.
# Usage and the health check are described in docs/running.md.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The emulator's sample detections are compiled into the binary.
COPY tests/data ./tests/data
RUN cargo build --release --locked

FROM debian:bookworm-slim
# ca-certificates is not needed: reqwest uses rustls with built-in roots.
RUN groupadd --system --gid 10001 mde-forwarder \
 && useradd --system --uid 10001 --gid mde-forwarder --home-dir /var/lib/mde-forwarder --shell /usr/sbin/nologin mde-forwarder \
 && install -d -o mde-forwarder -g mde-forwarder -m 0700 /var/lib/mde-forwarder \
 && install -d -m 0755 /etc/mde-forwarder
COPY --from=build /src/target/release/mde-forwarder /usr/local/bin/mde-forwarder

# The config file is mounted at /etc/mde-forwarder/config.toml; any key can be
# set with MDE_FORWARDER__SECTION__KEY variables. The state directory is a
# volume so that checkpoints and the outbox survive a new container.
ENV MDE_FORWARDER__STATE__DIR=/var/lib/mde-forwarder \
    MDE_FORWARDER__SERVICE__LISTEN=0.0.0.0:9898 \
    MDE_FORWARDER__SERVICE__LOG_FORMAT=json
VOLUME ["/var/lib/mde-forwarder"]
EXPOSE 9898
USER 10001:10001

HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/mde-forwarder", "health", "--url", "http://127.0.0.1:9898/health", "--timeout-secs", "5"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/mde-forwarder"]
CMD ["run", "--config", "/etc/mde-forwarder/config.toml"]
