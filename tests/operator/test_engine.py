"""The hot promotion's pure steps (spec.target.engine; finetune_operator/engine.py), no cluster, no engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from finetune_operator.engine import (
    EngineRefused,
    adapter_path,
    container_port,
    loaded_versions,
    plan_engine,
    ready_addresses,
    refused,
    switched,
    to_load,
    to_unload,
)
from finetune_operator.spec import EngineSpec, FineTuneSpec
from finetune_operator.status import Observed, finalize

V1, V2, V3 = "20261001T030000Z", "20261101T030000Z", "20261201T030000Z"
NOW = "2026-11-26T03:10:00Z"
CRD = Path(__file__).resolve().parents[2] / "crds" / "characterfinetune.yaml"


def spec(pinned: str | None = None, **engine: Any) -> FineTuneSpec:
    body: dict[str, Any] = {
        "character": "lumina", "data": {"historyURL": "http://chat", "tokenSecretRef": {"name": "t"}},
        "adapterStorage": {"claimName": "adapters"},
        "target": {"deployment": "chat", "engine": {"kind": "vLLM", "podSelector": {"app": "vllm"}, **engine}},
    }
    if pinned:
        body["pinnedVersion"] = pinned
    return FineTuneSpec.from_dict(body)


def pod(name: str, ip: str | None = "10.0.0.1", *, ready: bool = True, phase: str = "Running",
        deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if deleting:
        meta["deletionTimestamp"] = NOW
    status: dict[str, Any] = {"phase": phase, "conditions": [{"type": "Ready", "status": str(ready)}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "status": status}


def test_the_engine_target_is_parsed_with_the_crd_defaults() -> None:
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    node = schema["properties"]["spec"]["properties"]["target"]["properties"]["engine"]["properties"]
    engine = spec().target.engine
    assert engine == EngineSpec(pod_selector={"app": "vllm"})
    assert (engine.port, engine.adapters_path, engine.max_loras) == (
        node["port"]["default"], node["adaptersPath"]["default"], node["maxLoras"]["default"])
    assert node["kind"]["enum"] == [engine.kind] == ["vLLM"]
    plain = FineTuneSpec.from_dict({"character": "lumina", "data": {"historyURL": "http://c", "tokenSecretRef": {
        "name": "t"}}, "adapterStorage": {"claimName": "a"}, "target": {"deployment": "chat"}})
    assert plain.target.engine is None
    assert adapter_path(spec(adaptersPath="/vol/").target.engine, "lumina", V1) == f"/vol/lora_lumina/{V1}"


def test_only_ready_running_pods_with_an_ip_are_addressed() -> None:
    pods = [pod("b"), pod("a", "fd00::1"), pod("c", ready=False), pod("d", None), pod("e", deleting=True),
            pod("f", phase="Pending")]
    assert [(p.name, p.url) for p in ready_addresses(pods, 8000)] == [("a", "http://[fd00::1]:8000"),
                                                                       ("b", "http://10.0.0.1:8000")]


def test_the_chat_port_is_the_containers_http_port() -> None:
    def deployment(*ports: dict[str, Any]) -> dict[str, Any]:
        return {"spec": {"template": {"spec": {"containers": [{"name": "side", "ports": [{"containerPort": 1}]},
                                                              {"name": "chat", "ports": list(ports)}]}}}}
    assert container_port(deployment({"name": "metrics", "containerPort": 9090},
                                     {"name": "http", "containerPort": 8080}), "chat") == 8080
    assert container_port(deployment({"containerPort": 7000}), "chat") == 7000
    assert container_port(deployment(), "chat") == 8000


def test_loads_and_unloads_touch_only_this_characters_versions() -> None:
    models = ["base", f"lumina-{V1}", f"lumina-{V2}", f"sora-{V1}", f"lumi-na-{V1}", "lumina-notaversion"]
    assert loaded_versions(models, "lumina") == [V1, V2]
    assert loaded_versions(models, "lumi") == []  # lumi-na-... is another character's name
    assert to_unload(models, "lumina", V2) == [f"lumina-{V1}"]
    assert to_unload(models, "lumina", None) == [f"lumina-{V1}", f"lumina-{V2}"]
    assert to_load(models, "lumina", V2, 8, "base") is None  # already there
    assert to_load(["base"], "lumina", None, 8, "base") is None
    assert to_load(models, "lumina", V3, 6, "base") == f"lumina-{V3}"
    with pytest.raises(EngineRefused, match=r"over target\.engine\.maxLoras 5"):
        to_load(models, "lumina", V3, 5, "base")


def test_a_new_version_is_switched_to_and_then_reported_ready() -> None:
    status = {"servingVersion": V1}
    plan = plan_engine(spec(pinned=V2), {}, status, NOW)
    assert (plan.action, plan.version) == ("apply", V2)
    assert [e.reason for e in plan.events] == ["Promoting"]
    done = switched(plan, status)
    assert done.status["servingVersion"] == V2 and done.status["previousVersion"] == V1
    assert done.status["rollout"] is None
    assert [e.reason for e in done.events] == ["Promoting", "Promoted"] and done.counters == ["promotion"]
    final = finalize(spec(pinned=V2), {}, done.status, Observed(1), NOW)
    assert final["phase"] == "Ready"
    assert plan_engine(spec(pinned=V2), {}, done.status, NOW).action == "none"  # converged: nothing new


def test_a_refused_version_is_not_retried_and_the_status_quotes_the_engine() -> None:
    status = {"servingVersion": V1}
    plan = plan_engine(spec(pinned=V2), {}, status, NOW)
    message = "engine pod vllm-0: LoRA rank 32 is greater than max_lora_rank 16."
    failed = refused(plan, status, message)
    assert failed.status["servingVersion"] == V1 and failed.status["failedVersion"] == V2
    assert failed.status["failedReason"] == message
    assert [(e.type, e.reason) for e in failed.events] == [("Warning", "RolloutFailed")]
    assert message in failed.events[0].message and f"{V1} keeps serving" in failed.events[0].message
    final = finalize(spec(pinned=V2), {}, failed.status, Observed(1), NOW)
    assert final["phase"] == "RolloutFailed"
    promoted = next(c for c in final["conditions"] if c["type"] == "Promoted")
    assert promoted["reason"] == "RolloutFailed" and message in promoted["message"]
    assert plan_engine(spec(pinned=V2), {}, failed.status, NOW).action == "none"
    again = plan_engine(spec(pinned=V3), {}, failed.status, NOW)  # another version is tried
    assert (again.action, again.version) == ("apply", V3)
    assert switched(again, failed.status).status["failedReason"] is None


def test_back_to_the_base_model_unloads() -> None:
    plan = plan_engine(spec(), {}, {"servingVersion": V1}, NOW)
    assert (plan.action, plan.version) == ("unmount", None)
    assert switched(plan, {"servingVersion": V1}).status["servingVersion"] is None


def test_a_feedback_rollback_on_an_engine_target_serves_the_previous_version_at_once() -> None:
    """Controller.check_feedback on an engine target: plan_feedback's rollback, switched in the pods, is the status
    at once (no rollout left to follow): the previous version serves, the disliked one stays regressed."""
    from finetune_operator.feedback import Thumbs, plan_feedback

    guarded = FineTuneSpec.from_dict({
        "character": "lumina", "data": {"historyURL": "http://chat", "tokenSecretRef": {"name": "t"}},
        "adapterStorage": {"claimName": "adapters"}, "promotion": {"feedbackGuard": {"minRatedReplies": 30}},
        "target": {"deployment": "chat", "engine": {"kind": "vLLM", "podSelector": {"app": "vllm"}}}})
    status = {"servingVersion": V2, "previousVersion": V1, "approvedVersion": V2,
              "history": [{"job": "j2", "version": V2}, {"job": "j1", "version": V1}]}
    plan = plan_feedback(guarded, status, {V1: Thumbs(36, 4), V2: Thumbs(16, 24)}, NOW)
    assert (plan.action, plan.version) == ("apply", V1)
    done = switched(plan, status).status
    assert done["servingVersion"] == V1 and done["rollout"] is None and done["regressedVersion"] == V2
    assert plan_engine(guarded, {}, done, NOW).action == "none"  # and it is not promoted again
