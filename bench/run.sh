#!/usr/bin/env bash
# Builds the release worker and runs the throughput benchmark; extra arguments go to it
# (e.g. --jobs 5000 --concurrency 64 --latency-ms 0).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-rabbitmq.sh
cargo build --release --quiet --bin unassign-worker
cargo run --release --quiet --example throughput -- "$@"
