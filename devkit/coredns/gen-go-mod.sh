#!/usr/bin/env bash
# Regenerates go.mod/go.sum from versions.env: CoreDNS's module and what main.go's plugins import from it.
set -euo pipefail
cd "$(dirname "$0")"
source ./versions.env
export PATH="/usr/local/go/bin:$PATH" GOFLAGS=-mod=mod
rm -f go.mod go.sum
go mod init llmmultichat.io/devkit/coredns >/dev/null 2>&1
go mod edit -go=1.26.0
go get "github.com/coredns/coredns@${COREDNS_VERSION}"
go mod tidy
echo "go.mod regenerated: coredns ${COREDNS_VERSION}"
