#!/usr/bin/env bash
# Build the offline Docker images that stand in for official images on
# machines that reach no container registry but do reach Debian's package
# archive:
#
#   vote-aggregator/postgres:17-offline      (override: OFFLINE_POSTGRES_IMAGE)
#   vote-aggregator/rabbitmq:4.0-offline     (override: OFFLINE_RABBITMQ_IMAGE)
#   vote-aggregator/prometheus:2.53-offline  (override: OFFLINE_PROMETHEUS_IMAGE):
#                                            for prom/prometheus:v2.53.3
#   vote-aggregator/debian:trixie-offline    (override: OFFLINE_BASE_IMAGE): the runtime
#                                            base of the service's own image
#
# They always carry their own names, never the official ones: the tests pick
# the image through VOTES_POSTGRES_IMAGE / VOTES_RABBITMQ_IMAGE, which this
# script deliberately ignores.
#
# All are Debian trixie `minbase` root filesystems made with debootstrap (run
# once, then copied), with the server installed from Debian's packages in a
# chroot, an entrypoint or image config that mimics the official image's, and
# `docker import`.
#
# Environment:
#   FORCE=1          rebuild even when an image is current
#   DEBIAN_MIRROR    Debian archive URI (default: the first plain `.../debian`
#                    URI in this machine's apt sources)
#   OFFLINE_POSTGRES_IMAGE, OFFLINE_RABBITMQ_IMAGE, OFFLINE_PROMETHEUS_IMAGE,
#   OFFLINE_BASE_IMAGE   image names (must not be an official image's name;
#                    the script refuses those)
#
# Every image carries the label vote-aggregator.recipe=<sha256 of this file>.
# An image whose label differs from this file's hash (or that has none) was
# built by another version of this script and is rebuilt; an image with the
# same hash is current and skipped.
#
# Needs root, docker, and network access to the Debian archive. See README.md.
set -euo pipefail

PG_IMAGE="${OFFLINE_POSTGRES_IMAGE:-vote-aggregator/postgres:17-offline}"
RMQ_IMAGE="${OFFLINE_RABBITMQ_IMAGE:-vote-aggregator/rabbitmq:4.0-offline}"
PROM_IMAGE="${OFFLINE_PROMETHEUS_IMAGE:-vote-aggregator/prometheus:2.53-offline}"
BASE_IMAGE="${OFFLINE_BASE_IMAGE:-vote-aggregator/debian:trixie-offline}"
SUITE=trixie
PG_MAJOR=17
RMQ_SERIES=4.0
PROM_SERIES=2.53
PROM_OFFICIAL=prom/prometheus:v2.53.3
FORCE="${FORCE:-0}"

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C
START_TS=$(date +%s)

log() { printf '==> [build.sh +%3ss] %s\n' "$(($(date +%s) - START_TS))" "$*"; }
warn() { printf '==> [build.sh] WARNING: %s\n' "$*" >&2; }
die() {
    printf '==> [build.sh] ERROR: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------
# Preconditions and what to build
# ---------------------------------------------------------------------------
command -v docker >/dev/null 2>&1 || die "docker CLI not found"
docker info >/dev/null 2>&1 || die "the Docker daemon is not reachable (is it running?)"

# An official image's name is postgres, rabbitmq or debian, optionally behind
# docker.io/ and library/, or prom/prometheus, optionally behind docker.io/;
# with any tag or digest.
for name in "$PG_IMAGE" "$RMQ_IMAGE" "$PROM_IMAGE" "$BASE_IMAGE"; do
    if printf '%s\n' "$name" | grep -Eq '^((docker\.io/)?(library/)?(postgres|rabbitmq|debian)|(docker\.io/)?prom/prometheus)(:|@|$)'; then
        die "refusing to build under '$name': an offline build must never carry an official image's name (use a vote-aggregator/NAME:TAG-offline name like the defaults)"
    fi
done

# The recipe: one hash of this whole script, stored as a label on every
# image, so that a change to any image's recipe rebuilds the images made by
# the older script (a change to a comment too: simple beats clever here).
RECIPE_LABEL=vote-aggregator.recipe
SCRIPT_FILE=${BASH_SOURCE[0]}
[ -f "$SCRIPT_FILE" ] || die "cannot hash this script: '$SCRIPT_FILE' is not a file (run it as images/build.sh, not from stdin)"
RECIPE=$(sha256sum "$SCRIPT_FILE" | cut -d' ' -f1)

# image_recipe IMAGE: print IMAGE's recipe label (empty when it has none);
# fails when IMAGE does not exist.
image_recipe() {
    docker image inspect -f "{{ with .Config.Labels }}{{ index . \"$RECIPE_LABEL\" }}{{ end }}" "$1" 2>/dev/null
}

BUILD_PG=0
BUILD_RMQ=0
BUILD_PROM=0
BUILD_BASE=0
for pair in "PG:$PG_IMAGE" "RMQ:$RMQ_IMAGE" "PROM:$PROM_IMAGE" "BASE:$BASE_IMAGE"; do
    kind=${pair%%:*}
    name=${pair#*:}
    if ! have=$(image_recipe "$name"); then
        log "$name missing, will build it"
    elif [ "$FORCE" = 1 ]; then
        log "$name exists, rebuilding because FORCE=1"
    elif [ -z "$have" ]; then
        log "$name is stale: rebuild (it has no $RECIPE_LABEL label, so an older build.sh made it)"
    elif [ "$have" != "$RECIPE" ]; then
        log "$name is stale: rebuild (its $RECIPE_LABEL is ${have:0:12}..., made by another build.sh; this one is ${RECIPE:0:12}...)"
    else
        log "$name is current (recipe ${RECIPE:0:12}...), skipping (FORCE=1 rebuilds)"
        continue
    fi
    case "$kind" in
    PG) BUILD_PG=1 ;;
    RMQ) BUILD_RMQ=1 ;;
    PROM) BUILD_PROM=1 ;;
    BASE) BUILD_BASE=1 ;;
    esac
