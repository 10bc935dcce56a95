#!/usr/bin/env bash
# `make kind-e2e`: the demo's flow on a real kind cluster with real containers, for machines with Docker.
# It cannot run where there is no Docker engine (CI here); `make test` runs the same flow on a local control plane.
#
# Needs: docker, kind, kubectl, and the images from `make images`. The base model is the embedded one, copied onto
# the model volume by a helper pod; the trainer runs on the CPU unless the kind node exposes GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${KIND_CLUSTER:-llmmultichat}
# The tag `kubectl apply -k deploy/` deploys: the images: block of deploy/kustomization.yaml (the one source).
TAG=$(sed -n 's/^ *newTag: *//p' deploy/kustomization.yaml | head -n 1)
if [[ -n ${IMAGE_TAG:-} && $IMAGE_TAG != "$TAG" ]]; then
  echo "deploy/ runs tag $TAG, not IMAGE_TAG=$IMAGE_TAG: set it there (kustomize edit set image) or drop IMAGE_TAG" >&2
  exit 2
fi
NS=llmmultichat
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "kind-e2e needs $tool on PATH" >&2; exit 2; }
done
docker info >/dev/null 2>&1 || { echo "kind-e2e needs a running Docker engine" >&2; exit 2; }

step() { printf '\n==> %s\n' "$*"; }

step "kind cluster $CLUSTER"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
for image in trainer chat operator; do
  kind load docker-image --name "$CLUSTER" "llmmultichat/$image:$TAG"
done

step "CRD, RBAC, operator, chat (deploy/)"
kubectl apply --server-side -k deploy/
kubectl -n "$NS" create secret generic chat-history-token --from-literal=token="$(openssl rand -hex 24)" \
  --dry-run=client -o yaml | kubectl apply --server-side --force-conflicts -f -

step "Embedded model onto the model volume"
model=$(.venv/bin/python -m devkit.model)
kubectl -n "$NS" run model-loader --image="llmmultichat/trainer:$TAG" --restart=Never \
  --overrides='{"spec":{"securityContext":{"runAsUser":10001,"runAsNonRoot":true,"seccompProfile":{"type":"RuntimeDefault"}},"containers":[{"name":"model-loader","image":"llmmultichat/trainer:'"$TAG"'","command":["sleep","600"],"securityContext":{"allowPrivilegeEscalation":false,"capabilities":{"drop":["ALL"]}},"volumeMounts":[{"name":"m","mountPath":"/models"}]}],"volumes":[{"name":"m","persistentVolumeClaim":{"claimName":"llmmultichat-base-model"}}]}}'
kubectl -n "$NS" wait --for=condition=Ready pod/model-loader --timeout=180s
kubectl -n "$NS" cp "$model" model-loader:/models/tinychat
kubectl -n "$NS" delete pod model-loader --wait=false
kubectl -n "$NS" rollout status deployment/chat --timeout=300s

step "Sample conversations through the chat API"
kubectl -n "$NS" port-forward service/chat 18000:8000 >/dev/null 2>&1 &
forward=$!
trap 'kill $forward 2>/dev/null || true' EXIT
sleep 3
token=$(kubectl -n "$NS" get secret chat-history-token -o jsonpath='{.data.token}' | base64 -d)
.venv/bin/python - "$token" <<'PY'
import sys
from datetime import UTC, datetime, timedelta

from devkit import conversations
from devkit.demo import import_history

now = datetime.now(UTC)
for seed, name in enumerate(("lumina", "sora"), start=1):
    history = conversations.generate_history(name, sessions=160, seed=seed, start=now - timedelta(days=25), end=now)
    print(name, import_history("http://127.0.0.1:18000", sys.argv[1], history), "messages")
PY

step "Train now"
# kind has no GPUs: the sample asks for none here.
sed -e 's/gpus: 1/gpus: 0/' deploy/samples/finetune.yaml | kubectl apply --server-side -f -
until kubectl -n "$NS" get cronjob lumina-finetune >/dev/null 2>&1; do sleep 2; done
job="lumina-now-$(date +%s)"
kubectl -n "$NS" create job --from=cronjob/lumina-finetune "$job"
kubectl -n "$NS" wait --for=condition=Complete "job/$job" --timeout=3600s

step "Promotion and rollout"
kubectl -n "$NS" wait --for=jsonpath='{.status.phase}'=Ready cft/lumina --timeout=900s
kubectl -n "$NS" get cft
kubectl -n "$NS" describe cft lumina | tail -20
