#!/usr/bin/env bash
# Applies the dead-letter retention operator policy of 30-dead-letter-retention.conf to a
# broker that already exists (RabbitMQ creates it from that file only for NEW virtual
# hosts). The values are read from that file, so the two never disagree.
#
#   deploy/rabbitmq/apply-retention.sh            # the compose stack's broker, vhost /
#   RABBITMQCTL="rabbitmqctl -n rabbit@node1" VHOST=votes deploy/rabbitmq/apply-retention.sh
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
conf="$here/30-dead-letter-retention.conf"

value() { sed -n "s/^default_policies\.operator\.dead-letter-retention\.$1 = //p" "$conf"; }

# cuttlefish duration (e.g. 30d, 12h, 90m, 45s) -> milliseconds
to_ms() {
    local n=${1%%[a-z]*} unit=${1##*[0-9]}
    case "$unit" in
        d) echo $((n * 86400000)) ;; h) echo $((n * 3600000)) ;;
        m) echo $((n * 60000)) ;; s) echo $((n * 1000)) ;; ms | "") echo "$n" ;;
        *) echo "unsupported duration unit in $conf: $1" >&2; exit 1 ;;
    esac
}

pattern=$(value queue_pattern)
ttl_ms=$(to_ms "$(value message_ttl)")
max_length=$(value max_length)
[ -n "$pattern" ] && [ -n "$max_length" ] || { echo "cannot read the policy from $conf" >&2; exit 1; }
definition="{\"message-ttl\":$ttl_ms,\"max-length\":$max_length}"

read -r -a ctl <<<"${RABBITMQCTL:-$here/../compose.sh exec -T rabbitmq rabbitmqctl}"
"${ctl[@]}" set_operator_policy -p "${VHOST:-/}" --apply-to queues \
    dead-letter-retention "$pattern" "$definition"
echo "dead-letter-retention on vhost ${VHOST:-/}: $pattern $definition"
