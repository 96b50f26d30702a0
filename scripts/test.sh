#!/usr/bin/env bash
# The test suite: unit tests and integration tests against the local RabbitMQ and graph-sim.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
scripts/ensure-prometheus.sh   # promtool + prometheus for tests/observability.rs
scripts/ensure-k8s-tools.sh    # kustomize + kubernetes-validate for tests/observability.rs
exec cargo test --locked "$@"
