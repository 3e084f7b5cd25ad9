#!/usr/bin/env python3
"""Static check of the Grafana dashboard (no Grafana runs on this machine).

Usage: check-dashboard.py DASHBOARD.json DATASOURCE.yml OUT_RULES.yml

Checks that the dashboard parses, has a uid and a title, that every panel has a unique
id, a grid position, the provisioned Prometheus datasource and at least one target with
a refId and a PromQL expression. Writes every expression (Grafana's $__rate_interval
replaced by 5m) as a recording rule to OUT_RULES.yml, so `promtool check rules` can
check their syntax. Exits 1 naming the first problem.
"""

import json
import re
import sys


def fail(message):
    print(f"dashboard check: {message}", file=sys.stderr)
    sys.exit(1)


def datasource_uid(path):
    """The `uid:` of the provisioned datasource file (a one-datasource YAML file)."""
    with open(path, encoding="utf-8") as f:
        found = re.findall(r"^\s+uid:\s*(\S+)\s*$", f.read(), re.MULTILINE)
    if len(found) != 1:
        fail(f"{path}: expected exactly one datasource uid, found {found}")
    return found[0]


def check_panel(panel, uid, seen_ids):
    title = panel.get("title") or fail(f"panel {panel.get('id')} has no title")
    pid = panel.get("id")
    if not isinstance(pid, int) or pid in seen_ids:
        fail(f"panel {title!r}: id {pid!r} missing or not unique")
    seen_ids.add(pid)
    grid = panel.get("gridPos", {})
    if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")):
        fail(f"panel {title!r}: gridPos needs integer x, y, w, h")
    if grid["x"] + grid["w"] > 24:
        fail(f"panel {title!r}: wider than Grafana's 24 columns")
    if panel.get("datasource", {}).get("uid") != uid:
        fail(f"panel {title!r}: datasource is not the provisioned uid {uid!r}")
    targets = panel.get("targets") or fail(f"panel {title!r} has no targets")
    exprs = []
    for t in targets:
        if not t.get("refId") or not t.get("expr"):
            fail(f"panel {title!r}: a target lacks refId or expr")
        if t.get("datasource", {}).get("uid") != uid:
            fail(f"panel {title!r}: target {t['refId']} datasource is not {uid!r}")
        exprs.append(t["expr"].replace("$__rate_interval", "5m"))
    return exprs


def main():
    if len(sys.argv) != 4:
        fail("usage: check-dashboard.py DASHBOARD.json DATASOURCE.yml OUT_RULES.yml")
    dashboard_path, datasource_path, out_path = sys.argv[1:]
    try:
        with open(dashboard_path, encoding="utf-8") as f:
            dashboard = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{dashboard_path}: {e}")
    for key in ("uid", "title", "panels"):
        if not dashboard.get(key):
            fail(f"{dashboard_path}: no {key}")
    uid = datasource_uid(datasource_path)
    seen = set()
    exprs = [e for p in dashboard["panels"] for e in check_panel(p, uid, seen)]
    with open(out_path, "w", encoding="utf-8") as out:
        out.write("groups:\n  - name: dashboard-expressions\n    rules:\n")
        for i, expr in enumerate(exprs):
            out.write(f"      - record: dashboard:expr_{i}\n")
            out.write(f"        expr: {json.dumps(expr)}\n")
    print(f"dashboard check: {len(seen)} panels, {len(exprs)} expressions written to {out_path}")


if __name__ == "__main__":
    main()
