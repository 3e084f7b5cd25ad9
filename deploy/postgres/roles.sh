#!/bin/sh
# The compose stack's `roles` job (and `make roles`): runs scripts/roles.sql as the
# PostgreSQL superuser, in a container of the PostgreSQL image (psql is there, not in the
# service image), with the runtime user's name and the password from its secret file.
# Idempotent: it runs before every `migrate`, so a stack created by an older release gets
# its runtime user on its first `up` with this one.
#
# The password reaches psql on stdin (a \set line before the script), never on a command
# line; psql's single-quoted meta-command arguments take '' for a quote and \\ for a
# backslash.
set -eu
PGPASSWORD=$(cat /run/secrets/postgres_password)
export PGPASSWORD
password=$(sed -e 's/\\/\\\\/g' -e "s/'/''/g" /run/secrets/aggregator_db_password)
{
    printf "\\\\set runtime_password '%s'\n" "$password"
    cat /etc/vote-aggregator/roles.sql
} | psql -X -q -h "${POSTGRES_HOST:-postgres}" -U "$POSTGRES_USER" -d "$POSTGRES_DB" \
    -v ON_ERROR_STOP=1 -v runtime_user="$POSTGRES_RUNTIME_USER" -f -
echo "roles: $POSTGRES_RUNTIME_USER is a member of vote_aggregator_runtime in $POSTGRES_DB"
