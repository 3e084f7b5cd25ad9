#!/usr/bin/env bash
# Writes the compose stack's secrets into a folder (default deploy/secrets, or $1) unless
# they already exist: a random password each for PostgreSQL and RabbitMQ, and the files
# the services read them from:
#
#   postgres_password           PostgreSQL superuser password (POSTGRES_PASSWORD_FILE)
#   database_url                the aggregator's DATABASE_URL_FILE
#   rabbitmq_credentials.conf   RabbitMQ default_user / default_pass (conf.d snippet)
#   amqp_url                    the aggregator's AMQP_URL_FILE
#
# A folder this script creates is private (0700); the files are 0644 so that the non-root
# users inside the containers (postgres 999, rabbitmq 999, vote 10001) can read their
# bind-mounted copy. Anyone who can read the folder can read them: keep it private, and
# do not copy the files elsewhere without their folder's protection.
# Existing files are never overwritten: the databases keep the password they were
# created with. In production, put your own secrets here (or use your secret manager).
set -euo pipefail

dir=${1:-${SECRETS_DIR:-deploy/secrets}}
# The same defaults as docker-compose.yml and deploy/env.sh.
postgres_user=${POSTGRES_USER:-votes}
postgres_db=${POSTGRES_DB:-votes}
rabbitmq_user=${RABBITMQ_USER:-votes}

# 32 characters of [A-Za-z0-9]: safe in a URL's userinfo and in rabbitmq.conf unquoted.
# (512 random bytes hold ~120 of them; no pipe is cut short, so pipefail stays quiet.)
random_password() {
    local chars
    chars=$(head -c 512 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9')
    printf '%s' "${chars:0:32}"
}

if [ ! -d "$dir" ]; then
    mkdir -p "$dir"
    chmod 0700 "$dir"
fi
umask 022
if [ ! -s "$dir/postgres_password" ]; then
    random_password >"$dir/postgres_password"
    rm -f "$dir/database_url"
    echo "wrote $dir/postgres_password"
fi
if [ ! -s "$dir/database_url" ]; then
    printf 'postgres://%s:%s@postgres:5432/%s\n' \
        "$postgres_user" "$(cat "$dir/postgres_password")" "$postgres_db" >"$dir/database_url"
    echo "wrote $dir/database_url"
fi
if [ ! -s "$dir/rabbitmq_password" ]; then
    random_password >"$dir/rabbitmq_password"
    rm -f "$dir/rabbitmq_credentials.conf" "$dir/amqp_url"
    echo "wrote $dir/rabbitmq_password"
fi
if [ ! -s "$dir/rabbitmq_credentials.conf" ]; then
    printf 'default_user = %s\ndefault_pass = %s\n' \
        "$rabbitmq_user" "$(cat "$dir/rabbitmq_password")" >"$dir/rabbitmq_credentials.conf"
    echo "wrote $dir/rabbitmq_credentials.conf"
fi
if [ ! -s "$dir/amqp_url" ]; then
    printf 'amqp://%s:%s@rabbitmq:5672/%%2f\n' \
        "$rabbitmq_user" "$(cat "$dir/rabbitmq_password")" >"$dir/amqp_url"
    echo "wrote $dir/amqp_url"
fi
chmod 0644 "$dir"/*
