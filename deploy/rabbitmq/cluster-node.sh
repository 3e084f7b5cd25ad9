#!/bin/sh
# Entrypoint of the `cluster` profile's extra RabbitMQ nodes: every node of a cluster
# needs the same Erlang cookie, so this copies the first node's (its data volume is
# mounted read-only at /var/lib/rabbitmq-first) before the image's own entrypoint runs.
set -eu
cookie=/var/lib/rabbitmq/.erlang.cookie
if [ ! -s /var/lib/rabbitmq-first/.erlang.cookie ]; then
    echo "error: the first node's Erlang cookie is missing: start the rabbitmq service first" >&2
    exit 1
fi
mkdir -p /var/lib/rabbitmq
cp /var/lib/rabbitmq-first/.erlang.cookie "$cookie"
chown rabbitmq:rabbitmq /var/lib/rabbitmq "$cookie"
chmod 0400 "$cookie"
exec /usr/local/bin/docker-entrypoint.sh rabbitmq-server
