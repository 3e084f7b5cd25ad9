#!/usr/bin/env bash
# Checks the service image IMAGE built by `make image` from the release binary BINARY:
#   1. its configuration: non-root fixed user, port 8001, SIGTERM, the healthcheck
#      subcommand as HEALTHCHECK, OCI version and revision labels;
#   2. its binary is byte-for-byte the release build next to it (which the process tests
#      check for fault-injection hooks when it exists: none may be there);
#   3. it runs as that user and becomes healthy (here with unreachable servers: /healthz
#      only says the process serves), and `docker stop` ends it cleanly (exit 0).
# Usage: scripts/image-test.sh IMAGE BINARY. Removes every container it started.
set -euo pipefail
image=${1:?usage: image-test.sh IMAGE BINARY}
binary=${2:?usage: image-test.sh IMAGE BINARY}
label=vote-aggregator.image-test=$$
fail() {
    printf 'image-test: FAIL: %s\n' "$*" >&2
    exit 1
}
cleanup() { docker ps -aq --filter "label=$label" | xargs -r docker rm -fv >/dev/null; }
trap cleanup EXIT

inspect() { docker image inspect -f "$1" "$image"; }
expect() { # what got want
    [ "$2" = "$3" ] || fail "$1: got '$2', want '$3'"
}
expect user "$(inspect '{{.Config.User}}')" "10001:10001"
expect "exposed ports" "$(inspect '{{json .Config.ExposedPorts}}')" '{"8001/tcp":{}}'
expect "stop signal" "$(inspect '{{.Config.StopSignal}}')" SIGTERM
expect healthcheck "$(inspect '{{json .Config.Healthcheck.Test}}')" \
    '["CMD","vote-aggregator","healthcheck","--timeout-seconds","4"]'
expect entrypoint "$(inspect '{{json .Config.Entrypoint}}')" '["vote-aggregator"]'
version=$(inspect '{{index .Config.Labels "org.opencontainers.image.version"}}')
revision=$(inspect '{{index .Config.Labels "org.opencontainers.image.revision"}}')
[ -n "$version" ] && [ "$version" != unknown ] || fail "no version label"
[ -n "$revision" ] && [ "$revision" != unknown ] || fail "no revision label"

cid=$(docker create --label "$label" "$image")
docker cp "$cid:/usr/local/bin/vote-aggregator" "/tmp/image-test-binary.$$" >/dev/null
docker rm -v "$cid" >/dev/null
if ! cmp -s "/tmp/image-test-binary.$$" "$binary"; then
    rm -f "/tmp/image-test-binary.$$"
    fail "the image's binary is not $binary"
fi
rm -f "/tmp/image-test-binary.$$"

id=$(docker run --rm --label "$label" "$image" --version)
case "$id" in vote-aggregator\ "$version"*) ;; *) fail "--version printed '$id'" ;; esac

cid=$(docker run -d --label "$label" --health-interval 1s --health-start-period 1s \
    -e DATABASE_URL=postgres://votes:pw@127.0.0.1:1/votes \
    -e AMQP_URL=amqp://votes:pw@127.0.0.1:1/%2f "$image")
expect "process user" "$(docker exec "$cid" id -u 2>/dev/null || docker top "$cid" -o uid | tail -n 1 | tr -d ' ')" 10001
status=
for _ in $(seq 60); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$cid")
    [ "$status" = healthy ] && break
    sleep 0.5
done
expect "health after start" "$status" healthy
docker stop -t 30 "$cid" >/dev/null
expect "exit code after docker stop" "$(docker inspect -f '{{.State.ExitCode}}' "$cid")" 0
echo "image-test: $image ($version, $revision) PASS: user 10001, port 8001, healthy, clean stop, release binary"
