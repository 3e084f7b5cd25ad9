# The vote-aggregator service image: the release binary on a small Debian trixie runtime,
# run as a fixed non-root user. Built by `make image`, which first builds the binary
# (`cargo build --release -p vote-aggregator`) and picks the base:
#   - with a registry: the official debian:trixie-slim (the default below);
#   - without one: vote-aggregator/debian:trixie-offline from `make images`.
# The binary is the ordinary release build: it contains no fault-injection hook.
ARG BASE_IMAGE=debian:trixie-slim
FROM ${BASE_IMAGE}

ARG VERSION=unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="vote-aggregator" \
      org.opencontainers.image.description="Counts votes from RabbitMQ into PostgreSQL exactly once" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed uid/gid, so file permissions (mounted secrets) can be granted ahead of time.
RUN groupadd --system --gid 10001 vote \
 && useradd --system --uid 10001 --gid vote --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin vote

COPY target/release/vote-aggregator /usr/local/bin/vote-aggregator

USER 10001:10001
EXPOSE 8001
STOPSIGNAL SIGTERM
# No shell tools needed: the binary asks its own /healthz (at METRICS_ADDR).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["vote-aggregator", "healthcheck", "--timeout-seconds", "4"]
ENTRYPOINT ["vote-aggregator"]
CMD ["run"]
