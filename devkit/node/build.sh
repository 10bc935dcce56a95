#!/usr/bin/env bash
# Builds the local cluster's real node into a cache outside the clone: the kubelet (from the control plane's module,
# ../control-plane/build.sh kubelet), kube-proxy (the same module, build-kube-proxy.sh), CoreDNS (../coredns/build.sh),
# containerd, containerd-shim-runc-v2 and ctr (this directory's module) and the sandbox image's pause binary. Each
# skips its build when its stamp matches. Prints the bin directory (every binary, linked where built elsewhere) last.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/versions.env"
source "$here/../control-plane/versions.env"
export PATH="/usr/local/go/bin:$PATH"
if ! command -v go >/dev/null; then
  echo "error: the Go toolchain is needed to build the node (go 1.26.6+)" >&2
  exit 1
fi
cache="${LLMMULTICHAT_CACHE:-$HOME/.cache/llmmultichat}"
kubelet_bin="$(bash "$here/../control-plane/build.sh" kubelet | tail -n1)"
kube_proxy_bin="$(bash "$here/build-kube-proxy.sh" | tail -n1)"
coredns_bin="$(bash "$here/../coredns/build.sh" | tail -n1)"
bin="$cache/containerd-${CONTAINERD_VERSION}/bin"
stamp_value="$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" "$here/pause/main.go" | sha256sum | cut -d' ' -f1)"
stamp_value+=" $(go env GOVERSION)"
binaries=(containerd containerd-shim-runc-v2 ctr pause)

mkdir -p "$bin"
# One bin directory for the whole node.
ln -sfn "$kubelet_bin/kubelet" "$bin/kubelet"
ln -sfn "$kube_proxy_bin/kube-proxy" "$bin/kube-proxy"
ln -sfn "$coredns_bin/coredns" "$bin/coredns"

current=1
[[ "$(cat "$bin/../stamp" 2>/dev/null)" == "$stamp_value" ]] || current=0
for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || current=0; done
if [[ $current == 1 ]]; then
  echo "containerd ${CONTAINERD_VERSION}: current" >&2
  echo "$bin"
  exit 0
fi

declare -A packages=(
  [containerd]=github.com/containerd/containerd/v2/cmd/containerd
  [containerd-shim-runc-v2]=github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2
  [ctr]=github.com/containerd/containerd/v2/cmd/ctr
  [pause]=./pause
)
# The version containerd reports to the kubelet (`containerd://<version>` in `kubectl get nodes -o wide`).
ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=${CONTAINERD_VERSION}"
ldflags+=" -X github.com/containerd/containerd/v2/version.Revision=release"
rm -f "$bin/../stamp"
cd "$here"
export GOFLAGS="-trimpath -buildvcs=false -mod=readonly" CGO_ENABLED=0
go mod download
start=$SECONDS
for b in "${binaries[@]}"; do
  echo "building $b (${CONTAINERD_VERSION}; $((SECONDS - start))s so far)" >&2
  # No btrfs/devmapper/zfs snapshotters: overlayfs is the only one used, and those need cgo headers.
  go build -p "${GO_BUILD_JOBS:-2}" -tags "no_btrfs no_devmapper no_zfs" -ldflags "$ldflags" -o "$bin/$b.tmp" \
    "${packages[$b]}"
  mv "$bin/$b.tmp" "$bin/$b"
done
echo "$stamp_value" > "$bin/../stamp"
echo "containerd ${CONTAINERD_VERSION} built in $((SECONDS - start))s into $bin" >&2
echo "$bin"
