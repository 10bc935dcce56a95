"""Chat traffic during a promotion and a rollback, counted: the chat Deployment of deploy/ (2 replicas, RollingUpdate
maxUnavailable 0, /readyz readiness, preStop, graceful shutdown) drops no request and answers without a long gap; the
embedded setup of deploy/embedded (1 replica, Recreate) is down while its pod restarts, and the count shows it.

The simulated path (devkit.rollsim): the real API server and controllers roll the Deployment; each chat pod runs as a
local `python -m chat_service` process from its pod spec, which decides the pod's readiness; users' requests go to the
Service's ready endpoints. The roll is started as the operator starts it: a server-side apply of its mount for the
character (finetune_operator.manifests.mount_apply_config, with the resource's field manager). The history is one
SQLite file that the local processes share (deploy/ has PostgreSQL there; the store is not what a roll exercises).
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from devkit.cluster import Cluster
from devkit.harness import NEVER_READY_ANNOTATION, make_adapter, wait_until
from devkit.model import ensure_embedded_model
from devkit.paths import DEPLOY
from devkit.podrunner import pvc_local_path
from devkit.rollsim import ChatNode, Traffic, Window
from finetune_operator.manifests import deployment_field_manager, mount_apply_config
from finetune_operator.spec import FineTuneSpec

pytestmark = pytest.mark.cluster

V1, V2 = "20261001T030000Z", "20261101T030000Z"
KEPT = {("Deployment", "chat"), ("Service", "chat"), ("PersistentVolumeClaim", "llmmultichat-adapters"),
        ("PersistentVolumeClaim", "llmmultichat-base-model"), ("PersistentVolumeClaim", "chat-history"),
        ("Secret", "chat-history-token")}
SPEC = FineTuneSpec.from_dict({"character": "lumina", "data": {"historyURL": "http://chat:8000",
                                                                "tokenSecretRef": {"name": "chat-history-token"}},
                               "adapterStorage": {"claimName": "llmmultichat-adapters"},
                               "target": {"deployment": "chat"}})
CHAT = {"character": "lumina", "message": "hello there", "max_tokens": 8}


def chat_objects(cluster: Cluster, folder: Path) -> list[dict[str, Any]]:
    """The chat service's objects as `folder` renders them; the pod template made to wait for the local readiness."""
    objects = [doc for doc in yaml.safe_load_all(cluster.kubectl("kustomize", str(folder)).stdout)
               if doc and (doc["kind"], doc["metadata"]["name"]) in KEPT]
    for obj in objects:
        obj["metadata"].pop("namespace", None)
        if obj["kind"] == "Deployment":
            obj["spec"]["template"]["metadata"].setdefault("annotations", {})[NEVER_READY_ANNOTATION] = "true"
    return objects


def mount(cluster: Cluster, namespace: str, version: str) -> None:
    """What the operator applies to promote (or roll back to) `version`."""
    config = mount_apply_config(namespace=namespace, spec=SPEC, version=version)
    cluster.kubectl("-n", namespace, "apply", "--server-side", "--force-conflicts",
                    f"--field-manager={deployment_field_manager(namespace, 'lumina')}", "-f", "-",
                    input=json.dumps(config))


def rolled(cluster: Cluster, namespace: str, node: ChatNode, version: str) -> bool:
    """Every replica is the new template's, ready and serving `version`; every old process has ended."""
    deployment = cluster.get_json("deployment", "chat", "-n", namespace)
    status, replicas = deployment["status"], deployment["spec"]["replicas"]
    done = (status.get("observedGeneration") == deployment["metadata"]["generation"]
            and status.get("updatedReplicas") == status.get("readyReplicas") == status.get("replicas") == replicas)
    if not done or len(node.pods) != replicas or not node.all_stopped():
        return False
    return all(serving(pod.url) == version for pod in node.pods.values())


def serving(url: str) -> str | None:
    try:
        characters = httpx.get(f"{url}/v1/characters", timeout=5).json()["characters"]
    except (httpx.HTTPError, ValueError):
        return None
    return next(c["adapter_version"] for c in characters if c["name"] == "lumina")


