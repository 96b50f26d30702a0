#!/usr/bin/env bash
# A local RabbitMQ cluster on one machine, for fail-over tests, the chaos bench and trying it out.
# Debian's rabbitmq-server is enough: each node is a separate Erlang VM with its own node name,
# AMQP port, distribution port, data, logs and config under one state directory. The nodes share
# epmd and the invoking user's ~/.erlang.cookie; the system node (rabbit@localhost, 5672) is not
# touched. See docs/operations.md, "Scaling out".
#
#   rabbitmq-cluster.sh [options] up          start (or complete) the cluster, print its AMQP URLs
#   rabbitmq-cluster.sh [options] down        stop every node, remove the state directory
#   rabbitmq-cluster.sh [options] stop N      graceful stop of node N (1-based)
#   rabbitmq-cluster.sh [options] start N     start node N again; it rejoins the cluster
#   rabbitmq-cluster.sh [options] kill N      kill -9 of node N's Erlang VM
#   rabbitmq-cluster.sh [options] urls        the AMQP URLs, comma-separated (AMQP_URL format)
#   rabbitmq-cluster.sh [options] status      one line per node: index, name, port, up|down
#   rabbitmq-cluster.sh [options] leader Q    index of the node leading quorum queue Q (vhost /)
#   rabbitmq-cluster.sh [options] ctl N ARGS  rabbitmqctl against node N
# Options (before the subcommand; the environment variable in brackets):
#   --nodes N      number of nodes, default 3 [RMQ_CLUSTER_NODES]; `--nodes 1` is a private single node
#   --base-port P  AMQP port of node 1; node i listens on P+i-1, distribution on P+i-1+20000,
#                  default 5701 [RMQ_CLUSTER_BASE_PORT]
#   --dir D        state directory, default ${TMPDIR:-/tmp}/unassign-rmq-<base port> [RMQ_CLUSTER_DIR]
# Exit codes: 0 done, 1 failure (the message says what), 2 usage error.
set -euo pipefail

RMQ_SBIN=${RMQ_SBIN:-/usr/lib/rabbitmq/bin}
NODES=${RMQ_CLUSTER_NODES:-3}
BASE=${RMQ_CLUSTER_BASE_PORT:-5701}
DIR=${RMQ_CLUSTER_DIR:-}
BOOT_TIMEOUT=${RMQ_CLUSTER_BOOT_TIMEOUT:-120}

die() { echo "rabbitmq-cluster: $*" >&2; exit 1; }
usage() { echo "rabbitmq-cluster: $*" >&2; sed -n '7,22p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while [ $# -gt 0 ]; do
  case $1 in
    --nodes) NODES=${2:-}; shift 2 ;;
    --base-port) BASE=${2:-}; shift 2 ;;
    --dir) DIR=${2:-}; shift 2 ;;
    -h|--help) usage "help" ;;
    --*) usage "unknown option $1" ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || usage "missing subcommand"
CMD=$1; shift
[[ $NODES =~ ^[1-9]$ ]] || usage "--nodes must be 1..9, got '$NODES'"
[[ $BASE =~ ^[0-9]+$ ]] && [ "$BASE" -ge 1024 ] && [ "$BASE" -le 45000 ] \
  || usage "--base-port must be 1024..45000 (distribution ports are +20000), got '$BASE'"
DIR=${DIR:-${TMPDIR:-/tmp}/unassign-rmq-$BASE}
[ -x "$RMQ_SBIN/rabbitmq-server" ] \
  || die "$RMQ_SBIN/rabbitmq-server not found: install Debian's rabbitmq-server (apt-get install rabbitmq-server)"

# The state directory remembers the shape it was created with; a different --nodes is an error
# rather than a half-reshaped cluster.
if [ -f "$DIR/cluster.env" ]; then
  # shellcheck disable=SC1091
  . "$DIR/cluster.env"
  if [ "$CREATED_NODES" != "$NODES" ] && [ "$CMD" = up ]; then
    die "$DIR holds a $CREATED_NODES-node cluster; run 'down' first to change --nodes"
  fi
  NODES=$CREATED_NODES
fi

