#!/usr/bin/env bash
# `make restore FILE=...`: replaces the compose stack's database by a backup of
# deploy/backup.sh, with no replica writing meanwhile:
#  1. `pg_restore --list` must read FILE (nothing is touched otherwise);
#  2. the replicas are stopped gracefully (each commits and acks its batch in hand);
#  3. a new database <db>_restoring is created, the `roles` job makes sure the
#     cluster-wide roles exist there (vote_aggregator_runtime and the runtime user are
#     not in a dump; the dump's grants name them), and FILE is restored into it in ONE
#     transaction as the superuser (objects keep their owner);
#  4. only then the old database is dropped and the new one renamed to it, so a failed
#     restore leaves the old database as it was;
#  5. `migrate` (a backup of an older release gets the newer schema and grants) and
#     `vote-aggregator verify` must succeed; then the replicas are started again.
# Votes published after the backup and already acked are NOT in the restored database:
# see the README ("Backup and restore").
#
# Every failure is one line on stderr and exit 1; the replicas stay stopped after a
# failure from step 2 on (start them with `deploy/compose.sh start aggregator`).
set -euo pipefail
file=${1:-}
if [ -z "$file" ]; then
    echo "error: restore: no backup named: make restore FILE=backups/<name>.dump" >&2
    exit 1
fi
file=$(realpath -m -- "$file")
# shellcheck source=deploy/env.sh
. "$(dirname "$0")/env.sh"

db=$POSTGRES_DB
new="${db}_restoring"
# What a failure leaves behind, said with it.
state="the database is unchanged"
fail() {
    echo "error: restore of $file into PostgreSQL database $db (compose project $COMPOSE_PROJECT_NAME): $1; $state" >&2
    exit 1
}
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
# The line that says why: the last one naming an error, else the last one.
last_error() {
    local line
    line=$(grep -i 'error' "$errors" | tail -n 1)
    [ -n "$line" ] || line=$(grep -v '^[[:space:]]*$' "$errors" | tail -n 1)
    printf '%s' "$line"
}
# psql as the superuser in the postgres container, on the maintenance database.
admin() {
    deploy/compose.sh exec -T postgres psql -X -q -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d postgres "$@"
}

[ -r "$file" ] || fail "cannot read the file: name a backup written by make backup"
deploy/compose.sh exec -T postgres pg_isready -q >/dev/null 2>&1 ||
    fail "its postgres container is not running or not ready: start the stack (make up) and see make ps"
deploy/compose.sh exec -T postgres pg_restore --list <"$file" >/dev/null 2>"$errors" ||
    fail "pg_restore --list cannot read it ($(last_error)): is it a make backup file, and is the stack up (make ps)?"

deploy/compose.sh stop aggregator >/dev/null 2>"$errors" ||
    fail "cannot stop the replicas ($(last_error))"
state="the database is unchanged; the replicas are stopped: start them with deploy/compose.sh start aggregator"

admin -c "DROP DATABASE IF EXISTS \"$new\" WITH (FORCE)" -c "CREATE DATABASE \"$new\" OWNER \"$POSTGRES_USER\"" \
    2>"$errors" >/dev/null || fail "cannot create database $new ($(last_error))"
deploy/compose.sh run --rm --no-deps -T -e POSTGRES_DB="$new" roles >/dev/null 2>"$errors" ||
    fail "the roles job failed on $new ($(last_error))"
# shellcheck disable=SC2016 # expanded in the container
deploy/compose.sh exec -T -e NEW_DB="$new" postgres sh -c \
    'pg_restore -U "$POSTGRES_USER" -d "$NEW_DB" --single-transaction --exit-on-error' \
    <"$file" >/dev/null 2>"$errors" || fail "pg_restore failed ($(last_error)), so $new holds nothing"

admin -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" -c "ALTER DATABASE \"$new\" RENAME TO \"$db\"" \
    >/dev/null 2>"$errors" || fail "cannot replace database $db by $new ($(last_error))"
state="the database IS restored; the replicas are stopped: start them with deploy/compose.sh start aggregator once it is fixed"

deploy/compose.sh run --rm --no-deps -T migrate >/dev/null 2>"$errors" ||
    fail "migrate failed on the restored database ($(last_error))"
deploy/compose.sh run --rm --no-deps -T aggregator verify >"$errors" 2>&1 ||
    fail "vote-aggregator verify failed on the restored database ($(last_error)): see deploy/compose.sh run --rm aggregator verify"
verified=$(last_error)
deploy/compose.sh start aggregator >/dev/null 2>"$errors" ||
    fail "the replicas did not start again ($(last_error))"
echo "restore: done: verify: $verified; replicas started again"