done
if [ "$BUILD_PG$BUILD_RMQ$BUILD_PROM$BUILD_BASE" = 0000 ]; then
    log "nothing to do"
    exit 0
fi
# Only building needs root: checking that the images are current does not.
[ "$(id -u)" = 0 ] || die "must run as root to build (debootstrap, chroot and mount need it): run 'sudo make images' once, or point POSTGRES_IMAGE / RABBITMQ_IMAGE / PROMETHEUS_IMAGE (compose) and VOTES_*_IMAGE (tests) at images you have"

# ---------------------------------------------------------------------------
# Debian mirror: DEBIAN_MIRROR, else the first plain .../debian URI that apt
# on this machine is configured with (deb822 .sources files and sources.list).
# ---------------------------------------------------------------------------
find_apt_mirror() {
    local files=() f
    for f in /etc/apt/sources.list.d/*.sources; do [ -f "$f" ] && files+=("$f"); done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do [ -f "$f" ] && files+=("$f"); done
    [ "${#files[@]}" -gt 0 ] || return 0
    awk '
        /^[[:space:]]*#/ { next }
        tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i; next }
        $1 == "deb" {
            # deb [ options ] uri suite components
            i = 2
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            if (i <= NF) print $i
        }
    ' "${files[@]}" |
        sed 's:/*$::' |
        grep -E '^https?://[^ ]+/debian$' |
        head -n 1 || true
}
MIRROR="${DEBIAN_MIRROR:-$(find_apt_mirror)}"
[ -n "$MIRROR" ] || die "could not find a Debian mirror in /etc/apt/sources*; set DEBIAN_MIRROR=http://HOST/debian"
log "Debian mirror: $MIRROR (suite $SUITE)"

# A proxy that host apt uses is not seen by apt inside the chroot: pass it on.
if [ -z "${http_proxy:-}" ] && command -v apt-config >/dev/null 2>&1; then
    APT_HTTP_PROXY=
    eval "$(apt-config shell APT_HTTP_PROXY Acquire::http::Proxy)"
    if [ -n "$APT_HTTP_PROXY" ] && [ "$APT_HTTP_PROXY" != DIRECT ]; then
        export http_proxy="$APT_HTTP_PROXY"
        log "using apt's HTTP proxy for debootstrap and the chroot"
    fi
fi

# ---------------------------------------------------------------------------
# debootstrap (installed from this machine's apt sources when missing)
# ---------------------------------------------------------------------------
if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap with apt-get"
    if ! apt-get install -y -q --no-install-recommends debootstrap >/dev/null 2>&1; then
        log "apt-get install failed; running apt-get update first"
        apt-get update -q >/dev/null || die "apt-get update failed"
        apt-get install -y -q --no-install-recommends debootstrap >/dev/null || die "could not install debootstrap"
    fi
fi
DEBOOTSTRAP_SCRIPT=()
if [ ! -e "/usr/share/debootstrap/scripts/$SUITE" ]; then
    # An older debootstrap that does not know the suite yet: sid's script fits.
    DEBOOTSTRAP_SCRIPT=(/usr/share/debootstrap/scripts/sid)
    warn "debootstrap has no script for $SUITE; using sid's"
fi

# ---------------------------------------------------------------------------
# Work dir (removed by the trap, after unmounting anything mounted under it)
# ---------------------------------------------------------------------------
WORK=$(mktemp -d /var/tmp/vote-aggregator-images.XXXXXX)

unmount_under() {
    local mnt
    # deepest first
    awk -v w="$1/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r |
        while read -r mnt; do umount "$mnt" 2>/dev/null || umount -l "$mnt" || true; done
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "${WORK:-}" ] && [ -d "$WORK" ]; then
        unmount_under "$WORK"
        if awk -v w="$WORK/" 'index($2, w) == 1 { f = 1 } END { exit !f }' /proc/self/mounts; then
            warn "something is still mounted under $WORK; leaving it in place"
        else
            rm -rf --one-file-system "$WORK"
        fi
    fi
    if [ "$rc" != 0 ]; then
        printf '==> [build.sh] failed or interrupted (exit %s); temporary files removed\n' "$rc" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# run_logged LOG CMD...: run quietly into LOG; on failure show its tail.
run_logged() {
    local logf=$1
    shift
    if ! "$@" >"$logf" 2>&1 </dev/null; then
        printf '==> [build.sh] command failed: %s\n--- last lines of %s ---\n' "$*" "$logf" >&2
        tail -n 60 "$logf" >&2 || true
        return 1
    fi
}

# in_chroot ROOT SCRIPT: run a shell script in the chroot, with a clean env.
in_chroot() {
    local root=$1 script=$2
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true \
        ${http_proxy:+http_proxy="$http_proxy"} \
        chroot "$root" /bin/sh -euxc "$script"
}

# ---------------------------------------------------------------------------
# 1. the shared minbase tree
# ---------------------------------------------------------------------------
BASE="$WORK/base"
log "debootstrap --variant=minbase $SUITE (log: $WORK/debootstrap.log)"
run_logged "$WORK/debootstrap.log" \
    debootstrap --variant=minbase --components=main --merged-usr \
    "$SUITE" "$BASE" "$MIRROR" "${DEBOOTSTRAP_SCRIPT[@]}" ||
    die "debootstrap failed"
log "debootstrap done ($(du -sxh "$BASE" | cut -f1))"

# Keep docs, man pages and translations out of every later package install.
cat >"$BASE/etc/dpkg/dpkg.cfg.d/90-vote-aggregator-slim" <<'EOF'
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/groff/*
path-exclude=/usr/share/lintian/*
path-exclude=/usr/share/linda/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
EOF
cat >"$BASE/etc/apt/apt.conf.d/90-vote-aggregator" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Dpkg::Use-Pty "false";
EOF
# No service may start while packages are installed (kept in the images).
printf '#!/bin/sh\nexit 101\n' >"$BASE/usr/sbin/policy-rc.d"
chmod 0755 "$BASE/usr/sbin/policy-rc.d"

# Clean-up run in each image's chroot after its packages are installed.
SLIM_SCRIPT='
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old /var/lib/dpkg/*-old
rm -rf /var/log/apt/* /var/log/dpkg.log /var/log/alternatives.log /var/log/bootstrap.log
rm -rf /tmp/* /var/tmp/* /root/.cache
find /usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find /usr/share/doc -mindepth 1 -type d -empty -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/groff/* /usr/share/lintian/* /usr/share/linda/*
if [ -d /usr/share/locale ]; then find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +; fi
: >/etc/resolv.conf
echo localhost >/etc/hostname
'

# prepare_tree NAME: copy the base into $WORK/NAME, mount /proc there; echo path
prepare_tree() {
    local root="$WORK/$1"
    cp -a "$BASE" "$root"
    mount -t proc proc "$root/proc"
    printf '%s\n' "$root"
}

# import_tree ROOT IMAGE STOPSIGNAL --change ...: tar the tree into
# `docker import`. STOPSIGNAL is not a valid --change for docker import or
# commit on every engine (not on 20.10), so it is set by creating (never
# starting) a container with --stop-signal and committing that to IMAGE.
import_tree() {
    local root=$1 image=$2 stopsignal=$3 old_id imported cid
    shift 3
    unmount_under "$root"
    old_id=$(docker image inspect -f '{{.Id}}' "$image" 2>/dev/null || true)
    imported=$(tar --numeric-owner -C "$root" \
        --exclude='./proc/*' --exclude='./sys/*' --exclude='./dev/*' \
        -cf - . |
        docker import "$@" -m "built by images/build.sh from Debian $SUITE packages" -)
    cid=$(docker create --stop-signal "$stopsignal" "$imported")
    docker commit -m "images/build.sh: STOPSIGNAL $stopsignal" "$cid" "$image" >/dev/null
    docker rm -v "$cid" >/dev/null
    if [ -n "$old_id" ] && [ "$old_id" != "$(docker image inspect -f '{{.Id}}' "$image")" ]; then
        # the image this one replaces, unless a container still uses it
        docker image rm "$old_id" >/dev/null 2>&1 || true
    fi
}

COMMON_LABELS=(
    --change 'LABEL org.opencontainers.image.source="vote-aggregator"'
    --change "LABEL org.opencontainers.image.base.name=\"debian:$SUITE (debootstrap minbase)\""
    --change "LABEL org.opencontainers.image.created=\"$(date -u +%Y-%m-%dT%H:%M:%SZ)\""
    --change "LABEL $RECIPE_LABEL=\"$RECIPE\""
)

# ---------------------------------------------------------------------------
# 2. PostgreSQL
# ---------------------------------------------------------------------------
write_postgres_entrypoint() {
    cat >"$1" <<'ENTRYPOINT_EOF'
#!/usr/bin/env bash
# Entrypoint of vote-aggregator/postgres:17-offline (made by images/build.sh).
# It behaves like the official postgres image's entrypoint as a client or a
# test harness sees it:
#   * POSTGRES_USER (default postgres), POSTGRES_PASSWORD (required unless
#     POSTGRES_HOST_AUTH_METHOD=trust), POSTGRES_DB (default: the user),
#     POSTGRES_INITDB_ARGS, POSTGRES_HOST_AUTH_METHOD (default scram-sha-256),
#     PGDATA (default /var/lib/postgresql/data), /docker-entrypoint-initdb.d.
#   * first start: initdb, then a temporary socket-only server (its log goes to
#     STDOUT through pg_ctl) creates the database and runs init scripts, is
#     stopped, and the real server is exec'd (its log goes to STDERR). Later
#     starts skip the initialisation.
#   * POSTGRES_PASSWORD_FILE, POSTGRES_USER_FILE, POSTGRES_DB_FILE and
#     POSTGRES_INITDB_ARGS_FILE (Docker secrets): the variable's value is read
#     from that file. Like the official image, the file is read by the first
#     pass of this script, i.e. as root when the container starts as root (a
#     0600 root-owned secret works) and as the --user otherwise; setting both
#     VAR and VAR_FILE is an error.
#   * `postgres ARGS` or `-flags` run the server with those args; any other
#     command is exec'd as is.
set -Eeuo pipefail

me=${BASH_SOURCE[0]}
say() { printf '%s: %s\n' "$me" "$*"; }

# file_env VAR [DEFAULT]: export VAR from $VAR, else from the file named by
# $VAR_FILE, else DEFAULT; VAR_FILE is then unset, so the re-exec'd second
# pass (as postgres) just sees VAR.
file_env() {
    local var=$1 def=${2:-} file_var="$1_FILE" val
    if [ -n "${!var:-}" ] && [ -n "${!file_var:-}" ]; then
        printf >&2 'error: both %s and %s are set (but are exclusive)\n' "$var" "$file_var"
        exit 1
    fi
    val=$def
    if [ -n "${!var:-}" ]; then
        val=${!var}
    elif [ -n "${!file_var:-}" ]; then
        if [ ! -f "${!file_var}" ] || [ ! -r "${!file_var}" ]; then
            printf >&2 'error: %s=%s is not a file that uid %s can read\n' "$file_var" "${!file_var}" "$(id -u)"
            exit 1
        fi
        val=$(<"${!file_var}")
    fi
    export "$var=$val"
    unset "$file_var"
}

if [ "$#" -eq 0 ] || [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
    exec "$@"
fi
for arg in "${@:2}"; do
    case "$arg" in
    '-?' | --help | --describe-config | -V | --version) exec "$@" ;;
    esac
done

export PGDATA=${PGDATA:-/var/lib/postgresql/data}
file_env POSTGRES_PASSWORD
file_env POSTGRES_USER postgres
file_env POSTGRES_DB "$POSTGRES_USER"
file_env POSTGRES_INITDB_ARGS

if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chmod 00700 "$PGDATA" || :
    chmod 03775 /var/run/postgresql || :
    find "$PGDATA" \! -user postgres -exec chown postgres:postgres '{}' +
    chown postgres:postgres /var/run/postgresql
    exec env HOME=/var/lib/postgresql \
        setpriv --reuid=postgres --regid=postgres --init-groups -- "$me" "$@"
fi

auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}

if [ -s "$PGDATA/PG_VERSION" ]; then
    say "PostgreSQL Database directory appears to contain a database; Skipping initialization"
    echo
    exec "$@"
fi

if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$auth" != trust ]; then
    cat >&2 <<'EOM'
Error: Database is uninitialized and superuser password is not specified.
       You must specify POSTGRES_PASSWORD to a non-empty value for the
       superuser. For example, "-e POSTGRES_PASSWORD=password" on "docker run".

       You may also use "POSTGRES_HOST_AUTH_METHOD=trust" to allow all
       connections without a password. This is *not* recommended.
EOM
    exit 1
fi

# --- initdb --------------------------------------------------------------
initdb_args=(--username="$POSTGRES_USER" --encoding=UTF8 --locale=C.UTF-8 -D "$PGDATA")
# shellcheck disable=SC2206 # word splitting of POSTGRES_INITDB_ARGS is intended
initdb_args+=(${POSTGRES_INITDB_ARGS:-})
if [ -n "${POSTGRES_PASSWORD:-}" ]; then
    initdb "${initdb_args[@]}" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD")
else
    initdb "${initdb_args[@]}"
fi

{
    echo
    if [ "$auth" = trust ]; then
        echo '# warning: trust is enabled for all connections'
    fi
    printf 'host all all all %s\n' "$auth"
} >>"$PGDATA/pg_hba.conf"

# --- temporary server: unix socket only, so nothing outside connects early -
temp_args=("${@:2}" -c listen_addresses= -p "${PGPORT:-5432}")
PGUSER=$POSTGRES_USER pg_ctl -D "$PGDATA" -o "$(printf '%q ' "${temp_args[@]}")" -w start

psql_cmd=(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password --no-psqlrc)
if [ "$POSTGRES_DB" != postgres ]; then
    exists=$("${psql_cmd[@]}" --dbname postgres --set db="$POSTGRES_DB" --tuples-only --no-align <<<"SELECT 1 FROM pg_database WHERE datname = :'db' ;")
    if [ -z "$exists" ]; then
        "${psql_cmd[@]}" --dbname postgres --set db="$POSTGRES_DB" <<<'CREATE DATABASE :"db" ;'
    fi
fi

echo
for f in /docker-entrypoint-initdb.d/*; do
    [ -e "$f" ] || continue
    case "$f" in
    *.sh)
        if [ -x "$f" ]; then
            say "running $f"
            "$f"
        else
            say "sourcing $f"
            # shellcheck disable=SC1090
            . "$f"
        fi
        ;;
    *.sql) say "running $f"; "${psql_cmd[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
    *.sql.gz) say "running $f"; gzip -dc "$f" | "${psql_cmd[@]}" --dbname "$POSTGRES_DB" ;;
    *) say "ignoring $f" ;;
    esac
    echo
done

PGUSER=$POSTGRES_USER pg_ctl -D "$PGDATA" -m fast -w stop

echo
echo 'PostgreSQL init process complete; ready for start up.'
echo
exec "$@"
ENTRYPOINT_EOF
    chmod 0755 "$1"
}

build_postgres() {
    local root ver
    log "[postgres] copying base tree, installing postgresql-$PG_MAJOR (log: $WORK/postgres-install.log)"
    root=$(prepare_tree postgres)
    # Like the official image: postgres is uid/gid 999, and installing the
    # server package must not create a cluster (the entrypoint runs initdb).
    run_logged "$WORK/postgres-install.log" in_chroot "$root" "
        groupadd --system --gid 999 postgres
        useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql --shell /bin/bash postgres
        mkdir -p /var/lib/postgresql
        chown postgres:postgres /var/lib/postgresql
        apt-get install -y -q postgresql-common
        sed -ri 's/^#?[[:space:]]*(create_main_cluster)[[:space:]]*=.*/\1 = false/' /etc/postgresql-common/createcluster.conf
        grep -q '^create_main_cluster = false' /etc/postgresql-common/createcluster.conf
        apt-get install -y -q postgresql-$PG_MAJOR postgresql-client-$PG_MAJOR
        sed -ri \"s!^#?(listen_addresses)[[:space:]]*=[[:space:]]*[^[:space:]]+!\\1 = '*'!\" /usr/share/postgresql/$PG_MAJOR/postgresql.conf.sample
        grep -F \"listen_addresses = '*'\" /usr/share/postgresql/$PG_MAJOR/postgresql.conf.sample
        mkdir -p /var/run/postgresql /var/lib/postgresql/data /docker-entrypoint-initdb.d
        chown -R postgres:postgres /var/run/postgresql /var/lib/postgresql
        chmod 03775 /var/run/postgresql
        chmod 00700 /var/lib/postgresql/data
        /usr/lib/postgresql/$PG_MAJOR/bin/postgres --version
        /usr/lib/postgresql/$PG_MAJOR/bin/pg_isready --version
        /usr/lib/postgresql/$PG_MAJOR/bin/psql --version
        command -v setpriv
        $SLIM_SCRIPT
    " || die "installing postgresql-$PG_MAJOR failed"
    write_postgres_entrypoint "$root/usr/local/bin/docker-entrypoint.sh"
    # shellcheck disable=SC2016 # dpkg-query's own ${Version} format
    ver=$(chroot "$root" dpkg-query -W -f '${Version}' "postgresql-$PG_MAJOR")
    log "[postgres] postgresql-$PG_MAJOR $ver installed, tree $(du -sxh "$root" | cut -f1); docker import -> $PG_IMAGE"
    import_tree "$root" "$PG_IMAGE" SIGINT "${COMMON_LABELS[@]}" \
        --change "LABEL org.opencontainers.image.title=\"PostgreSQL $PG_MAJOR (offline build)\"" \
        --change "LABEL org.opencontainers.image.version=\"$ver\"" \
        --change "LABEL org.opencontainers.image.description=\"Stand-in for postgres:$PG_MAJOR built from Debian $SUITE packages\"" \
        --change "ENV PATH=/usr/lib/postgresql/$PG_MAJOR/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change 'ENV LANG=C.UTF-8' \
        --change "ENV PG_MAJOR=$PG_MAJOR" \
        --change "ENV PG_VERSION=$ver" \
        --change 'ENV PGDATA=/var/lib/postgresql/data' \
        --change 'VOLUME /var/lib/postgresql/data' \
        --change 'EXPOSE 5432' \
        --change 'ENTRYPOINT ["docker-entrypoint.sh"]' \
        --change 'CMD ["postgres"]' ||
        die "docker import of $PG_IMAGE failed"
    rm -rf --one-file-system "$root"
    log "[postgres] built $PG_IMAGE"
}

