#!/usr/bin/env bash
# Supply-chain checks of the dependency graph with cargo-deny (policy: deny.toml):
# licences, banned and duplicate crates, sources (crates.io only) — always; RustSec
# advisories when the advisory database can be fetched (it lives on GitHub), or from a copy
# an earlier run fetched, with a printed notice either way when it cannot be fetched.
# Installs the pinned cargo-deny first when it is missing (a few minutes, once).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DENY_VERSION=0.20.2
if [ "$(cargo deny --version 2>/dev/null | awk '{print $2}')" != "$CARGO_DENY_VERSION" ]; then
    echo "==> installing cargo-deny $CARGO_DENY_VERSION (crates.io)"
    cargo install --locked "cargo-deny@$CARGO_DENY_VERSION"
fi

cargo deny --locked check bans licenses sources

db_dir="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if timeout 120 cargo deny fetch db >/dev/null 2>&1; then
    cargo deny --locked check --disable-fetch advisories
elif compgen -G "$db_dir/*/.git" >/dev/null; then
    fetched=$(git -C "$(compgen -G "$db_dir/*/.git" | head -1)/.." log -1 --format=%cs 2>/dev/null || echo unknown)
    echo "NOTICE: the RustSec advisory database could not be fetched; checking against the copy from $fetched"
    cargo deny --locked check --disable-fetch advisories
else
    echo "NOTICE: advisories NOT checked: the RustSec advisory database (github.com/RustSec/advisory-db) cannot be fetched from this machine and no earlier copy exists."
fi
