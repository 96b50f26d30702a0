#!/usr/bin/env bash
# Builds the release worker and runs a benchmark: bench/run.sh throughput|throttle|chaos|cluster|soak|intake [ARGS…]
#   throughput: --jobs 5000 --concurrency 64 --latency-ms 0
#   throttle:   --jobs 3000 [--only 1|2a|2b|3|4|5]
#   chaos:      --jobs 5000 [--only NAME] [--outage-secs 120]
#               on a private RabbitMQ node (scripts/rabbitmq-cluster.sh --nodes 1, AMQP port
#               $CHAOS_RABBITMQ_PORT, default 5801) that it may stop, kill and restart; torn down
#               at the end. The system broker is not touched.
#   cluster:    --jobs 5000 [--only rolling|leader|replicas]   (a private 3-node cluster on 5711-5713)
#   soak:       --minutes 30 [--rate 40]   (tests/it/soak.rs in release mode, against the local broker)
#   intake:     --posts 4000 --batch-posts 200 --connections 16 [--max-secs 60]   (the HTTP intake)
set -euo pipefail
cd "$(dirname "$0")/.."
bench=${1:?usage: bench/run.sh throughput|throttle|chaos|cluster|soak|intake [ARGS…]}
shift
scripts/ensure-rabbitmq.sh
case $bench in
  soak)
    minutes=30 rate=40
    while [ $# -gt 0 ]; do
      case $1 in
        --minutes) minutes=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        *) echo "soak: unknown flag $1" >&2; exit 2 ;;
      esac
    done
    SOAK_SECS=$((minutes * 60)) SOAK_RATE=$rate \
      cargo test --release --quiet --test it soak:: -- --nocapture
    exit
    ;;
  chaos)
    export CHAOS_RABBITMQ_PORT=${CHAOS_RABBITMQ_PORT:-5801}
    node=(scripts/rabbitmq-cluster.sh --nodes 1 --base-port "$CHAOS_RABBITMQ_PORT")
    trap '"${node[@]}" down >/dev/null' EXIT
    "${node[@]}" up >/dev/null
    AMQP_URL=$("${node[@]}" urls)
    export AMQP_URL
    ;;
esac
cargo build --release --quiet --bin unassign-worker
cargo run --release --quiet --example "$bench" -- "$@"