# ---------------------------------------------------------------------------
# 3. RabbitMQ
# ---------------------------------------------------------------------------
write_rabbitmq_entrypoint() {
    cat >"$1" <<'ENTRYPOINT_EOF'
#!/usr/bin/env bash
# Entrypoint of vote-aggregator/rabbitmq:4.0-offline (made by images/build.sh).
# It behaves like the official rabbitmq image's entrypoint as a client or a
# test harness sees it:
#   * RABBITMQ_DEFAULT_USER / RABBITMQ_DEFAULT_PASS (default guest/guest) and
#     RABBITMQ_DEFAULT_VHOST are read by the RabbitMQ server itself on the
#     first start; any user may log in from outside (loopback_users = none).
#   * the log goes to STDOUT (RABBITMQ_LOGS=-), "Server startup complete"
#     included; the node is rabbit@localhost whatever the container's
#     hostname, so stop + start of a container (or a new container on the same
#     volume) finds its data.
#   * `rabbitmq-server` (or `-flags`) runs the broker as user rabbitmq; any
#     other command is exec'd as is.
set -Eeuo pipefail

me=${BASH_SOURCE[0]}

if [ "$#" -eq 0 ] || [ "${1:0:1}" = '-' ]; then
    set -- rabbitmq-server "$@"
fi

if [ "$1" = rabbitmq-server ] && [ "$(id -u)" = 0 ]; then
    home=/var/lib/rabbitmq
    cookie=$home/.erlang.cookie
    mkdir -p "$home" /var/log/rabbitmq
    if [ -n "${RABBITMQ_ERLANG_COOKIE:-}" ]; then
        rm -f "$cookie"
        printf '%s' "$RABBITMQ_ERLANG_COOKIE" >"$cookie"
    elif [ ! -s "$cookie" ]; then
        # made here (not by the first CLI call) so that it is always the
        # rabbitmq user's and every container has its own
        od -An -N20 -tx1 /dev/urandom | tr -dc '0-9a-f' | tr 'a-f' 'A-F' >"$cookie"
    fi
    find "$home" /var/log/rabbitmq \! -user rabbitmq -exec chown rabbitmq:rabbitmq '{}' +
    chmod 0400 "$cookie"
    exec env HOME="$home" setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups -- "$me" "$@"
fi

exec "$@"
ENTRYPOINT_EOF
    chmod 0755 "$1"
}

