#!/usr/bin/env bash
# Prints deploy/prometheus/alerts.yaml with your runbook base URL and scrape job, for a Prometheus
# that loads rule files (the Prometheus operator's route is the kustomize component, which takes the
# same two values from deploy/overlays/monitoring/monitoring-settings.yaml):
#   RUNBOOK_BASE_URL=https://git.example.com/ops/unassign-worker/-/blob/main/README.md \
#   ALERT_JOB=unassign-worker scripts/render-alerts.sh > /etc/prometheus/rules/unassign-worker.yaml
# RUNBOOK_BASE_URL: absolute http(s), no `#` (each alert appends `#` and its name in lower case).
# ALERT_JOB: the scrape job's name (default: unassign-worker).
set -euo pipefail
cd "$(dirname "$0")/.."

# The placeholders deploy/prometheus/alerts.yaml ships with (tests/it/observability/ checks them).
DEFAULT_BASE='https://runbook.invalid/unassign-worker'
DEFAULT_JOB='unassign-worker'

base=${RUNBOOK_BASE_URL:?set RUNBOOK_BASE_URL to the runbook page (absolute http(s) URL, no #)}
job=${ALERT_JOB:-$DEFAULT_JOB}
if ! [[ $base =~ ^https?://[^[:space:]\"#]+$ ]]; then
  echo "RUNBOOK_BASE_URL must be an absolute http(s) URL without spaces, quotes or '#': $base" >&2
  exit 2
fi
# Label values may hold anything, but a quote or backslash would break the PromQL string.
if ! [[ $job =~ ^[A-Za-z0-9_.:/-]+$ ]]; then
  echo "ALERT_JOB may hold letters, digits and _ . : / - only: $job" >&2
  exit 2
fi
# Escape what sed's replacement text treats specially (& and the | delimiter, and backslash).
escape() { printf '%s' "$1" | sed -e 's/[\\&|]/\\&/g'; }
sed -e "s|runbook_url: \"$DEFAULT_BASE#|runbook_url: \"$(escape "$base")#|" \
    -e "s|job=\"$DEFAULT_JOB\"|job=\"$(escape "$job")\"|g" \
    deploy/prometheus/alerts.yaml
