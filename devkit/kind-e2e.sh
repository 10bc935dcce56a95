#!/usr/bin/env bash
# `make kind-e2e`: the loop as real pods on a kind cluster, for machines with Docker. The flow itself is devkit.flow,
# the same one `make demo` runs on the local real node (docs/local-cluster.md): deploy/embedded, the embedded model
# onto its volume by a loader pod, sample conversations through the chat API, a run now, the promotion, replies.
#
# Needs: docker, kind, kubectl, and the images from `make images`. The trainer runs on the CPU (gpus: 0).
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${KIND_CLUSTER:-llmmultichat}
# The tag `kubectl apply -k deploy/` deploys: the images: block of deploy/kustomization.yaml (the one source).
TAG=$(sed -n 's/^ *newTag: *//p' deploy/kustomization.yaml | head -n 1)
if [[ -n ${IMAGE_TAG:-} && $IMAGE_TAG != "$TAG" ]]; then
  echo "deploy/ runs tag $TAG, not IMAGE_TAG=$IMAGE_TAG: set it there (kustomize edit set image) or drop IMAGE_TAG" >&2
  exit 2
fi
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind-e2e needs $tool on PATH" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "kind-e2e needs a running Docker engine" >&2; exit 2; }

printf '\n==> kind cluster %s, the images loaded\n' "$CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
for image in trainer chat operator; do
  kind load docker-image --name "$CLUSTER" "llmmultichat/$image:$TAG"
done

exec .venv/bin/python -m devkit.flow --context "kind-$CLUSTER"
