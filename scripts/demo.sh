#!/usr/bin/env bash
# The whole job end to end on this machine: RabbitMQ + graph-sim + the worker + sample jobs,
# then one signed webhook through the HTTP intake, then a summary.
# Usage: scripts/demo.sh [JOBS]   (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${1:-200}
SIM=127.0.0.1:18080
METRICS=http://127.0.0.1:9464
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
wait_http() { # URL, what
  for _ in $(seq 1 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "$2 did not come up; see $work" >&2; exit 1
}

say "RabbitMQ"
scripts/ensure-rabbitmq.sh
for q in requests dead outcomes; do rabbitmqctl -q delete_queue "demo.autopilot.unassign.$q" >/dev/null 2>&1 || true; done

say "Building"
cargo build --quiet
BIN=target/debug/unassign-worker

say "graph-sim on $SIM: 30 ms latency, 5% 503s, throttled above 25 calls/s"
devices=()
for _ in $(seq 1 "$JOBS"); do devices+=("$(cat /proc/sys/kernel/random/uuid)"); done
printf '%s\n' "${devices[@]}" | awk '{printf "{\"id\":\"%s\",\"serialNumber\":\"SN%05d\",\"userPrincipalName\":\"user%d@contoso.com\"}\n", $1, NR, NR}' > "$work/devices.jsonl"
"$BIN" graph-sim --listen "$SIM" --devices "$work/devices.jsonl" --latency-ms 30 \
  --error-rate 503=0.05 --throttle-limit 25 --throttle-window-ms 1000 >"$work/sim.log" 2>&1 &
pids+=($!)
wait_http "http://$SIM/_sim/stats" graph-sim

say "Worker (logs: $work/worker.log)"
export AZURE_CLIENT_SECRET=sim-secret
"$BIN" run --config config/local.toml 2>"$work/worker.log" &
worker=$!
pids+=("$worker")
wait_http "$METRICS/readyz" "the worker"

unknown=$(cat /proc/sys/kernel/random/uuid)
say "Enqueueing $JOBS jobs (+1 for a device Intune does not know) from a CSV file"
{
  echo "request_id,device_id,requested_by,reason"
  for i in "${!devices[@]}"; do echo "demo-$i,${devices[$i]},demo,offboarding"; done
  echo "demo-unknown,$unknown,demo,offboarding"
} > "$work/jobs.csv"
started=$(date +%s.%N)
"$BIN" enqueue --config config/local.toml --file "$work/jobs.csv"
total=$((JOBS + 1))

say "Waiting for $total outcomes"
for _ in $(seq 1 600); do
  done_jobs=$(curl -fs "$METRICS/metrics" | awk '/^unassign_jobs_total/ {s += $2} END {print s + 0}')
  [ "$done_jobs" -ge "$total" ] && break
  sleep 0.2
done
finished=$(date +%s.%N)

say "HTTP intake: one signed webhook (docs/intake.md; logs: $work/intake.log)"
openssl rand -hex 32 >"$work/hmac-secrets"
UNASSIGN__INTAKE__HMAC_SECRET_FILE="$work/hmac-secrets" \
  "$BIN" intake --config config/local.toml 2>"$work/intake.log" &
pids+=($!)
wait_http "http://127.0.0.1:19465/readyz" "the intake"
# What an HR system sends: the raw body, signed as "<t>.<body>" with HMAC-SHA256.
body="{\"request_id\":\"demo-webhook\",\"device_id\":\"${devices[0]}\",\"requested_by\":\"hr-webhook\",\"reason\":\"offboarding\"}"
t=$(date +%s)
sig=$(printf '%s.%s' "$t" "$body" | openssl dgst -sha256 -hmac "$(head -n1 "$work/hmac-secrets")" | sed 's/^.* //')
echo "curl -X POST http://127.0.0.1:18081/v1/requests -H 'X-Unassign-Signature: t=$t,v1=${sig:0:12}…' -d '$body'"
curl -sS --fail-with-body http://127.0.0.1:18081/v1/requests \
  -H 'Content-Type: application/json' -H "X-Unassign-Signature: t=$t,v1=$sig" --data-binary "$body"
echo
total=$((total + 1))
for _ in $(seq 1 300); do
  done_jobs=$(curl -fs "$METRICS/metrics" | awk '/^unassign_jobs_total/ {s += $2} END {print s + 0}')
  [ "$done_jobs" -ge "$total" ] && break
  sleep 0.2
done
echo "the worker on demo-webhook:"
grep 'demo-webhook' "$work/worker.log" | sed 's/^/  /'
echo "  (a job ends only once its outcome event, autopilot.unassign.succeeded for demo-webhook, is"
echo "   confirmed on demo.autopilot.unassign.events; the summary below counts it)"

curl -fs "$METRICS/metrics" >"$work/metrics.txt"
curl -fs "http://$SIM/_sim/stats" >"$work/stats.json"
kill -TERM "$worker"; wait "$worker" || true
python3 - "$work" "$started" "$finished" "$total" <<'PY'
import json, re, sys
work, started, finished, total = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
stats = json.load(open(f"{work}/stats.json"))
# (name, {label: value}) -> value; series of every tenant are summed by get().
series = []
for line in open(f"{work}/metrics.txt"):
    m = re.match(r'^(unassign_\w+?)(?:\{(.*)\})? ([0-9.e+-]+)$', line.strip())
    if m:
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m[2] or ""))
        series.append((m[1], labels, float(m[3])))
def get(name, label=None, value=None):
    return int(sum(v for n, l, v in series if n == name and (label is None or l.get(label) == value)))
print()
print(f"  jobs enqueued           {total}")
print(f"  succeeded               {get('unassign_jobs_total', 'outcome', 'succeeded')}")
print(f"  failed, dead-lettered   {get('unassign_jobs_total', 'outcome', 'failed')}")
kinds = sorted({l["kind"] for n, l, v in series if n == "unassign_dead_letters_total" and v})
for kind in kinds:
    print(f"    {kind:<21} {get('unassign_dead_letters_total', 'kind', kind)}")
for reason in ["throttled", "server_error", "network"]:
    print(f"  retries, {reason:<14} {get('unassign_retries_total', 'reason', reason)}")
print(f"  wall time               {finished - started:.1f} s (CSV enqueue to its last outcome)")
print(f"  Graph action calls      {stats['action_calls']}")
for status, n in sorted(stats["responses_by_status"].items()):
    print(f"    HTTP {status:<19} {n}")
print(f"  calls before Retry-After {stats['early_calls']}  (must be 0)")
print(f"  token requests          {stats['token_requests']}")
print(f"  unexpected requests     {len(stats['unexpected_requests'])}")
print()
print("  The unknown device ends as device_not_found in demo.autopilot.unassign.dead;")
print("  every outcome event (the webhook's, demo-webhook, too) is in demo.autopilot.unassign.outcomes.")
PY
