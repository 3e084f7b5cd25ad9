#!/usr/bin/env bash
# Runs Docker Compose on the repository's docker-compose.yml with what the stack needs set
# up first; `make up/down/ps/logs/stats/publish` and the deployment test all come through
# here, so they see the same stack:
#   - the compose program: `docker-compose` (1.29) if installed, else `docker compose` (v2);
#   - the server images: POSTGRES_IMAGE / RABBITMQ_IMAGE / PROMETHEUS_IMAGE from the
#     environment or .env, else the offline stand-ins from `make images` when they exist,
#     else the official images (the compose file's defaults);
#   - the secrets: deploy/secrets.sh fills SECRETS_DIR (default deploy/secrets) once.
#
# Usage: deploy/compose.sh COMPOSE-ARGS...   e.g. deploy/compose.sh ps
# The project name is COMPOSE_PROJECT_NAME (default: vote-aggregator).
set -euo pipefail
cd "$(dirname "$0")/.."

# NAME's value in .env, if it sets one (compose reads .env itself; we only need to know).
in_env_file() { [ -f .env ] && sed -n "s/^$1=//p" .env | tail -n 1 | grep . ; }

# NAME OFFLINE: export NAME=OFFLINE when neither the environment nor .env sets NAME and
# the offline image exists; otherwise leave it to the compose file's official default.
prefer_offline() {
    if [ -z "${!1:-}" ] && ! in_env_file "$1" >/dev/null && docker image inspect "$2" >/dev/null 2>&1; then
        export "$1=$2"
    fi
}
prefer_offline POSTGRES_IMAGE vote-aggregator/postgres:17-offline
prefer_offline RABBITMQ_IMAGE vote-aggregator/rabbitmq:4.0-offline
prefer_offline PROMETHEUS_IMAGE vote-aggregator/prometheus:2.53-offline

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-vote-aggregator}
export SECRETS_DIR=${SECRETS_DIR:-$(in_env_file SECRETS_DIR || echo "$PWD/deploy/secrets")}
deploy/secrets.sh "$SECRETS_DIR" >&2

if docker-compose version >/dev/null 2>&1; then
    exec docker-compose "$@"
elif docker compose version >/dev/null 2>&1; then
    exec docker compose "$@"
else
    echo "error: neither docker-compose nor the docker compose plugin is installed: install one of them (https://docs.docker.com/compose/install/)" >&2
    exit 1
fi