build_rabbitmq() {
    local root ver
    log "[rabbitmq] copying base tree, installing rabbitmq-server (log: $WORK/rabbitmq-install.log)"
    root=$(prepare_tree rabbitmq)
    run_logged "$WORK/rabbitmq-install.log" in_chroot "$root" "
        groupadd --system --gid 999 rabbitmq
        useradd --system --uid 999 --gid rabbitmq --home-dir /var/lib/rabbitmq --shell /usr/sbin/nologin rabbitmq
        mkdir -p /var/lib/rabbitmq
        chown rabbitmq:rabbitmq /var/lib/rabbitmq
        apt-get install -y -q rabbitmq-server
        rm -f /var/lib/rabbitmq/.erlang.cookie
        mkdir -p /etc/rabbitmq/conf.d /var/log/rabbitmq
        chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
        command -v setpriv
        $SLIM_SCRIPT
    " || die "installing rabbitmq-server failed"
    cat >"$root/etc/rabbitmq/conf.d/10-defaults.conf" <<'EOF'
# vote-aggregator/rabbitmq offline image defaults (like the official image's)
# any user (guest included) may connect from outside the container
loopback_users = none
listeners.tcp.default = 5672
# logs to the container's stdout
log.console = true
log.console.level = info
EOF
    write_rabbitmq_entrypoint "$root/usr/local/bin/docker-entrypoint.sh"
    # shellcheck disable=SC2016 # dpkg-query's own ${Version} format
    ver=$(chroot "$root" dpkg-query -W -f '${Version}' rabbitmq-server)
    case "$ver" in
    "$RMQ_SERIES".*) ;;
    *) warn "Debian $SUITE ships rabbitmq-server $ver, not $RMQ_SERIES.x; $RMQ_IMAGE gets it anyway" ;;
    esac
    log "[rabbitmq] rabbitmq-server $ver installed, tree $(du -sxh "$root" | cut -f1); docker import -> $RMQ_IMAGE"
    import_tree "$root" "$RMQ_IMAGE" SIGTERM "${COMMON_LABELS[@]}" \
        --change "LABEL org.opencontainers.image.title=\"RabbitMQ $RMQ_SERIES (offline build)\"" \
        --change "LABEL org.opencontainers.image.version=\"$ver\"" \
        --change "LABEL org.opencontainers.image.description=\"Stand-in for rabbitmq:$RMQ_SERIES built from Debian $SUITE packages\"" \
        --change 'ENV PATH=/usr/lib/rabbitmq/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV LC_ALL=C.UTF-8' \
        --change 'ENV HOME=/var/lib/rabbitmq' \
        --change 'ENV RABBITMQ_LOGS=-' \
        --change 'ENV RABBITMQ_NODENAME=rabbit@localhost' \
        --change 'VOLUME /var/lib/rabbitmq' \
        --change 'EXPOSE 4369 5671 5672 15691 15692 25672' \
        --change 'ENTRYPOINT ["docker-entrypoint.sh"]' \
        --change 'CMD ["rabbitmq-server"]' ||
        die "docker import of $RMQ_IMAGE failed"
    rm -rf --one-file-system "$root"
    log "[rabbitmq] built $RMQ_IMAGE"
}

