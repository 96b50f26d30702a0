#!/usr/bin/env bash
# Makes sure a RabbitMQ broker answers on 127.0.0.1:5672: starts the installed one if it is
# down, installs Debian's rabbitmq-server if it is missing. Skipped when AMQP_URL points elsewhere.
set -euo pipefail

host_port() {
  local url=${AMQP_URL:-amqp://127.0.0.1:5672}
  url=${url#*://}; url=${url#*@}; url=${url%%/*}
  case $url in *:*) echo "${url%%:*} ${url##*:}" ;; *) echo "$url 5672" ;; esac
}
read -r HOST PORT < <(host_port)

up() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

if up; then exit 0; fi
case $HOST in
  127.*|localhost) ;;
  *) echo "RabbitMQ at $HOST:$PORT does not answer; start it yourself." >&2; exit 1 ;;
esac
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "Installing rabbitmq-server (Debian package)…" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq rabbitmq-server >/dev/null
fi
# A node whose app was stopped (rabbitmqctl stop_app, e.g. by an interrupted chaos bench) only
# needs the app started again.
if rabbitmqctl -q ping >/dev/null 2>&1; then
  echo "Starting the RabbitMQ app on the running node…" >&2
  rabbitmqctl -q start_app
else
  echo "Starting RabbitMQ…" >&2
  rabbitmq-server -detached
fi
for _ in $(seq 1 120); do
  if up; then
    # The port opens a moment before the broker accepts work; wait for it to say so.
    rabbitmqctl await_startup >/dev/null 2>&1 || true
    echo "RabbitMQ is up on $HOST:$PORT." >&2
    exit 0
  fi
  sleep 1
done
echo "RabbitMQ did not come up within 120 s." >&2
exit 1
