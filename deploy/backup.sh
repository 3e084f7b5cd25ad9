#!/usr/bin/env bash
# `make backup`: a pg_dump of the compose stack's database, in the custom format, to a
# timestamped file only its owner may read (a backup holds every vote):
#   BACKUP_DIR/<project>-<database>-<UTC time>.dump      (BACKUP_DIR default: backups/)
# pg_dump runs inside the stack's postgres container as the superuser, so it reads every
# table, its grants included. The file is checked with `pg_restore --list` (it must list
# the votes table's data) before it gets its final name, then only the BACKUP_KEEP newest
# of the stack's backups are kept (default 14). Settings as deploy/compose.sh reads them.
# Roles (vote_aggregator_runtime, the login users) are cluster-wide and not in the dump:
# deploy/restore.sh re-creates them with the `roles` job.
#
# Every failure is one line on stderr and exit 1; a failed dump leaves no .dump file.
set -euo pipefail
# shellcheck source=deploy/env.sh
. "$(dirname "$0")/env.sh"

fail() {
    echo "error: backup of PostgreSQL database $POSTGRES_DB (compose project $COMPOSE_PROJECT_NAME): $*" >&2
    exit 1
}

dir=${BACKUP_DIR:-backups}
keep=${BACKUP_KEEP:-14}
[[ $keep =~ ^[1-9][0-9]{0,3}$ ]] || fail "BACKUP_KEEP=$keep is not a number of backups to keep (1-9999): set BACKUP_KEEP=N"

deploy/compose.sh exec -T postgres pg_isready -q >/dev/null 2>&1 ||
    fail "its postgres container is not running or not ready: start the stack (make up) and see make ps"

umask 077
mkdir -p "$dir" || fail "cannot create BACKUP_DIR $dir: set BACKUP_DIR to a writable folder"
prefix="$COMPOSE_PROJECT_NAME-$POSTGRES_DB-"
file="$dir/$prefix$(date -u +%Y%m%dT%H%M%SZ).dump"
[ ! -e "$file" ] || fail "$file exists already: wait a second and run it again"
partial="$file.partial"
errors=$(mktemp)
trap 'rm -f "$partial" "$errors"' EXIT

# shellcheck disable=SC2016 # expanded in the container, where the variables are set
deploy/compose.sh exec -T postgres sh -c 'pg_dump -U "$POSTGRES_USER" -d "$POSTGRES_DB" --format=custom' \
    >"$partial" 2>"$errors" ||
    fail "pg_dump failed ($(tail -n 1 "$errors")): is the stack up (make ps)?"
chmod 0600 "$partial"

listed=$(deploy/compose.sh exec -T postgres pg_restore --list <"$partial" 2>/dev/null) ||
    fail "pg_restore --list cannot read the dump: check the disk under $dir and run it again"
grep -q 'TABLE DATA public votes ' <<<"$listed" ||
    fail "the dump holds no data of table votes: is $POSTGRES_DB the service's database (POSTGRES_DB)?"
mv "$partial" "$file"

# Retention: the names sort by time; remove all but the newest BACKUP_KEEP.
mapfile -t old < <(find "$dir" -maxdepth 1 -type f -name "$prefix*.dump" | sort | head -n "-$keep")
if [ "${#old[@]}" -gt 0 ]; then rm -f -- "${old[@]}"; fi

echo "backup: $file ($(stat -c %s "$file") bytes, mode 0600, $(grep -c '^[0-9]' <<<"$listed") entries; kept the $keep newest, removed ${#old[@]})"