# ---------------------------------------------------------------------------
# 4. Prometheus: a stand-in for prom/prometheus:v2.53.3 as a compose file sees
#    it (same ENTRYPOINT, CMD, USER, WORKDIR, VOLUME, EXPOSE and paths), from
#    Debian's prometheus + promtool packages. Debian builds without the React
#    UI: /graph is a Debian notice page linking to the classic UI under
#    /classic/, whose assets come from the libjs-* dependencies through
#    /usr/share/prometheus/web (the binary's --web.local-assets default).
# ---------------------------------------------------------------------------
build_prometheus() {
    local root ver
    log "[prometheus] copying base tree, installing prometheus + promtool (log: $WORK/prometheus-install.log)"
    root=$(prepare_tree prometheus)
    # The official image keeps console templates in /usr/share/prometheus
    # (linked from /etc/prometheus); Debian keeps them in /etc/prometheus (a
    # README only): link the official paths there, so its CMD works as is.
    # Any dangling link in the web assets (e.g. a libjs-* file that the slim
    # dpkg excludes dropped) would be a 404 in the classic UI: fail on it.
    run_logged "$WORK/prometheus-install.log" in_chroot "$root" "
        apt-get install -y -q --no-install-recommends prometheus promtool
        test -x /bin/prometheus
        test -x /bin/promtool
        /bin/prometheus --version
        /bin/promtool --version
        for d in consoles console_libraries; do
            test -d /etc/prometheus/\$d
            test -e /usr/share/prometheus/\$d || ln -s /etc/prometheus/\$d /usr/share/prometheus/\$d
        done
        test -f /usr/share/prometheus/web/templates/graph.html
        test -f /usr/share/prometheus/web/static/js/graph/index.js
        mkdir -p /prometheus
        $SLIM_SCRIPT
        broken=\$(find -L /usr/share/prometheus/web -type l)
        if [ -n \"\$broken\" ]; then echo \"dangling web asset links: \$broken\" >&2; exit 1; fi
    " || die "installing prometheus failed"
    # The official image's default config (upstream's
    # documentation/examples/prometheus.yml): Prometheus scrapes only itself.
    # Debian's sample also scrapes a node exporter on :9100, a down target here.
    cat >"$root/etc/prometheus/prometheus.yml" <<'PROMETHEUS_YML_EOF'
# Default configuration of the offline Prometheus image (made by
# images/build.sh), like the one in prom/prometheus:v2.53.3: Prometheus
# scrapes itself. Mount your own file over /etc/prometheus/prometheus.yml.
global:
  scrape_interval: 15s
  evaluation_interval: 15s

alerting:
  alertmanagers:
    - static_configs:
        - targets:
          # - alertmanager:9093

rule_files:
  # - "first_rules.yml"

scrape_configs:
  - job_name: "prometheus"
    static_configs:
      - targets: ["localhost:9090"]
PROMETHEUS_YML_EOF
    # Like the official image: config and data belong to nobody (65534:65534;
    # Debian calls group 65534 nogroup).
    chroot "$root" chown -R 65534:65534 /etc/prometheus /prometheus
    chroot "$root" /bin/promtool check config /etc/prometheus/prometheus.yml >>"$WORK/prometheus-install.log" 2>&1 ||
        die "promtool rejects the default prometheus.yml (see $WORK/prometheus-install.log)"
    # shellcheck disable=SC2016 # dpkg-query's own ${Version} format
    ver=$(chroot "$root" dpkg-query -W -f '${Version}' prometheus)
    case "$ver" in
    "$PROM_SERIES".*) ;;
    *) warn "Debian $SUITE ships prometheus $ver, not $PROM_SERIES.x; $PROM_IMAGE gets it anyway" ;;
    esac
    log "[prometheus] prometheus $ver installed, tree $(du -sxh "$root" | cut -f1); docker import -> $PROM_IMAGE"
    import_tree "$root" "$PROM_IMAGE" SIGTERM "${COMMON_LABELS[@]}" \
        --change "LABEL org.opencontainers.image.title=\"Prometheus $PROM_SERIES (offline build)\"" \
        --change "LABEL org.opencontainers.image.version=\"$ver\"" \
        --change "LABEL org.opencontainers.image.description=\"Stand-in for $PROM_OFFICIAL built from Debian $SUITE packages (classic web UI only)\"" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'USER nobody' \
        --change 'WORKDIR /prometheus' \
        --change 'VOLUME /prometheus' \
        --change 'EXPOSE 9090' \
        --change 'ENTRYPOINT ["/bin/prometheus"]' \
        --change 'CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", "--web.console.libraries=/usr/share/prometheus/console_libraries", "--web.console.templates=/usr/share/prometheus/consoles"]' ||
        die "docker import of $PROM_IMAGE failed"
    rm -rf --one-file-system "$root"
    log "[prometheus] built $PROM_IMAGE"
}

