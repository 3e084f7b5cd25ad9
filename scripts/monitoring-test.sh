#!/usr/bin/env bash
# Checks the monitoring files offline (`make monitoring-test`, run by CI):
#   - promtool check config of deploy/prometheus/prometheus.yml (which loads alerts.yml),
#   - promtool check rules and the unit tests of the alert rules (alerts.test.yml),
#   - the Grafana dashboard statically (scripts/check-dashboard.py) and every PromQL
#     expression of its panels through promtool check rules.
# promtool comes from the Prometheus image (PROMETHEUS_IMAGE, default the offline one
# `make images` builds, which `make monitoring-test` runs first). Which `vote_aggregator_*` names the files use is checked against a
# running replica by the broker suite (test monitoring_files_use_only_exported_metrics).
set -euo pipefail
cd "$(dirname "$0")/.."
image=${PROMETHEUS_IMAGE:-vote-aggregator/prometheus:2.53-offline}
if ! docker image inspect "$image" >/dev/null 2>&1; then
    echo "monitoring-test: the image $image is missing: run \`make images\` (or set PROMETHEUS_IMAGE to an image with /bin/promtool)" >&2
    exit 1
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp deploy/prometheus/prometheus.yml deploy/prometheus/alerts.yml deploy/prometheus/alerts.test.yml "$work/"
python3 scripts/check-dashboard.py deploy/grafana/dashboards/vote-aggregator.json \
    deploy/grafana/provisioning/datasources/prometheus.yml "$work/dashboard-rules.yml"
chmod -R a+rX "$work"
promtool() {
    docker run --rm --network none -v "$work:/p:ro" -w /p --entrypoint /bin/promtool "$image" "$@"
}
promtool check config prometheus.yml
promtool check rules alerts.yml dashboard-rules.yml
promtool test rules alerts.test.yml
# Every alert's runbook anchor is a section of docs/RUNBOOK.md ("### <AlertName>").
missing=0
for anchor in $(grep -o 'RUNBOOK.md#[a-z0-9-]*' deploy/prometheus/alerts.yml | cut -d'#' -f2); do
    if ! grep -qix "### $anchor" docs/RUNBOOK.md; then
        echo "monitoring-test: docs/RUNBOOK.md has no section for the runbook anchor #$anchor" >&2
        missing=1
    fi
done
[ "$missing" = 0 ]
echo "monitoring-test: passed (runbook sections: $(grep -c 'runbook:' deploy/prometheus/alerts.yml) alerts)"
