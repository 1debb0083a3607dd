# Session Authority container image: a release build in a Rust stage, then a small Debian
# runtime that runs as a non-root user, keeps the embedded store on a volume, and reports
# health through gRPC (the binary's own `health` subcommand, so no extra probe is needed).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
# Without the default bench-seed feature: no benchmark seeding commands in the image.
RUN cargo build --release --locked --no-default-features --bin session-authority

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 authority \
 && useradd --system --uid 10001 --gid authority --home-dir /var/lib/session-authority --shell /usr/sbin/nologin authority \
 && mkdir -p /var/lib/session-authority/data \
 && chown -R authority:authority /var/lib/session-authority
COPY --from=build /src/target/release/session-authority /usr/local/bin/session-authority
USER 10001:10001
WORKDIR /var/lib/session-authority
ENV SESSION_AUTHORITY_LISTEN=0.0.0.0:50051 \
    SESSION_AUTHORITY_DATA_DIR=/var/lib/session-authority/data \
    SESSION_AUTHORITY_LOG_FORMAT=json
VOLUME ["/var/lib/session-authority/data"]
EXPOSE 50051 9090
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/session-authority", "health", "--target", "http://127.0.0.1:50051"]
ENTRYPOINT ["/usr/local/bin/session-authority"]
CMD ["serve"]
