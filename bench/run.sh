#!/usr/bin/env bash
# Builds the release worker and runs a benchmark: bench/run.sh throughput|throttle|chaos|cluster [ARGS…]
#   throughput: --jobs 5000 --concurrency 64 --latency-ms 0
#   throttle:   --jobs 3000 [--only 1|2a|2b|3|4|5]
#   chaos:      --jobs 5000 [--only kill|broker]   (broker stops and starts the local RabbitMQ app)
#   cluster:    --jobs 5000 [--only rolling|leader|replicas]   (a private 3-node cluster on 5711-5713)
set -euo pipefail
cd "$(dirname "$0")/.."
bench=${1:?usage: bench/run.sh throughput|throttle|chaos|cluster [ARGS…]}
shift
scripts/ensure-rabbitmq.sh
cargo build --release --quiet --bin unassign-worker
cargo run --release --quiet --example "$bench" -- "$@"
