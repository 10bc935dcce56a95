"""devkit.flow's pure parts, without a cluster: what it deploys (deploy/embedded rendered by the pinned kubectl's
kustomize, moved and placed) and when it gives up on a pod. The flow itself runs in tests/e2e/test_real_node_loop.py
(`make node-e2e`) and in `make demo`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from devkit import flow
from devkit.cluster import Cluster
from devkit.realnode import PLACEMENT


def rendered(tmp_path: Path, namespace: str, placement: dict[str, Any]) -> list[dict[str, Any]]:
    offline = Cluster(tmp_path / "no-kubeconfig")  # `kubectl kustomize` reads files only
    return flow.render(flow.Target(offline, namespace, placement))


# The pinned kubectl's kustomize, which `make control-plane` builds with the control plane: no cluster is started.
@pytest.mark.cluster
def test_render_moves_everything_into_the_namespace_and_places_every_deployment(tmp_path: Path) -> None:
    objects = rendered(tmp_path, "elsewhere", PLACEMENT)
    namespaced = [o for o in objects if "namespace" in o["metadata"]]
    assert namespaced and {o["metadata"]["namespace"] for o in namespaced} == {"elsewhere"}
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Namespace"] == ["elsewhere"]
    deployments = {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Deployment"}
    assert set(deployments) == {"chat", "finetune-operator"}
    for pod in deployments.values():
        assert pod["nodeSelector"] == PLACEMENT["nodeSelector"] and pod["tolerations"] == PLACEMENT["tolerations"]
    env = {e["name"]: e.get("value") for e in deployments["finetune-operator"]["containers"][0]["env"]}
    assert env["FINETUNE_NAMESPACES"] == "elsewhere"
    # A second namespace binds the operator's ClusterRole under a name of its own, to its own ServiceAccount.
    binding = next(o for o in objects if o["kind"] == "ClusterRoleBinding")
    assert binding["metadata"]["name"] == "finetune-operator-elsewhere"
    assert {s["namespace"] for s in binding["subjects"]} == {"elsewhere"}


@pytest.mark.cluster
def test_render_in_the_deployed_namespace_keeps_deploy_as_it_is_but_for_placement(tmp_path: Path) -> None:
    objects = rendered(tmp_path, flow.DEPLOYED_NS, {})
    binding = next(o for o in objects if o["kind"] == "ClusterRoleBinding")
    assert binding["metadata"]["name"] == "finetune-operator"
    chat = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "chat")
    assert "nodeSelector" not in chat["spec"]["template"]["spec"]


def pending(since: timedelta) -> dict[str, Any]:
    moment = (datetime.now(UTC) - since).isoformat().replace("+00:00", "Z")
    return {"metadata": {"name": "chat-1"}, "status": {"conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": moment,
         "message": "0/4 nodes are available: 1 Insufficient cpu"}]}}


def test_a_pod_refused_by_the_scheduler_past_the_grace_fails_with_the_schedulers_words() -> None:
    flow._fail_if_unschedulable(pending(timedelta(seconds=5)), grace=120)  # a roll's moment: no failure
    with pytest.raises(flow.FlowError, match=r"chat-1 cannot be scheduled: .*Insufficient cpu"):
        flow._fail_if_unschedulable(pending(timedelta(seconds=200)), grace=120)
