"""The whole loop as real pods on the real node (devkit.realnode), from the images built here (devkit.localimages):
the operator pod (its ServiceAccount token mounted by the kubelet), the chat pod (probes, read-only root, adapter
volume), a trainer Job pod from the operator's CronJob with `resources.gpus: 0`, its result read from the
`state.terminated.message` the kubelet wrote, and the promotion roll replacing the chat container.

No pod runner and no kwok here, and no shortcut around Services: the operator reaches the API server as any pod
does (`https://kubernetes.default.svc` through CoreDNS, the `kubernetes` Service's cluster IP through kube-proxy), and
the trainer pod reads the history at the chat Service's DNS name (`historyURL` http://chat.<ns>.svc:8000). This
process, on the host, reaches the chat service at its cluster IP (kube-proxy's rules serve the host too).

Opt-in: `make node-e2e` (pytest --run-real-node, after `make node-up node-images`).
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import yaml
from devkit import conversations, localimages
from devkit.cluster import Cluster, using_cluster
from devkit.demo import import_history, sample_replies, serving_version
from devkit.model import ensure_embedded_model
from devkit.paths import DEPLOY, SAMPLE_FINETUNE
from devkit.podrunner import pvc_local_path
from devkit.realnode import NODE_NAME, NODE_SELECTOR, TOLERATION
from devkit.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]

NS = "llmmultichat-real"
# deploy/ with the chat history in SQLite, as `make demo` runs it (there is no PostgreSQL image here).
EMBEDDED = DEPLOY / "embedded"
DEPLOYED_NS = "llmmultichat"  # what deploy/kustomization.yaml says
CHARACTER = "lumina"


@pytest.fixture(scope="module")
def node_cluster() -> Iterator[Cluster]:
    with using_cluster(real_node=True) as cluster:
        yield cluster


def kube(cluster: Cluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("-n", NS, *args, "-o", "json").stdout)


def on_real_node(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """deploy/embedded as rendered by kustomize, moved to NS and onto the real node. The operator watches NS only
    (the simulated demo's operator may watch the rest)."""
    for obj in objects:
        meta = obj["metadata"]
        if obj["kind"] == "Namespace" and meta["name"] == DEPLOYED_NS:
            meta["name"] = NS
        if meta.get("namespace") == DEPLOYED_NS:
            meta["namespace"] = NS
        if obj["kind"] == "ClusterRoleBinding":
            meta["name"] += "-real"
            for subject in obj.get("subjects", []):
                if subject.get("namespace") == DEPLOYED_NS:
                    subject["namespace"] = NS
        if obj["kind"] == "Deployment":
            pod = obj["spec"]["template"]["spec"]
            pod["nodeSelector"] = NODE_SELECTOR
            pod["tolerations"] = [TOLERATION]
            if meta["name"] == "finetune-operator":
                pod["containers"][0]["env"].append({"name": "FINETUNE_NAMESPACES", "value": NS})
    return objects


def reset_namespace(cluster: Cluster) -> None:
    if cluster.kubectl("get", "namespace", NS, check=False).returncode != 0:
        return
    for name in cluster.kubectl("-n", NS, "get", "cft", "-o", "name", check=False).stdout.split():
        cluster.kubectl("-n", NS, "patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    cluster.delete_namespace(NS, wait=True)


def deploy(cluster: Cluster) -> str:
    """deploy/ on the real node, a random history token, the embedded model on the model volume; returns the token."""
    reset_namespace(cluster)
    rendered = on_real_node(list(yaml.safe_load_all(cluster.kubectl("kustomize", str(EMBEDDED)).stdout)))
    # The namespace and the volumes first: the model is on its volume before a chat pod starts (the chat service
    # loads it once, at start).
    first = [o for o in rendered if o["kind"] in ("Namespace", "PersistentVolumeClaim")]
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(first))
    model = ensure_embedded_model()
    wait_until("the model claim Bound", lambda: kube(cluster, "get", "pvc", "llmmultichat-base-model")
               ["status"].get("phase") == "Bound", timeout=60)
    shutil.copytree(model, pvc_local_path(cluster, NS, "llmmultichat-base-model") / "tinychat", dirs_exist_ok=True)
    token = secrets.token_hex(24)
    rendered = [o for o in rendered if o["kind"] != "Secret" or o["metadata"]["name"] != "chat-history-token"]
    rendered.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chat-history-token", "namespace": NS},
                     "stringData": {"token": token}})
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(rendered))
    return token


def ready_pod(cluster: Cluster, selector: str, exclude: frozenset[str] = frozenset(), timeout: float = 600) -> dict:
    """The Ready pod matching `selector` (not in `exclude`), failing early on a container that cannot start."""
    def probe() -> dict[str, Any] | None:
        for pod in kube(cluster, "get", "pods", "-l", selector)["items"]:
            if pod["metadata"]["name"] in exclude or pod["metadata"].get("deletionTimestamp"):
                continue
            for status in pod["status"].get("containerStatuses", []):
                waiting = status["state"].get("waiting", {})
                assert waiting.get("reason") not in ("ErrImageNeverPull", "ErrImagePull", "ImagePullBackOff",
                                                     "CreateContainerError", "CreateContainerConfigError"), waiting
                if status.get("restartCount", 0) >= 3:
                    previous = cluster.kubectl("-n", NS, "logs", pod["metadata"]["name"], "--previous", check=False)
                    raise AssertionError(f"{pod['metadata']['name']} restarts: {status}\n{previous.stdout[-3000:]}")
            conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
            if conditions.get("Ready") == "True":
                return pod
        return None

    return wait_until(f"a Ready pod {selector}", probe, timeout=timeout, interval=2)


