#!/usr/bin/env bash
# Regenerates go.mod/go.sum of the node's Go module from versions.env: containerd, its runc shim and ctr. A module
# of its own because containerd requires newer k8s.io libraries than the control plane's release pins.
set -euo pipefail
cd "$(dirname "$0")"
source ./versions.env
export PATH="/usr/local/go/bin:$PATH" GOFLAGS=-mod=mod

rm -f go.mod go.sum
go mod init llmmultichat.io/devkit/node >/dev/null 2>&1
go get -tool "github.com/containerd/containerd/v2/cmd/containerd@${CONTAINERD_VERSION}" \
  "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@${CONTAINERD_VERSION}" \
  "github.com/containerd/containerd/v2/cmd/ctr@${CONTAINERD_VERSION}"
go mod tidy
echo "go.mod regenerated: containerd ${CONTAINERD_VERSION}"
