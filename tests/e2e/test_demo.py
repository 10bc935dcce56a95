"""The demo's loop end to end on the real control plane, with its pods as local processes (`python -m devkit.demo
--simulated`): the quick check of what `make demo` shows a newcomer, asserted. `make demo` itself runs the loop as
real pods on the real node: tests/e2e/test_real_node_loop.py (`make node-e2e`).

Real parts only: kube-apiserver and controllers (kwok nodes), the operator as a process with its ServiceAccount's
RBAC, the chat service and the trainer as processes run from their pod specs, the project's own small model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from devkit import demo
from devkit.cluster import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_demo_flow_promotes_and_serves_a_better_adapter(cluster: Cluster, tmp_path: Path) -> None:
    result = demo.run_simulated(cluster, tmp_path, sessions=120)

    version = result.trainer_result["version"]
    status = result.status
    assert status["phase"] == "Ready"
    assert status["servingVersion"] == version
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Promoted"]["status"] == "True"
    assert conditions["Ready"]["status"] == "True"

    # The Deployment really mounts that version for the character, read-only.
    deployment = json.loads(
        cluster.kubectl("-n", demo.NAMESPACE, "get", "deployment", "chat", "-o", "json").stdout
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    character = result.character
    mount = mounts[f"/models/lora_{character}"]
    assert mount["subPath"] == f"lora_{character}/{version}"
    assert mount.get("readOnly") is True

    # The rolled chat pod serves it, and it is measurably better than base.
    assert result.version_after == version
    assert result.version_after != result.version_before
    metrics = result.trainer_result["metrics"]
    assert metrics["eval_loss_adapter"] < metrics["eval_loss_base"]
    assert result.style(result.replies_after) > result.style(result.replies_before)

    # The operator counted the run and the promotion.
    assert "trained" in result.operator_metrics
    printed = cluster.kubectl("-n", demo.NAMESPACE, "get", "cft").stdout
    assert version in printed