def assert_runs_our_image(cluster: Cluster, pod: dict[str, Any], name: str) -> None:
    """The container runs the image built here: containerd's image for the deploy/ reference, on the real node."""
    assert pod["spec"]["nodeName"] == NODE_NAME
    status = pod["status"]["containerStatuses"][0]
    ref = localimages.reference(name)
    assert status["image"] == ref
    built = localimages.built_image_id(ref)
    held = localimages.node_image(ref)
    assert held and held[1] == built, (ref, held, built)  # containerd holds what buildah built
    # The kubelet reports the image ID (the config digest) or a repo digest (the manifest's).
    assert status["imageID"].rpartition("@")[2] in held, (status["imageID"], held)


def apply_finetune(cluster: Cluster, history_url: str) -> dict[str, Any]:
    resource = yaml.safe_load(SAMPLE_FINETUNE.read_text())
    resource["metadata"]["namespace"] = NS
    spec = resource["spec"]
    spec["data"]["historyURL"] = history_url
    spec["resources"] = {"gpus": 0, "nodeSelector": NODE_SELECTOR, "tolerations": [TOLERATION]}
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(resource))
    return resource


def train_now(cluster: Cluster, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run started now from the operator's CronJob; returns the trainer pod and its parsed termination message."""
    wait_until("the operator's CronJob", lambda: cluster.kubectl("-n", NS, "get", "cronjob", f"{name}-finetune",
                                                                  check=False).returncode == 0, timeout=120)
    job = f"{name}-now-{datetime.now(UTC):%H%M%S}"
    cluster.kubectl("-n", NS, "create", "job", f"--from=cronjob/{name}-finetune", job)

    def finished() -> dict[str, Any] | None:
        pods = kube(cluster, "get", "pods", "-l", f"job-name={job}")["items"]
        done = [p for p in pods if p["status"].get("phase") in ("Succeeded", "Failed")]
        return done[0] if done else None

    pod = wait_until(f"trainer pod of {job} finished", finished, timeout=2400, interval=5)
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert pod["status"]["phase"] == "Succeeded", (terminated, cluster.kubectl(
        "-n", NS, "logs", pod["metadata"]["name"], check=False).stdout[-4000:])
    return pod, json.loads(terminated["message"])


def test_the_loop_runs_as_real_pods(node_cluster: Cluster) -> None:
    cluster = node_cluster
    started = time.monotonic()
    token = deploy(cluster)
    operator = ready_pod(cluster, "app.kubernetes.io/name=finetune-operator", timeout=300)
    assert_runs_our_image(cluster, operator, "llmmultichat/operator")
    chat = ready_pod(cluster, "app.kubernetes.io/name=chat", timeout=900)
    assert_runs_our_image(cluster, chat, "llmmultichat/chat")
    # From the host through kube-proxy: the chat Service's cluster IP.
    url = f"http://{kube(cluster, 'get', 'service', 'chat')['spec']['clusterIP']}:8000"

    now = datetime.now(UTC)
    for seed, name in enumerate((CHARACTER, "sora"), start=1):
        history = conversations.generate_history(name, sessions=160, seed=seed, start=now - timedelta(days=25),
                                                 end=now - timedelta(minutes=1))
        assert import_history(url, token, history) > 0
    before = serving_version(url, CHARACTER)  # the base model: no adapter promoted yet
    prompts = conversations.held_out_prompts(CHARACTER)
    sample_replies(url, CHARACTER, prompts[:1])

    # The trainer pod resolves the Service's name through CoreDNS and reaches it through kube-proxy.
    resource = apply_finetune(cluster, f"http://chat.{NS}.svc:8000")
    trainer, result = train_now(cluster, resource["metadata"]["name"])
    assert_runs_our_image(cluster, trainer, "llmmultichat/trainer")
    assert trainer["spec"]["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu") is None
    assert result["outcome"] == "trained", result
    version = result["version"]

    def promoted() -> dict[str, Any] | None:
        status = kube(cluster, "get", "cft", resource["metadata"]["name"]).get("status", {})
        assert status.get("phase") not in ("Failed", "RolloutFailed"), status
        return status if status.get("phase") == "Ready" and status.get("servingVersion") == version else None

    status = wait_until(f"{version} promoted", promoted, timeout=900, interval=2)
    # The operator's record of the run is the trainer's own result, which it read from the pod's status.
    assert status["lastRun"]["version"] == version
    new_chat = ready_pod(cluster, "app.kubernetes.io/name=chat", exclude=frozenset({chat["metadata"]["name"]}),
                         timeout=900)
    old_id = chat["status"]["containerStatuses"][0]["containerID"]
    assert new_chat["status"]["containerStatuses"][0]["containerID"] != old_id
    mounts = {m["mountPath"] for m in new_chat["spec"]["containers"][0]["volumeMounts"]}
    assert f"/models/lora_{CHARACTER}" in mounts
    new_url = f"http://{new_chat['status']['podIP']}:8000"  # this pod, not whichever the Service picks mid-roll
    assert serving_version(new_url, CHARACTER) == version != before
    assert all(sample_replies(new_url, CHARACTER, prompts[:2]))

    pod = new_chat["metadata"]["name"]
    assert cluster.kubectl("-n", NS, "exec", pod, "--", "id", "-u").stdout.strip() == "10001"
    refused = cluster.kubectl("-n", NS, "exec", pod, "--", "touch", "/probe", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    history_token = base64.b64decode(kube(cluster, "get", "secret", "chat-history-token")["data"]["token"]).decode()
    assert httpx.get(f"{new_url}/readyz", timeout=10).status_code == 200 and history_token == token
    print(f"real-node loop: {time.monotonic() - started:.0f}s")
