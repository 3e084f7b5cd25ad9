#!/usr/bin/env bash
# Runs Docker Compose on the repository's docker-compose.yml with what the stack needs set
# up first; `make up/down/ps/logs/stats` and the deployment test all come through here, so
# they see the same stack:
#   - the settings: deploy/env.sh (environment, then .env or ENV_FILE, then defaults);
#   - the secrets: deploy/secrets.sh fills SECRETS_DIR (default deploy/secrets) once;
#   - the compose program: `docker-compose` (1.29) if installed, else `docker compose` (v2).
#
# Usage: deploy/compose.sh COMPOSE-ARGS...   e.g. deploy/compose.sh ps
# The project name is COMPOSE_PROJECT_NAME (default: vote-aggregator).
set -euo pipefail
# shellcheck source=deploy/env.sh
. "$(dirname "$0")/env.sh"
deploy/secrets.sh "$SECRETS_DIR" >&2

# Compose reads .env by itself; point it at ENV_FILE when that is another file.
env_file=()
if [ "$ENV_FILE" != .env ]; then env_file=(--env-file "$ENV_FILE"); fi

if docker-compose version >/dev/null 2>&1; then
    exec docker-compose "${env_file[@]}" "$@"
elif docker compose version >/dev/null 2>&1; then
    exec docker compose "${env_file[@]}" "$@"
else
    echo "error: neither docker-compose nor the docker compose plugin is installed: install one of them (https://docs.docker.com/compose/install/)" >&2
    exit 1
fi
