#!/usr/bin/env bash
# Builds CoreDNS (main.go: upstream coremain with the plugins the real node's Corefile uses) from this directory's
# module into a cache outside the clone. Skips the build when the stamp matches. Prints the bin directory last.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
source "$here/versions.env"
export PATH="/usr/local/go/bin:$PATH"
if ! command -v go >/dev/null; then
  echo "error: the Go toolchain is needed to build CoreDNS (go 1.26+)" >&2
  exit 1
fi
bin="${LLMMULTICHAT_CACHE:-$HOME/.cache/llmmultichat}/coredns-${COREDNS_VERSION}/bin"
stamp_value="$(cat "$here/go.mod" "$here/go.sum" "$here/build.sh" "$here/main.go" | sha256sum | cut -d' ' -f1)"
stamp_value+=" $(go env GOVERSION)"
if [[ "$(cat "$bin/../stamp" 2>/dev/null)" == "$stamp_value" && -x "$bin/coredns" ]]; then
  echo "coredns ${COREDNS_VERSION}: current" >&2
  echo "$bin"
  exit 0
fi
mkdir -p "$bin"
rm -f "$bin/../stamp"
cd "$here"
export GOFLAGS="-trimpath -buildvcs=false -mod=readonly" CGO_ENABLED=0
go mod download
start=$SECONDS
echo "building coredns ${COREDNS_VERSION} (a cold build takes minutes)" >&2
# `coredns -version` reports the release (coremain.GitCommit is what upstream's Makefile stamps besides).
go build -p "${GO_BUILD_JOBS:-2}" -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=${COREDNS_VERSION}" \
  -o "$bin/coredns.tmp" .
mv "$bin/coredns.tmp" "$bin/coredns"
echo "$stamp_value" > "$bin/../stamp"
echo "coredns ${COREDNS_VERSION} built in $((SECONDS - start))s into $bin" >&2
echo "$bin"
