"""deploy/operator renders with kustomize and is accepted by the real API server (server-side dry run)."""

from __future__ import annotations

import json

import pytest
import yaml
from devkit.cluster import Cluster
from devkit.paths import DEPLOY as _DEPLOY_ROOT

pytestmark = pytest.mark.cluster
DEPLOY = _DEPLOY_ROOT / "operator"


def test_operator_manifests_are_valid(cluster: Cluster) -> None:
    rendered = cluster.kubectl("kustomize", str(DEPLOY)).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "CustomResourceDefinition",
                     "Deployment", "ServiceAccount"]
    namespace = "op-deploy-check"
    cluster.create_namespace(namespace)
    try:
        result = cluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", "-",
                                 input=rendered, check=False)
        assert result.returncode == 0, result.stderr
    finally:
        cluster.delete_namespace(namespace)
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert pod["serviceAccountName"] == "finetune-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": 8080, "health": 8081}
    assert json.dumps(container["args"]).find("0.0.0.0:8081/healthz") > 0
