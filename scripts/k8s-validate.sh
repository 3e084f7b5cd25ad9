#!/usr/bin/env bash
# Offline validation of deploy/k8s/ (no cluster): every built-in resource against the
# Kubernetes JSON schemas bundled with the pinned kubernetes-validate (strict: unknown
# fields are errors), for the oldest and the newest Kubernetes minor we support; then
# scripts/k8s_check.py: the custom resources' structure (no schema for them here) and the
# references between the files. The manifests' agreement with the service's own constants
# (variable names, port, grace, probe paths) is a unit test (`k8s_manifests`).
# Installs the pinned tools into target/k8s/venv once (PyPI; Python 3 with venv needed).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSIONS=(1.33.0 1.37.0)
venv=target/k8s/venv
requirements=scripts/k8s-validate-requirements.txt
stamp=$venv/.requirements

if ! cmp -s "$requirements" "$stamp" 2>/dev/null; then
    echo "==> installing kubernetes-validate into $venv (PyPI, pinned in $requirements)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$requirements"
    cp "$requirements" "$stamp"
fi

mapfile -t builtin < <(ls deploy/k8s/*.yaml)
for version in "${K8S_VERSIONS[@]}"; do
    echo "==> kubernetes-validate --strict -k $version deploy/k8s/*.yaml"
    "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "${builtin[@]}"
done
echo "==> scripts/k8s_check.py (custom resources and cross-references)"
"$venv/bin/python" scripts/k8s_check.py deploy/k8s
echo "k8s-validate passed: ${#builtin[@]} files against Kubernetes ${K8S_VERSIONS[*]}, plus deploy/k8s/optional/"
