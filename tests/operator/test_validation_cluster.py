"""Malformed CharacterFineTunes are refused by the real API server (schema + CEL), with a message naming the field.

Uses `kubectl apply --validate=strict --dry-run=server`: the full server-side path (defaulting, structural schema,
CEL, unknown-field check) without storing anything.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from devkit.cluster import Cluster
from devkit.paths import CRD, SAMPLE_FINETUNE

pytestmark = pytest.mark.cluster
NAMESPACE = "op-validation"
VALID: dict[str, Any] = {
    "apiVersion": "llmmultichat.io/v1alpha1",
    "kind": "CharacterFineTune",
    "metadata": {"name": "lumina", "namespace": NAMESPACE},
    "spec": {
        "character": "lumina",
        "data": {"historyURL": "http://chat:8000", "tokenSecretRef": {"name": "history-token"}},
        "adapterStorage": {"claimName": "adapters"},
        "target": {"deployment": "chat"},
    },
}


@pytest.fixture(scope="module")
def kube(cluster: Cluster) -> Cluster:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/characterfinetunes.llmmultichat.io", "--timeout=30s")
    cluster.create_namespace(NAMESPACE)
    return cluster


def dry_run(cluster: Cluster, obj: dict[str, Any]) -> tuple[int, str, str]:
    result = cluster.kubectl("apply", "--validate=strict", "--dry-run=server", "-o", "json", "-f", "-",
                             input=json.dumps(obj), check=False)
    return result.returncode, result.stdout, result.stderr


def mutate(path: str, value: Any) -> dict[str, Any]:
    """VALID with `path` (dotted, from the object root) set to `value`; `...` deletes it."""
    obj = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = obj
    for part in parents:
        node = node.setdefault(part, {})
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return obj


def test_a_minimal_resource_is_accepted_with_defaults(kube: Cluster) -> None:
    code, out, err = dry_run(kube, VALID)
    assert code == 0, err
    spec = json.loads(out)["spec"]
    assert spec["schedule"] == "0 3 1 * *"
    assert spec["lora"] == {"r": 8, "alpha": 16, "dropout": 0.1}
    assert spec["training"]["epochs"] == 3 and spec["training"]["batchSize"] == 4
    assert spec["data"]["windowDays"] == 30 and spec["data"]["minExamples"] == 100
    assert spec["resources"]["gpus"] == 1
    assert spec["promotion"] == {"mode": "Auto", "minImprovement": 0.01}
    assert spec["target"]["container"] == "chat"


MALFORMED = [
    ("bad cron", mutate("spec.schedule", "every day at 3"), "spec.schedule"),
    ("6-field cron", mutate("spec.schedule", "0 0 3 1 * *"), "spec.schedule"),
    ("minute out of range", mutate("spec.schedule", "60 3 1 * *"), "spec.schedule"),
    ("unknown @macro", mutate("spec.schedule", "@every 1h"), "spec.schedule"),
    ("negative r", mutate("spec.lora", {"r": -1}), "spec.lora.r"),
    ("dropout 1.5", mutate("spec.lora", {"dropout": 1.5}), "spec.lora.dropout"),
    ("dropout exactly 1", mutate("spec.lora", {"dropout": 1}), "spec.lora.dropout"),
    ("uppercase character", mutate("spec.character", "Lumina"), "spec.character"),
    ("character with underscore", mutate("spec.character", "lu_mina"), "spec.character"),
    ("missing target", mutate("spec.target", ...), "spec.target"),
    ("target without deployment", mutate("spec.target", {"container": "chat"}), "spec.target.deployment"),
    ("unknown field", mutate("spec.learningRate", 0.1), "spec.learningRate"),
    ("unknown nested field", mutate("spec.lora", {"rank": 8}), "spec.lora.rank"),
    ("epochs 0", mutate("spec.training", {"epochs": 0}), "spec.training.epochs"),
    ("learning rate 0", mutate("spec.training", {"learningRate": 0}), "spec.training.learningRate"),
    ("negative gpus", mutate("spec.resources", {"gpus": -1}), "spec.resources.gpus"),
    ("memory not a quantity", mutate("spec.resources", {"memory": "lots"}), "spec.resources.memory"),
    ("toleration operator", mutate("spec.resources", {"tolerations": [{"key": "a", "operator": "Maybe"}]}),
     "spec.resources.tolerations[0].operator"),
    ("promotion mode", mutate("spec.promotion", {"mode": "Sometimes"}), "spec.promotion.mode"),
    ("minImprovement 1", mutate("spec.promotion", {"minImprovement": 1}), "spec.promotion.minImprovement"),
    ("pinned version", mutate("spec.pinnedVersion", "latest"), "spec.pinnedVersion"),
    ("history URL scheme", mutate("spec.data", {"historyURL": "ftp://chat", "tokenSecretRef": {"name": "t"}}),
     "spec.data.historyURL"),
    ("missing token secret", mutate("spec.data", {"historyURL": "http://chat"}), "spec.data.tokenSecretRef"),
    ("maxExamples below minExamples", mutate("spec.data", {"historyURL": "http://chat", "minExamples": 100,
                                                           "maxExamples": 10, "tokenSecretRef": {"name": "t"}}),
     "spec.data"),
    ("keepVersions 0", mutate("spec.adapterStorage", {"claimName": "a", "keepVersions": 0}),
     "spec.adapterStorage.keepVersions"),
    ("time zone", mutate("spec.timeZone", "Mars Base/One"), "spec.timeZone"),
    ("name too long", mutate("metadata.name", "x" * 44), "metadata.name"),
    ("engine kind", mutate("spec.target", {"deployment": "chat", "engine": {"kind": "Ollama", "podSelector": {
        "app": "x"}}}), "spec.target.engine.kind"),
    ("engine without pods", mutate("spec.target", {"deployment": "chat", "engine": {"kind": "vLLM"}}),
     "spec.target.engine.podSelector"),
    ("engine empty selector", mutate("spec.target", {"deployment": "chat", "engine": {"kind": "vLLM",
                                                                                      "podSelector": {}}}),
     "spec.target.engine.podSelector"),
    ("engine maxLoras 1", mutate("spec.target", {"deployment": "chat", "engine": {
        "kind": "vLLM", "podSelector": {"app": "x"}, "maxLoras": 1}}), "target.engine.maxLoras must be at least 2"),
    ("engine relative path", mutate("spec.target", {"deployment": "chat", "engine": {
        "kind": "vLLM", "podSelector": {"app": "x"}, "adaptersPath": "adapters"}}),
     "target.engine.adaptersPath must be an absolute path"),
    ("engine port", mutate("spec.target", {"deployment": "chat", "engine": {
        "kind": "vLLM", "podSelector": {"app": "x"}, "port": 0}}), "spec.target.engine.port"),
]


@pytest.mark.parametrize(("case", "obj", "field"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_resources_are_refused(kube: Cluster, case: str, obj: dict[str, Any], field: str) -> None:
    code, _, err = dry_run(kube, obj)
    assert code != 0, f"{case}: accepted"
    assert field in err, f"{case}: the message does not name {field}: {err}"


def test_character_and_target_are_immutable(kube: Cluster) -> None:
    obj = mutate("metadata.name", "immutable")
    kube.kubectl("apply", "-f", "-", input=json.dumps(obj))
    try:
        for path, value, field in (("spec.character", "sora", "spec.character"),
                                   ("spec.target", {"deployment": "other"}, "spec.target")):
            changed = copy.deepcopy(obj)
            changed["spec"][path.split(".")[1]] = value
            result = kube.kubectl("apply", "-f", "-", input=json.dumps(changed), check=False)
            assert result.returncode != 0 and field in result.stderr and "immutable" in result.stderr
    finally:
        kube.kubectl("delete", "cft", "immutable", "-n", NAMESPACE, "--wait=false")


def test_the_sample_resource_is_valid(kube: Cluster) -> None:
    sample = SAMPLE_FINETUNE
    namespace = json.loads(kube.kubectl("create", "--dry-run=client", "-o", "json", "-f", str(sample)).stdout)
    kube.create_namespace(namespace["metadata"]["namespace"])
    result = kube.kubectl("apply", "--validate=strict", "--dry-run=server", "-f", str(sample), check=False)
    assert result.returncode == 0, result.stderr


def test_the_engine_target_is_defaulted_and_explained(kube: Cluster) -> None:
    obj = mutate("spec.target", {"deployment": "chat", "engine": {"kind": "vLLM", "podSelector": {"app": "vllm"}}})
    code, out, err = dry_run(kube, obj)
    assert code == 0, err
    assert json.loads(out)["spec"]["target"]["engine"] == {"kind": "vLLM", "podSelector": {"app": "vllm"},
                                                           "port": 8000, "adaptersPath": "/adapters", "maxLoras": 4}
    explained = kube.kubectl("explain", "characterfinetunes.spec.target.engine").stdout
    assert "POST /v1/load_lora_adapter" in " ".join(explained.split())
    for field in ("kind", "podSelector", "port", "adaptersPath", "maxLoras"):
        assert field in explained
