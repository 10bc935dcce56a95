"""deploy/ is a valid kustomization that the real API server accepts as it is."""

from __future__ import annotations

import pytest
import yaml
from devkit.cluster import Cluster
from devkit.demo import REPO

pytestmark = pytest.mark.cluster


def test_deploy_kustomization_applies_server_side(cluster: Cluster) -> None:
    rendered = cluster.kubectl("kustomize", str(REPO / "deploy")).stdout
    kinds = {doc["kind"] for doc in yaml.safe_load_all(rendered) if doc}
    assert {"Namespace", "CustomResourceDefinition", "ServiceAccount", "Deployment", "Service",
            "PersistentVolumeClaim", "Secret"} <= kinds
    assert kinds & {"Role", "ClusterRole"}
    # The CRD must exist before a server-side dry run of resources that use it; apply it for real first.
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/characterfinetunes.llmmultichat.io", "--timeout=60s")
    # A dry run creates no namespace, and the namespaced objects need one.
    cluster.kubectl("apply", "--server-side", "-k", str(REPO / "deploy" / "namespace"))
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(REPO / "deploy"))
    assert "deployment.apps/chat" in out.stdout


def test_sample_resource_is_accepted(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/characterfinetunes.llmmultichat.io", "--timeout=60s")
    cluster.kubectl("apply", "--server-side", "-f", str(REPO / "deploy" / "namespace" / "namespace.yaml"))
    out = cluster.kubectl(
        "apply", "--server-side", "--dry-run=server", "--validate=strict",
        "-f", str(REPO / "deploy" / "samples" / "finetune.yaml"),
    )
    assert "characterfinetune.llmmultichat.io" in out.stdout
