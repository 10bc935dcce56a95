#!/usr/bin/env bash
# Regenerates kube-proxy.mod/.sum: the control plane's go.mod and go.sum (../control-plane, the same
# k8s.io/kubernetes release, staging replaces and dependency versions) plus kube-proxy as a tool and the sums of the
# few modules only it imports (netlink, netns, knftables, ipvs). build-kube-proxy.sh builds with -modfile from it, so
# the control plane's own go.mod, go.sum and build stamp stay as they are. No `go mod tidy`: it would drop the other
# tools' requirements and could select other versions than the control plane runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../control-plane/versions.env"
export PATH="/usr/local/go/bin:$PATH" GOFLAGS=-mod=mod
cp "$here/../control-plane/go.mod" "$here/kube-proxy.mod"
cp "$here/../control-plane/go.sum" "$here/kube-proxy.sum"
cd "$here/../control-plane"
go get -modfile="$here/kube-proxy.mod" -tool "k8s.io/kubernetes/cmd/kube-proxy@${K8S_VERSION}"
echo "kube-proxy.mod regenerated: kube-proxy ${K8S_VERSION}"
