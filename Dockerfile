# unpart as a small non-root image: build with the project's release profile, run on
# debian-slim (glibc, no shell tools needed at runtime).
#
#   docker build -t unpart .
#   docker run --rm -p 8080:8080 -v $PWD/conf/unpart.yaml:/etc/unpart/unpart.yaml:ro unpart
#
# The image's default config is conf/unpart.yaml with `listen: 0.0.0.0:8080`, the backend on
# 127.0.0.1:8081 (the pod's other container) and pingora's files under /tmp.
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY conf ./conf
RUN cargo build --release --locked --bin unpart

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin unpart \
    && mkdir -p /etc/unpart /var/tmp/unpart && chown unpart:unpart /var/tmp/unpart
COPY --from=build /src/target/release/unpart /usr/local/bin/unpart
COPY conf/unpart.yaml /etc/unpart/unpart.yaml
USER 10001
EXPOSE 8080 6060
# SIGTERM drains in-flight uploads (up to grace_period_seconds), then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/unpart"]
CMD ["-c", "/etc/unpart/unpart.yaml"]