# ---------------------------------------------------------------------------
# 5. The runtime base of the service's own image (Dockerfile BASE_IMAGE): the
#    minbase tree itself, a stand-in for debian:trixie-slim.
# ---------------------------------------------------------------------------
build_base() {
    local root
    log "[base] copying base tree (log: $WORK/base-install.log)"
    root=$(prepare_tree runtime-base)
    run_logged "$WORK/base-install.log" in_chroot "$root" "
        command -v useradd
        $SLIM_SCRIPT
    " || die "preparing the runtime base failed"
    import_tree "$root" "$BASE_IMAGE" SIGTERM "${COMMON_LABELS[@]}" \
        --change "LABEL org.opencontainers.image.title=\"Debian $SUITE minbase (offline build)\"" \
        --change "LABEL org.opencontainers.image.description=\"Stand-in for debian:$SUITE-slim built with debootstrap\"" \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["bash"]' ||
        die "docker import of $BASE_IMAGE failed"
    rm -rf --one-file-system "$root"
    log "[base] built $BASE_IMAGE"
}

if [ "$BUILD_PG" = 1 ]; then build_postgres; fi
if [ "$BUILD_RMQ" = 1 ]; then build_rabbitmq; fi
if [ "$BUILD_PROM" = 1 ]; then build_prometheus; fi
if [ "$BUILD_BASE" = 1 ]; then build_base; fi

for image in "$PG_IMAGE" "$RMQ_IMAGE" "$PROM_IMAGE" "$BASE_IMAGE"; do
    size=$(docker image inspect -f '{{.Size}}' "$image" 2>/dev/null || echo 0)
    log "$image: $((size / 1000000)) MB"
done
log "done in $(($(date +%s) - START_TS)) s"
