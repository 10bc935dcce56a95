#!/usr/bin/env bash
# Regenerates go.mod/go.sum from versions.env. k8s.io/kubernetes requires its staging modules at v0.0.0 and points
# them at ./staging with replace lines that do not apply to a dependent module, so we read that version's own go.mod
# and emit one replace per staging require: k8s.io/<name> => k8s.io/<name> v0.<minor>.<patch>.
set -euo pipefail
cd "$(dirname "$0")"
source ./versions.env
export PATH="/usr/local/go/bin:$PATH" GOFLAGS=-mod=mod

k8s_mod=$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
staging_version="v0.${K8S_VERSION#v1.}"

rm -f go.mod go.sum
go mod init llmmultichat.io/devkit/control-plane >/dev/null 2>&1
go mod edit -go=1.26.0
# Staging modules are the `k8s.io/<name> v0.0.0` lines of kubernetes' require blocks.
for name in $(awk '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$k8s_mod" | sort -u); do
  go mod edit -replace "${name}=${name}@${staging_version}"
done
go get -tool "k8s.io/kubernetes/cmd/kube-apiserver@${K8S_VERSION}" \
  "k8s.io/kubernetes/cmd/kube-controller-manager@${K8S_VERSION}" \
  "k8s.io/kubernetes/cmd/kube-scheduler@${K8S_VERSION}" \
  "k8s.io/kubernetes/cmd/kubectl@${K8S_VERSION}" \
  "go.etcd.io/etcd/server/v3@${ETCD_VERSION}" \
  "sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}"
go mod tidy
echo "go.mod regenerated: kubernetes ${K8S_VERSION} (staging ${staging_version}), etcd ${ETCD_VERSION}, kwok ${KWOK_VERSION}"
