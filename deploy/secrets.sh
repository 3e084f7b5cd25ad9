#!/usr/bin/env bash
# Writes the compose stack's secrets into a folder (default deploy/secrets, or $1) unless
# they already exist: a random password for each account, and the files the services read
# them from. Least privilege: the replicas log in to PostgreSQL and RabbitMQ with users
# that may do only what counting needs; the owner/admin accounts are used by the one-shot
# jobs and by operators only.
#
#   postgres_password           PostgreSQL superuser (POSTGRES_USER): the server's
#                               POSTGRES_PASSWORD_FILE; the `roles` job logs in with it
#   database_url                the owner/migrator's URL (POSTGRES_USER, who owns the
#                               schema): the `migrate` job, `make stats`, the checks
#   aggregator_db_password      the replicas' PostgreSQL runtime user (POSTGRES_RUNTIME_USER),
#                               made by the `roles` job with scripts/roles.sql
#   aggregator_database_url     the replicas' DATABASE_URL_FILE (runtime user)
#   rabbitmq_password           RabbitMQ administrator (RABBITMQ_USER): management UI
#   amqp_url                    the administrator's URL (inspection, dead letters)
#   aggregator_amqp_password    RabbitMQ user of the replicas (RABBITMQ_AGGREGATOR_USER)
#   aggregator_amqp_url         the replicas' AMQP_URL_FILE (every node's URL when
#                               COMPOSE_PROFILES names `cluster`; delete it to re-render)
#   publisher_amqp_password     RabbitMQ user of publishers (RABBITMQ_PUBLISHER_USER)
#   publisher_amqp_url          the publishers' URL (`make publish`, the deployment test)
#   rabbitmq_definitions.json   the broker's users and their permissions, imported at every
#                               broker start (rewritten on every run from the passwords
#                               and QUEUE_NAME; see "RabbitMQ permissions" in the README)
#
# A folder this script creates is private (0700); the files are 0644 so that the non-root
# users inside the containers (postgres 999, rabbitmq 999, vote 10001) can read their
# bind-mounted copy. Anyone who can read the folder can read them: keep it private, and
# do not copy the files elsewhere without their folder's protection.
# Existing password and URL files are never overwritten: the servers keep the passwords
# they were created with. In production, put your own secrets here (or use your secret
# manager).
set -euo pipefail

dir=${1:-${SECRETS_DIR:-deploy/secrets}}
# The same defaults as docker-compose.yml and deploy/env.sh.
postgres_user=${POSTGRES_USER:-votes}
postgres_db=${POSTGRES_DB:-votes}
runtime_user=${POSTGRES_RUNTIME_USER:-vote_aggregator}
rabbitmq_user=${RABBITMQ_USER:-votes}
aggregator_user=${RABBITMQ_AGGREGATOR_USER:-vote-aggregator}
publisher_user=${RABBITMQ_PUBLISHER_USER:-vote-publisher}
queue=${QUEUE_NAME:-votes.aggregation}

# 32 characters of [A-Za-z0-9]: safe in a URL's userinfo, JSON and psql unquoted.
# (512 random bytes hold ~120 of them; no pipe is cut short, so pipefail stays quiet.)
random_password() {
    local chars
    chars=$(head -c 512 /dev/urandom | LC_ALL=C tr -dc 'A-Za-z0-9')
    printf '%s' "${chars:0:32}"
}

# password FILE: writes a random password into FILE unless it has one; then removes the
# URL files named after it, so they are written again with it.
password() {
    local file=$1
    shift
    if [ ! -s "$dir/$file" ]; then
        random_password >"$dir/$file"
        rm -f "${@/#/$dir/}"
        echo "wrote $dir/$file"
    fi
}

# url FILE FORMAT ARGS...: writes FILE from printf FORMAT ARGS unless it exists.
url() {
    local file=$1
    shift
    if [ ! -s "$dir/$file" ]; then
        # shellcheck disable=SC2059 # the format is the caller's
        printf "$@" >"$dir/$file"
        echo "wrote $dir/$file"
    fi
}

# The folder is what keeps the (0644, for the containers' users) files private: 0700
# every time, also for a folder made by hand.
mkdir -p "$dir"
chmod 0700 "$dir"
umask 022
password postgres_password database_url
password aggregator_db_password aggregator_database_url
password rabbitmq_password amqp_url
password aggregator_amqp_password aggregator_amqp_url
password publisher_amqp_password publisher_amqp_url
url database_url 'postgres://%s:%s@postgres:5432/%s\n' \
    "$postgres_user" "$(cat "$dir/postgres_password")" "$postgres_db"
url aggregator_database_url 'postgres://%s:%s@postgres:5432/%s\n' \
    "$runtime_user" "$(cat "$dir/aggregator_db_password")" "$postgres_db"
url amqp_url 'amqp://%s:%s@rabbitmq:5672/%%2f\n' \
    "$rabbitmq_user" "$(cat "$dir/rabbitmq_password")"
# With COMPOSE_PROFILES naming `cluster`, the replicas get every node's URL (AMQP_URL
# lists them, comma-separated): each replica connects to one and moves on when it dies.
aggregator_hosts=rabbitmq
case ",${COMPOSE_PROFILES:-}," in
*,cluster,*) aggregator_hosts="rabbitmq rabbitmq-2 rabbitmq-3" ;;
esac
aggregator_urls=
for host in $aggregator_hosts; do
    aggregator_urls="${aggregator_urls:+$aggregator_urls,}amqp://%s:%s@$host:5672/%%2f"
done
aggregator_args=()
for host in $aggregator_hosts; do
    aggregator_args+=("$aggregator_user" "$(cat "$dir/aggregator_amqp_password")")
done
url aggregator_amqp_url "$aggregator_urls\n" "${aggregator_args[@]}"
url publisher_amqp_url 'amqp://%s:%s@rabbitmq:5672/%%2f\n' \
    "$publisher_user" "$(cat "$dir/publisher_amqp_password")"

# The permission patterns of vote_aggregator::amqp_permissions (the README's table), for
# QUEUE_NAME: regex metacharacters escaped, then backslashes doubled for JSON.
json_regex() {
    printf '%s' "$1" | sed -e 's/[][\\.*^$+?(){}|]/\\&/g' -e 's/\\/\\\\/g' -e 's/"/\\"/g'
}
q=$(json_regex "$queue")
dlx=$(json_regex votes.dlx)
results=$(json_regex votes.results)
cat >"$dir/rabbitmq_definitions.json" <<JSON
{
  "vhosts": [{"name": "/"}],
  "users": [
    {"name": "$rabbitmq_user", "password": "$(cat "$dir/rabbitmq_password")", "tags": ["administrator"]},
    {"name": "$aggregator_user", "password": "$(cat "$dir/aggregator_amqp_password")", "tags": []},
    {"name": "$publisher_user", "password": "$(cat "$dir/publisher_amqp_password")", "tags": []}
  ],
  "permissions": [
    {"user": "$rabbitmq_user", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
    {"user": "$aggregator_user", "vhost": "/",
     "configure": "^($dlx|$q|$q\\\\.dlq|$q\\\\.dlq\\\\.unexplained|$results)\$",
     "write": "^($dlx|$q\\\\.dlq|$q\\\\.dlq\\\\.unexplained|$results)\$",
     "read": "^($dlx|$q)\$"},
    {"user": "$publisher_user", "vhost": "/", "configure": "^\$", "write": "^amq\\\\.default\$", "read": "^\$"}
  ]
}
JSON
chmod 0644 "$dir"/*
