#!/usr/bin/env bash
# The test suite: unit tests and integration tests against the local RabbitMQ and graph-sim.
# With arguments, they go to `cargo test` as they are (`scripts/test.sh --test it hostile::`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
scripts/ensure-prometheus.sh   # promtool + prometheus for tests/it/observability.rs
scripts/ensure-k8s-tools.sh    # kustomize + kubernetes-validate for tests/it/observability.rs
if [ "$#" -gt 0 ]; then
  exec cargo test --locked "$@"
fi
# The soak (a minute of load with a fault every few seconds) and the cluster fail-over (three
# broker nodes) load both cores on their own: they run after the rest, not beside it, so that
# their deadlines measure the worker rather than the machine.
heavy=(soak:: cluster::)
cargo test --locked -- --skip "${heavy[0]}" --skip "${heavy[1]}"
cargo test --locked --test it -- "${heavy[@]}"
