#!/usr/bin/env bash
# Publishes test votes to the compose stack's RabbitMQ from this host, with confirms:
#   deploy/publish.sh VOTE-TOOLS [PUBLISH-ARGS...]   e.g. deploy/publish.sh target/debug/vote-tools -n 10
# The URL is the stack's publisher user's (SECRETS_DIR/publisher_amqp_url: it may only
# publish) with the host port instead of the service name; it goes to vote-tools in the
# environment, never on a command line.
set -euo pipefail
tools=$(realpath "$1")
shift
# shellcheck source=deploy/env.sh
. "$(dirname "$0")/env.sh"
url_file="$SECRETS_DIR/publisher_amqp_url"
if [ ! -s "$url_file" ]; then
    echo "error: $url_file does not exist: start the stack first (make up)" >&2
    exit 1
fi
host=$PUBLISH_ADDRESS
if [ "$host" = 0.0.0.0 ]; then host=127.0.0.1; fi
AMQP_URL=$(sed "s#@rabbitmq:5672/#@$host:$RABBITMQ_PORT/#" "$url_file")
export AMQP_URL
exec "$tools" publish "$@"
