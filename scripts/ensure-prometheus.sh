#!/usr/bin/env bash
# Makes sure `promtool` and `prometheus` are on PATH for tests/it/observability/: installs Debian's
# `prometheus` package if either is missing. The tests run their own Prometheus on a free loopback
# port, so the package's own service must not run: it is kept from starting during the install
# (policy-rc.d) and stopped if it started anyway, so nothing is left listening on :9090.
set -euo pipefail

if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "promtool/prometheus are missing; install Debian's 'prometheus' package (as root: scripts/ensure-prometheus.sh)." >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "Installing prometheus (Debian package) for promtool and the metrics tests…" >&2
apt-get update -qq
candidate=$(apt-cache policy prometheus | sed -n 's/^ *Candidate: *//p')
if [ -z "$candidate" ] || [ "$candidate" = "(none)" ]; then
  echo "No installable 'prometheus' package in the configured apt sources." >&2
  exit 1
fi

# Keep invoke-rc.d / deb-systemd-invoke from starting the service while the package installs.
policy=/usr/sbin/policy-rc.d
own_policy=false
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  own_policy=true
fi
cleanup() { if $own_policy; then rm -f "$policy"; fi; }
trap cleanup EXIT

# --no-install-recommends: the recommended node exporter would be one more daemon on :9100.
apt-get install -y -qq --no-install-recommends prometheus >/dev/null

# Belt and braces: if the package's service started after all, stop it (and keep it from
# starting at boot) through the package's own service scripts.
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  systemctl stop prometheus.service >/dev/null 2>&1 || true
  systemctl disable prometheus.service >/dev/null 2>&1 || true
elif [ -x /etc/init.d/prometheus ]; then
  /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi

command -v promtool >/dev/null && command -v prometheus >/dev/null
echo "$(prometheus --version 2>&1 | head -n 1)" >&2
