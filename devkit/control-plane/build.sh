#!/usr/bin/env bash
# Builds the pinned control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kwok) from
# the Go modules in this directory into a cache outside the clone. Skips the build when the cache's stamp matches.
# Prints the bin directory as the last line of stdout.
# `build.sh kubelet` builds the kubelet of the same release instead (the real node, devkit/node/build.sh), with a
# stamp of its own: the control plane alone never waits for it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/versions.env"
export PATH="/usr/local/go/bin:$PATH"
if ! command -v go >/dev/null; then
  echo "error: the Go toolchain is needed to build the control plane (go 1.26+, or any go >= 1.21 that may fetch" \
    "go1.26 through the module proxy: GOTOOLCHAIN=auto)" >&2
  exit 1
fi
export GOFLAGS="-trimpath -buildvcs=false -mod=readonly"
cache="${LLMMULTICHAT_CACHE:-$HOME/.cache/llmmultichat}/k8s-${K8S_VERSION}"
bin="$cache/bin"
stamp_value="$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" | sha256sum | cut -d' ' -f1) $(go env GOVERSION)"
binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok)
stamp="$cache/stamp"
if [[ "${1:-}" == kubelet ]]; then
  binaries=(kubelet)
  stamp="$cache/stamp-kubelet"
elif (($#)); then
  echo "usage: $0 [kubelet]" >&2
  exit 2
fi

current=1
[[ "$(cat "$stamp" 2>/dev/null)" == "$stamp_value" ]] || current=0
for b in "${binaries[@]}"; do [[ -x "$bin/$b" ]] || current=0; done
if [[ $current == 1 ]]; then
  echo "${binaries[*]} ${K8S_VERSION}: current" >&2
  echo "$bin"
  exit 0
fi

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
# The same values hack/lib/version.sh stamps, so `--version` and the server's /version report the real release.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
  ldflags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
done
kwok_ldflags="-s -w"  # kwok carries its own version constant

declare -A packages=(
  [etcd]=go.etcd.io/etcd/server/v3
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
  [kubectl]=k8s.io/kubernetes/cmd/kubectl
  [kubelet]=k8s.io/kubernetes/cmd/kubelet
  [kwok]=sigs.k8s.io/kwok/cmd/kwok
)
mkdir -p "$bin"
rm -f "$stamp"
cd "$here"
echo "downloading Go modules (first time only) ..." >&2
go mod download
start=$SECONDS
i=0
for b in "${binaries[@]}"; do
  i=$((i + 1))
  flags="$ldflags"; [[ $b == kwok ]] && flags="$kwok_ldflags"
  echo "[$i/${#binaries[@]}] building $b from ${packages[$b]} ($((SECONDS - start))s so far; a cold build takes many minutes)" >&2
  go build -p "${GO_BUILD_JOBS:-2}" -ldflags "$flags" -o "$bin/$b.tmp" "${packages[$b]}"
  mv "$bin/$b.tmp" "$bin/$b"
done
echo "$stamp_value" > "$stamp"
echo "${binaries[*]} ${K8S_VERSION} built in $((SECONDS - start))s into $bin" >&2
echo "$bin"
