# shellcheck shell=bash
# Sourced by the deploy scripts (compose.sh, publish.sh) and `make up`: the compose
# stack's settings, decided in one place, exported so that Compose, deploy/secrets.sh and
# the tools all see the same values.
#
#  1. The environment wins. Then ENV_FILE (default: .env at the top of the repository):
#     `NAME=value` lines, optionally `export NAME=value`, values optionally in one pair of
#     quotes; comments, blank lines and CRLF endings are fine.
#  2. Server images not set that way: the offline stand-ins from `make images` when they
#     exist, else the compose file's official defaults.
#  3. Defaults for what the scripts themselves need (project name, secrets folder, ports).
#
# After sourcing, the working directory is the repository's top.

cd "$(dirname "${BASH_SOURCE[0]}")/.." || return 1

ENV_FILE=${ENV_FILE:-.env}
if [ -f "$ENV_FILE" ]; then
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line%$'\r'}
        line=${line#export }
        case "$line" in '' | '#'*) continue ;; esac
        name=${line%%=*}
        value=${line#*=}
        [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
        if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then
            value=${BASH_REMATCH[1]}
        fi
        [ -n "${!name+set}" ] || export "$name=$value"
    done <"$ENV_FILE"
fi

# NAME OFFLINE: NAME=OFFLINE when NAME is unset and the offline image exists.
prefer_offline() {
    if [ -z "${!1:-}" ] && docker image inspect "$2" >/dev/null 2>&1; then
        export "$1=$2"
    fi
}
prefer_offline POSTGRES_IMAGE vote-aggregator/postgres:17-offline
prefer_offline RABBITMQ_IMAGE vote-aggregator/rabbitmq:4.0-offline
prefer_offline PROMETHEUS_IMAGE vote-aggregator/prometheus:2.53-offline

export COMPOSE_PROJECT_NAME=${COMPOSE_PROJECT_NAME:-vote-aggregator}
export SECRETS_DIR=${SECRETS_DIR:-$PWD/deploy/secrets}
export POSTGRES_USER=${POSTGRES_USER:-votes}
export POSTGRES_DB=${POSTGRES_DB:-votes}
export RABBITMQ_USER=${RABBITMQ_USER:-votes}
export PUBLISH_ADDRESS=${PUBLISH_ADDRESS:-127.0.0.1}
export RABBITMQ_PORT=${RABBITMQ_PORT:-5672}
export RABBITMQ_UI_PORT=${RABBITMQ_UI_PORT:-15672}
export PROMETHEUS_PORT=${PROMETHEUS_PORT:-9090}