node_name() { echo "unassign$BASE-$1@localhost"; }
amqp_port() { echo $((BASE + $1 - 1)); }
node_dir() { echo "$DIR/node$1"; }

# Everything a node or CLI call needs, isolated from /etc/rabbitmq (whose rabbitmq-env.conf names
# the system node).
node_env() {
  local i=$1 d
  d=$(node_dir "$i")
  export RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf"
  export RABBITMQ_NODENAME; RABBITMQ_NODENAME=$(node_name "$i")
  export RABBITMQ_USE_LONGNAME=false
  export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
  export RABBITMQ_NODE_PORT; RABBITMQ_NODE_PORT=$(amqp_port "$i")
  export RABBITMQ_DIST_PORT=$((RABBITMQ_NODE_PORT + 20000))
  export RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf"
  export RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config"
  export RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins"
  export RABBITMQ_MNESIA_BASE="$d/mnesia"
  export RABBITMQ_LOG_BASE="$d/log"
  export RABBITMQ_PID_FILE="$d/beam.pid"
  export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
  export RABBITMQ_CTL_DIST_PORT_MIN=$((BASE + 30000))
  export RABBITMQ_CTL_DIST_PORT_MAX=$((BASE + 30010))
  export ERL_EPMD_ADDRESS=127.0.0.1
}

