#!/usr/bin/env bash
# Builds kube-proxy for the real node from the control plane's module (k8s.io/kubernetes at K8S_VERSION, the same
# replaces and dependency versions), read through kube-proxy.mod (gen-kube-proxy-mod.sh), into a cache of its own:
# the control plane's go.mod, go.sum, build script and stamp are untouched, so its builds and every clone sharing the
# cache never rebuild for this. Skips the build when the stamp matches. Prints the bin directory as the last line.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/../control-plane/versions.env"
export PATH="/usr/local/go/bin:$PATH"
bin="${LLMMULTICHAT_CACHE:-$HOME/.cache/llmmultichat}/kube-proxy-${K8S_VERSION}/bin"
stamp_value="$(cat "$here/kube-proxy.mod" "$here/kube-proxy.sum" "$here/build-kube-proxy.sh" | sha256sum | cut -d' ' -f1)"
stamp_value+=" $(go env GOVERSION)"
if [[ "$(cat "$bin/../stamp" 2>/dev/null)" == "$stamp_value" && -x "$bin/kube-proxy" ]]; then
  echo "kube-proxy ${K8S_VERSION}: current" >&2
  echo "$bin"
  exit 0
fi
minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
# The release values ../control-plane/build.sh stamps into its binaries (hack/lib/version.sh's), so
# `kube-proxy --version` and the node's kubeProxyVersion report the real release.
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
  ldflags+=" -X ${pkg}.gitTreeState=clean -X ${pkg}.buildDate=1970-01-01T00:00:00Z"
done
mkdir -p "$bin"
rm -f "$bin/../stamp"
cd "$here/../control-plane"
export GOFLAGS="-trimpath -buildvcs=false -mod=readonly -modfile=$here/kube-proxy.mod"
go mod download
start=$SECONDS
echo "building kube-proxy ${K8S_VERSION} (cold: minutes; most packages are the kubelet's, from Go's build cache)" >&2
go build -p "${GO_BUILD_JOBS:-2}" -ldflags "$ldflags" -o "$bin/kube-proxy.tmp" k8s.io/kubernetes/cmd/kube-proxy
mv "$bin/kube-proxy.tmp" "$bin/kube-proxy"
echo "$stamp_value" > "$bin/../stamp"
echo "kube-proxy ${K8S_VERSION} built in $((SECONDS - start))s into $bin" >&2
echo "$bin"
