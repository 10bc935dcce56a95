"""The NetworkPolicies in deploy/, evaluated for the pods that really run there: who can open a connection to the
chat pods' port (the history API shares it with the chat API) and to PostgreSQL.

The local control plane has no CNI that enforces NetworkPolicy, so the policies are evaluated here with the API's
rules (a pod selected by an Ingress policy accepts only what one of its rules allows; a peer's podSelector alone means
the policy's namespace; namespaceSelector {} means every namespace), against the pod labels and ports of deploy/'s
workloads and of the trainer pod the operator builds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from devkit.paths import DEPLOY, SAMPLE_FINETUNE
from finetune_operator.manifests import build_cronjob
from finetune_operator.settings import Settings
from finetune_operator.spec import FineTuneSpec

NAMESPACE = "llmmultichat"


@dataclass(frozen=True)
class Pod:
    name: str
    labels: dict[str, str]
    namespace: str = NAMESPACE
    namespace_labels: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)  # container port name → number


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if isinstance(doc, dict)]


def workload_pod(path: Path) -> Pod:
    workload = next(doc for doc in documents(path) if doc["kind"] in ("Deployment", "StatefulSet"))
    template = workload["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports") or ()}
    return Pod(workload["metadata"]["name"], dict(template["metadata"]["labels"]), ports=ports)


def trainer_pod() -> Pod:
    sample = yaml.safe_load(SAMPLE_FINETUNE.read_text(encoding="utf-8"))
    cronjob = build_cronjob(name=sample["metadata"]["name"], namespace=NAMESPACE,
                            spec=FineTuneSpec.from_dict(sample["spec"]), serving_version=None, settings=Settings())
    return Pod("trainer", dict(cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]))


def policies() -> list[dict[str, Any]]:
    found = [doc for path in sorted(DEPLOY.rglob("*.yaml")) for doc in documents(path)
             if doc.get("kind") == "NetworkPolicy"]
    for policy in found:
        policy["metadata"].setdefault("namespace", NAMESPACE)  # kustomize's `namespace:` puts them there
    return found


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or ():
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        ok = {"Exists": key in labels, "DoesNotExist": key not in labels,
              "In": labels.get(key) in values, "NotIn": labels.get(key) not in values}[operator]
        if not ok:
            return False
    return True


def peer_matches(peer: dict[str, Any], source: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return False  # the sources here are pods, by label
    namespace_labels = {"kubernetes.io/metadata.name": source.namespace, **source.namespace_labels}
    if "namespaceSelector" in peer:
        in_namespace = selects(peer["namespaceSelector"], namespace_labels)
    else:
        in_namespace = source.namespace == policy_namespace
    return in_namespace and selects(peer.get("podSelector") or {}, source.labels)


def port_matches(rule_port: dict[str, Any], port: int, target: Pod) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    wanted = rule_port.get("port")
    if wanted is None:
        return True
    number = target.ports.get(wanted) if isinstance(wanted, str) else wanted
    return number is not None and number <= port <= rule_port.get("endPort", number)


def allowed(source: Pod, target: Pod, port: int) -> bool:
    selecting = [p for p in policies() if p["metadata"]["namespace"] == target.namespace
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], target.labels)]
    if not selecting:
        return True  # not isolated
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or ():
            ports_ok = not rule.get("ports") or any(port_matches(p, port, target) for p in rule["ports"])
            peers = rule.get("from")
            peers_ok = not peers or any(peer_matches(p, source, policy["metadata"]["namespace"]) for p in peers)
            if ports_ok and peers_ok:
                return True
    return False


CHAT = workload_pod(DEPLOY / "chat" / "deployment.yaml")
POSTGRES = workload_pod(DEPLOY / "postgres" / "statefulset.yaml")
OPERATOR = workload_pod(DEPLOY / "operator" / "deployment.yaml")
TRAINER = trainer_pod()
INGRESS = Pod("ingress-controller", {"app": "ingress-nginx", "llmmultichat.io/chat-client": "true"},
              namespace="ingress-nginx")
STRANGER = Pod("some pod in the namespace", {"app": "debug"})
ELSEWHERE = Pod("a pod in another namespace", {"app.kubernetes.io/name": "chat"}, namespace="other")
FAKE_TRAINER = Pod("a trainer-labelled pod in another namespace", dict(TRAINER.labels), namespace="other")


def test_the_pods_are_what_deploy_runs() -> None:
    assert CHAT.ports == {"http": 8000} and POSTGRES.ports == {"postgres": 5432}
    assert "llmmultichat.io/finetune" in TRAINER.labels


@pytest.mark.parametrize(("source", "expected"), [
    (TRAINER, True), (CHAT, True), (OPERATOR, True), (INGRESS, True),
    (STRANGER, False), (ELSEWHERE, False), (FAKE_TRAINER, False), (POSTGRES, False),
], ids=lambda value: value.name if isinstance(value, Pod) else str(value))
def test_who_reaches_the_chat_and_history_api(source: Pod, expected: bool) -> None:
    assert allowed(source, CHAT, 8000) is expected


@pytest.mark.parametrize(("source", "expected"), [
    (CHAT, True), (TRAINER, False), (OPERATOR, False), (INGRESS, False), (STRANGER, False), (ELSEWHERE, False),
], ids=lambda value: value.name if isinstance(value, Pod) else str(value))
def test_only_the_chat_pods_reach_postgres(source: Pod, expected: bool) -> None:
    assert allowed(source, POSTGRES, 5432) is expected


def test_no_other_port_of_the_chat_pods_is_open() -> None:
    assert not allowed(TRAINER, CHAT, 8001)
    assert not allowed(CHAT, POSTGRES, 5433)


def test_the_evaluator_lets_everything_through_to_unselected_pods() -> None:
    assert allowed(STRANGER, OPERATOR, 8080)  # the operator's pods are not isolated by these policies