ctl() { local i=$1; shift; (node_env "$i" && "$RMQ_SBIN/rabbitmqctl" -n "$(node_name "$i")" "$@"); }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# The VM's pid, as recorded once it booted (RabbitMQ deletes its own pid file when it stops,
# before the VM has exited and released its ports), else RabbitMQ's file of a booting node.
beam_pid() {
  local f
  for f in vm.pid beam.pid; do
    f="$(node_dir "$1")/$f"
    if [ -s "$f" ]; then cat "$f"; return 0; fi
  done
  return 1
}
running() { local p; p=$(beam_pid "$1") && kill -0 "$p" 2>/dev/null; }
check_index() {
  [[ ${1:-} =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$NODES" ] \
    || usage "node index must be 1..$NODES, got '${1:-}'"
}

write_files() {
  mkdir -p "$DIR"
  : >"$DIR/rabbitmq-env.conf"
  echo "[]." >"$DIR/enabled_plugins"
  echo "CREATED_NODES=$NODES" >"$DIR/cluster.env"
  local i d
  for i in $(seq 1 "$NODES"); do
    d=$(node_dir "$i")
    mkdir -p "$d/log" "$d/mnesia"
    cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$(amqp_port "$i")
loopback_users.guest = true
disk_free_limit.absolute = 50MB
log.file.level = info
log.console = false
EOF
    echo "[]." >"$d/advanced.config"
  done
}

start_node() {
  local i=$1
  if running "$i"; then return 0; fi
  check_ports "$i"
  rm -f "$(node_dir "$i")/beam.pid" "$(node_dir "$i")/vm.pid"
  (node_env "$i" && cd "$DIR" && exec "$RMQ_SBIN/rabbitmq-server" -detached) \
    >"$(node_dir "$i")/log/detached.out" 2>&1 || die "node $i did not start; see $(node_dir "$i")/log"
}

# Waits for node i to accept AMQP work (the broker booted and, after a restart, resynced).
await_node() {
  local i=$1
  local d
  d=$(node_dir "$i")
  ctl "$i" wait --timeout "$BOOT_TIMEOUT" "$d/beam.pid" >/dev/null 2>&1 \
    || die "node $i ($(node_name "$i")) did not boot within ${BOOT_TIMEOUT}s; see $d/log"
  [ -s "$d/vm.pid" ] || cp "$d/beam.pid" "$d/vm.pid"
  ctl "$i" await_startup --timeout "$BOOT_TIMEOUT" >/dev/null 2>&1 \
    || die "node $i did not finish booting; see $(node_dir "$i")/log"
}

# Node i is in node 1's cluster: running_nodes of node 1 lists it.
clustered() {
  ctl 1 eval "lists:member('$(node_name "$1")', rabbit_nodes:all())." 2>/dev/null | grep -qx true
}

join_node() {
  local i=$1
  clustered "$i" && return 0
  ctl "$i" stop_app >/dev/null
  ctl "$i" join_cluster "$(node_name 1)" >/dev/null || die "node $i could not join $(node_name 1)"
  ctl "$i" start_app >/dev/null
}

urls() {
  local i out=
  for i in $(seq 1 "$NODES"); do out+="${out:+,}amqp://guest:guest@127.0.0.1:$(amqp_port "$i")/%2f"; done
  echo "$out"
}

# Every port the given nodes need must be free before any of them starts.
check_ports() {
  local i port p
  for i in "$@"; do
    running "$i" && continue
    port=$(amqp_port "$i")
    for p in "$port" $((port + 20000)); do
      if port_open "$p"; then die "port $p (node $i) is taken by another process; choose another --base-port"; fi
    done
  done
}

# Waits up to 30 s for node i's VM to exit.
await_exit() {
  local p
  p=$(beam_pid "$1") || return 0
  for _ in $(seq 1 300); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.1; done
  die "node $1 (pid $p) did not exit within 30 s"
}

cmd_up() {
  local i
  # shellcheck disable=SC2046
  check_ports $(seq 1 "$NODES")
  [ -f "$DIR/cluster.env" ] || write_files
  for i in $(seq 1 "$NODES"); do start_node "$i"; done
  for i in $(seq 1 "$NODES"); do await_node "$i"; done
  for i in $(seq 2 "$NODES"); do join_node "$i"; done
  urls
}

cmd_down() {
  local i p
  [ -d "$DIR" ] || return 0
  [ -f "$DIR/cluster.env" ] || die "$DIR is not a cluster state directory; not removing it"
  for i in $(seq 1 "$NODES"); do
    if p=$(beam_pid "$i") && kill -0 "$p" 2>/dev/null; then kill -9 "$p" 2>/dev/null || true; fi
  done
  for i in $(seq 1 "$NODES"); do
    if p=$(beam_pid "$i"); then
      for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    fi
  done
  rm -rf "$DIR"
}

cmd_status() {
  local i state
  for i in $(seq 1 "$NODES"); do
    state=down
    if running "$i" && port_open "$(amqp_port "$i")"; then state=up; fi
    echo "$i $(node_name "$i") $(amqp_port "$i") $state"
  done
}

# The leader of a quorum queue, as a node index. Asked of the first running node.
cmd_leader() {
  local q=${1:-} i leader
  [ -n "$q" ] || usage "leader needs a queue name"
  for i in $(seq 1 "$NODES"); do
    running "$i" || continue
    leader=$(ctl "$i" -q list_queues name leader --formatter json 2>/dev/null \
      | python3 -c 'import json,sys; q=sys.argv[1]; print(next((r.get("leader","") for r in json.load(sys.stdin) if r["name"]==q), ""))' "$q") || continue
    [ -n "$leader" ] || die "no quorum queue '$q' (or it has no leader) on the cluster"
    for j in $(seq 1 "$NODES"); do
      if [ "$(node_name "$j")" = "$leader" ]; then echo "$j"; return 0; fi
    done
    die "leader $leader is not a node of this cluster"
  done
  die "no node of the cluster is running"
}

need_state() { [ -f "$DIR/cluster.env" ] || die "no cluster in $DIR; run 'up' first"; }

case $CMD in
  up) cmd_up ;;
  down) cmd_down ;;
  urls) need_state; urls ;;
  status) need_state; cmd_status ;;
  stop)
    need_state; check_index "${1:-}"
    if running "$1"; then ctl "$1" stop >/dev/null; await_exit "$1"; fi ;;
  start) need_state; check_index "${1:-}"; start_node "$1"; await_node "$1" ;;
  kill)
    need_state; check_index "${1:-}"
    if p=$(beam_pid "$1") && kill -0 "$p" 2>/dev/null; then kill -9 "$p"; await_exit "$1"; fi ;;
  leader) need_state; cmd_leader "${1:-}" ;;
  ctl) need_state; check_index "${1:-}"; i=$1; shift; ctl "$i" "$@" ;;
  *) usage "unknown subcommand '$CMD'" ;;
esac
