"""The whole loop as real pods on the real node (devkit.realnode), from the images built here (devkit.localimages),
run by the flow `make demo` and `make kind-e2e` run (devkit.flow): the operator pod (its ServiceAccount token mounted
by the kubelet), the chat pod (probes, read-only root, adapter volume), a trainer Job pod from the operator's CronJob
with `resources.gpus: 0`, its result read from the `state.terminated.message` the kubelet wrote, and the promotion
roll replacing the chat container.

No pod runner and no kwok here, and no shortcut around Services: the operator reaches the API server as any pod
does (`https://kubernetes.default.svc` through CoreDNS, the `kubernetes` Service's cluster IP through kube-proxy), and
the trainer pod reads the history at the chat Service's DNS name (`historyURL` http://chat.<ns>.svc:8000).

Opt-in: `make node-e2e` (pytest --run-real-node, after `make node-up node-images`).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from devkit import flow, localimages
from devkit.cluster import Cluster, using_cluster
from devkit.realnode import NODE_NAME, PLACEMENT

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]

# The namespace `make demo` uses: the real node's 2 CPUs hold one chat pod and one trainer pod at a time, so the test
# starts over there rather than beside it.
NS = flow.DEPLOYED_NS


@pytest.fixture(scope="module")
def node_cluster() -> Iterator[Cluster]:
    with using_cluster(real_node=True) as cluster:
        yield cluster


def assert_runs_our_image(pod: dict[str, Any], name: str) -> None:
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


def test_the_loop_runs_as_real_pods(node_cluster: Cluster) -> None:
    target = flow.Target(node_cluster, NS, PLACEMENT)
    started = time.monotonic()
    report = flow.run(target, sessions=160)
    pods = report.pods
    for role, image in (("operator", "operator"), ("chat", "chat"), ("trainer", "trainer"), ("rolled_chat", "chat")):
        assert_runs_our_image(pods[role], f"llmmultichat/{image}")
    assert pods["trainer"]["spec"]["containers"][0]["resources"].get("limits", {}).get("nvidia.com/gpu") is None
    version = report.trainer_result["version"]
    assert report.trainer_result["outcome"] == "trained"
    # The operator's record of the run is the trainer's own result, which it read from the pod's status.
    assert report.status["lastRun"]["version"] == version == report.status["servingVersion"]
    assert "trained" in report.operator_metrics

    # The roll replaced the chat container, and the new one mounts and serves the adapter.
    old, new = pods["chat"], pods["rolled_chat"]
    assert new["status"]["containerStatuses"][0]["containerID"] != old["status"]["containerStatuses"][0]["containerID"]
    mounts = {m["mountPath"] for m in new["spec"]["containers"][0]["volumeMounts"]}
    assert f"/models/lora_{report.character}" in mounts
    assert report.version_after == version != report.version_before
    assert all(report.replies_after) and len(report.replies_after) == len(report.replies_before)

    pod = new["metadata"]["name"]
    assert target.run("exec", pod, "--", "id", "-u").stdout.strip() == "10001"
    refused = target.run("exec", pod, "--", "touch", "/probe", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    # From the host through kube-proxy: the chat Service's cluster IP answers too.
    cluster_ip = target.get("service", "chat")["spec"]["clusterIP"]
    assert httpx.get(f"http://{cluster_ip}:8000/readyz", timeout=10).status_code == 200
    secret = target.get("secret", "chat-history-token")
    assert len(base64.b64decode(secret["data"]["token"])) == 48  # the flow's random token, not the template's
    print(f"real-node loop: {time.monotonic() - started:.0f}s")
