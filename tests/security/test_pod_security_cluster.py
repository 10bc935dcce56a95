"""Every pod the product runs is admitted under the `restricted` Pod Security Standard that its namespace enforces,
checked by the real API server's PodSecurity admission (server-side dry run of each pod template as a Pod)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from devkit.cluster import Cluster
from devkit.paths import DEPLOY, SAMPLE_FINETUNE
from finetune_operator.manifests import build_cronjob
from finetune_operator.settings import Settings
from finetune_operator.spec import FineTuneSpec

pytestmark = pytest.mark.cluster

ENFORCE = "pod-security.kubernetes.io/enforce"
WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job")
VLLM = DEPLOY / "vllm"


def namespace_manifest() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "namespace" / "namespace.yaml").read_text(encoding="utf-8"))


def rendered(cluster: Cluster, folder: Path) -> Iterator[dict[str, Any]]:
    """The folder's objects: a kustomization built, else (a Component such as deploy/vllm) its complete workloads."""
    if yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))["kind"] == "Kustomization":
        yield from (doc for doc in yaml.safe_load_all(cluster.kubectl("kustomize", str(folder)).stdout) if doc)
        return
    for path in sorted(folder.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            containers = (((doc or {}).get("spec") or {}).get("template") or {}).get("spec", {}).get("containers")
            if containers and all("image" in c for c in containers):  # not a patch
                yield doc


def pod_templates(cluster: Cluster) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every workload in deploy/, deploy/embedded and deploy/vllm, and the trainer's."""
    for folder in (DEPLOY, DEPLOY / "embedded", VLLM):
        for doc in rendered(cluster, folder):
            if doc.get("kind") in WORKLOADS:
                yield f"{folder.relative_to(DEPLOY.parent)} {doc['kind']}/{doc['metadata']['name']}", pod_of(doc)
    sample = yaml.safe_load(SAMPLE_FINETUNE.read_text(encoding="utf-8"))
    cronjob = build_cronjob(name=sample["metadata"]["name"], namespace="x",
                            spec=FineTuneSpec.from_dict(sample["spec"]), serving_version=None, settings=Settings())
    yield "operator's trainer CronJob", cronjob["spec"]["jobTemplate"]["spec"]["template"]


def pod_of(workload: dict[str, Any]) -> dict[str, Any]:
    """The workload's pod template as its controller creates pods: a StatefulSet adds its claim templates' volumes."""
    template = json.loads(json.dumps(workload["spec"]["template"]))
    name = workload["metadata"]["name"]
    for claim in workload["spec"].get("volumeClaimTemplates") or ():
        volume = claim["metadata"]["name"]
        template["spec"].setdefault("volumes", []).append(
            {"name": volume, "persistentVolumeClaim": {"claimName": f"{volume}-{name}-0"}})
    return template


def admit(cluster: Cluster, namespace: str, template: dict[str, Any]) -> str:
    """'' when the API server would create the template as a Pod, else its refusal."""
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": f"psa-{uuid.uuid4().hex[:8]}", "labels": template.get("metadata", {}).get("labels")},
           "spec": template["spec"]}
    result = cluster.kubectl("-n", namespace, "create", "--dry-run=server", "-f", "-", input=json.dumps(pod),
                             check=False)
    return "" if result.returncode == 0 else result.stderr.strip()


@pytest.fixture
def restricted_namespace(cluster: Cluster) -> Iterator[str]:
    """A namespace with deploy/'s namespace labels (so: its Pod Security level) and the ServiceAccounts pods name."""
    name = f"psa-{uuid.uuid4().hex[:8]}"
    labels = namespace_manifest()["metadata"]["labels"]
    cluster.create_namespace(name)
    cluster.kubectl("label", "namespace", name, *(f"{key}={value}" for key, value in labels.items()))
    cluster.kubectl("-n", name, "create", "serviceaccount", "finetune-operator")
    try:
        yield name
    finally:
        cluster.delete_namespace(name)


def test_the_namespace_enforces_restricted() -> None:
    assert namespace_manifest()["metadata"]["labels"][ENFORCE] == "restricted"


def test_every_pod_of_the_product_is_admitted_as_restricted(cluster: Cluster, restricted_namespace: str) -> None:
    templates = {where: t for where, t in pod_templates(cluster) if not where.startswith("deploy/vllm")}
    assert {"deploy StatefulSet/postgres", "deploy Deployment/chat", "deploy Deployment/finetune-operator",
            "deploy/embedded Deployment/chat", "operator's trainer CronJob"} <= set(templates)
    refused = {where: admit(cluster, restricted_namespace, template) for where, template in templates.items()}
    assert {where: why for where, why in refused.items() if why} == {}


def test_the_vllm_engine_pod_is_admitted_as_restricted(cluster: Cluster, restricted_namespace: str) -> None:
    templates = {where: t for where, t in pod_templates(cluster) if where.startswith("deploy/vllm")}
    assert templates
    refused = {where: admit(cluster, restricted_namespace, template) for where, template in templates.items()}
    assert {where: why for where, why in refused.items() if why} == {}


def test_a_pod_without_the_restrictions_is_refused(cluster: Cluster, restricted_namespace: str) -> None:
    """The check above can fail: the same dry run refuses a plain pod."""
    plain = {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}
    assert "violates PodSecurity" in admit(cluster, restricted_namespace, plain)