@pytest.fixture
def namespace(cluster: Cluster, tmp_path: Path) -> Iterator[str]:
    name = f"roll-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(name)
    try:
        yield name
    finally:
        cluster.delete_namespace(name)


def place_model_and_adapters(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    base = ensure_embedded_model(progress=False)
    shutil.copytree(base, pvc_local_path(cluster, namespace, "llmmultichat-base-model") / "tinychat")
    adapters = pvc_local_path(cluster, namespace, "llmmultichat-adapters") / "lora_lumina"
    for seed, version in enumerate((V1, V2), start=1):
        built = make_adapter(base, tmp_path / version, "lumina", version, untrained=True, seed=seed,
                             base_name="/base-model/tinychat")
        shutil.copytree(built, adapters / version)


def roll_under_traffic(
    cluster: Cluster, namespace: str, folder: Path, tmp_path: Path, *, rollback: bool = True
) -> dict[str, Window]:
    """V1 serving; then a promotion to V2 and (unless not `rollback`) a rollback to V1, all under continuous traffic."""
    objects = chat_objects(cluster, folder)
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chat-postgres"},
              "stringData": {"database-url": f"sqlite:///{tmp_path / 'shared-history.db'}"}}
    # Server-side, as the docs say to apply deploy/ (a client-side apply would hand its fields to the next
    # server-side applier, here the operator's field manager, which would then remove them).
    cluster.kubectl("-n", namespace, "apply", "--server-side", "--field-manager=deploy", "-f", "-",
                    input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [*objects, secret]}))
    place_model_and_adapters(cluster, namespace, tmp_path)
    mount(cluster, namespace, V1)
    env = {"HF_HUB_OFFLINE": "1", "CHAT_DEVICE": "cpu", "CHAT_TORCH_THREADS": "1", "CHAT_LOG_LEVEL": "warning"}
    windows = {}
    with ChatNode(cluster, namespace, "app.kubernetes.io/name=chat", "chat", env) as node:
        wait_until("V1 serving", lambda: rolled(cluster, namespace, node, V1), timeout=300)
        with Traffic(node, CHAT) as traffic:
            start = time.monotonic()
            time.sleep(15)
            windows["steady"] = Window.of(traffic.requests, start, time.monotonic())
            for name, version in (("promotion", V2), ("rollback", V1))[: 2 if rollback else 1]:
                start = time.monotonic()
                mount(cluster, namespace, version)
                wait_until(f"{name} to {version}", lambda v=version: rolled(cluster, namespace, node, v),
                           timeout=600)
                windows[name] = Window.of(traffic.requests, start, time.monotonic())
        assert node.errors == []
    for name, window in windows.items():
        print(window.row(f"{folder.relative_to(DEPLOY.parent)} {name}"), window.failures)
    return windows


def test_rolling_update_drops_no_request(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    windows = roll_under_traffic(cluster, namespace, DEPLOY, tmp_path)
    steady = windows["steady"]
    assert steady.requests > 10 and steady.failed == 0
    for name in ("promotion", "rollback"):
        window = windows[name]
        assert window.requests > 20, name
        assert window.failed == 0, (name, window)
        # No pause in the answers longer than a slow answer: new pods load beside the old ones, which keep serving.
        assert window.longest_gap < max(5.0, 4 * steady.longest_gap), (name, window, steady)


def test_recreate_is_down_while_its_pod_restarts(cluster: Cluster, namespace: str, tmp_path: Path) -> None:
    # One roll shows it (a rollback is the same Recreate); the rolling case above does both.
    window = roll_under_traffic(cluster, namespace, DEPLOY / "embedded", tmp_path, rollback=False)["promotion"]
    # The old pod stops before the new one exists, and the new one answers only once its model has loaded.
    assert window.failed > 0 and "no ready endpoint" in window.failures, window
    assert window.longest_gap > 10.0, window
