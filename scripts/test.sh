#!/usr/bin/env bash
# The test suite: unit tests and integration tests against the local RabbitMQ and graph-sim, run
# by cargo-nextest (scripts/ensure-nextest.sh; .config/nextest.toml).
# With arguments, they go to `cargo test` as they are (`scripts/test.sh --test it hostile::`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
scripts/ensure-prometheus.sh   # promtool + prometheus for tests/it/observability/
scripts/ensure-k8s-tools.sh    # kustomize + kubernetes-validate for tests/it/observability/
if [ "$#" -gt 0 ]; then
  exec cargo test --locked "$@"
fi
nextest=$(scripts/ensure-nextest.sh)
# `--tests`: every test target, but not the bench examples, which clippy already checks and no
# test runs: linking five bench binaries is work no test reads.
run() { "$nextest" nextest run --locked --workspace --tests --no-fail-fast "$@"; }
# The soak smoke test (load with a fault every few seconds) and the cluster fail-over (three
# broker nodes) each load both cores on their own: they run after the rest and apart from each
# other, so that their deadlines measure the worker rather than the machine (beside other tests,
# either failed now and then). The long soak and the cluster bench are bench/run.sh's.
run -E 'not (test(/^soak::/) | test(/^cluster::/))'
run -E 'test(/^cluster::/)'
run -E 'test(/^soak::/)'
