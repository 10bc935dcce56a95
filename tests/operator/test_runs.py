"""Reading a finished Job's result and the promotion gate (no cluster)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from finetune_operator.runs import (
    TrainerResult,
    gate,
    job_finished_at,
    job_is_active,
    job_state,
    parse_result,
    pick_pod,
    recorded,
    run_record,
    terminated,
)

TRAINED = {
    "outcome": "trained", "character": "lumina", "version": "20261126T030000Z",
    "path": "lora_lumina/20261126T030000Z", "serving_version": "20261026T030000Z",
    "examples": {"pairs": 900, "train": 810, "eval": 90},
    "metrics": {"eval_loss_base": 3.1, "eval_loss_serving": 2.6, "eval_loss_adapter": 2.2, "train_loss": 2.0,
                "tokens_per_second": 5400.0, "duration_seconds": 95.2},
    "reason": None, "trainer_version": "0.1.0",
}


def job(conditions: list[dict[str, str]] | None = None, active: int = 0) -> dict[str, Any]:
    return {"metadata": {"name": "lumina-now", "uid": "u-1", "namespace": "chat"},
            "status": {"conditions": conditions or [], "active": active, "startTime": "2026-11-26T03:00:00Z",
                       "completionTime": "2026-11-26T03:05:00Z"}}


def pod(name: str, phase: str, exit_code: int, message: str | None, finished: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": phase, "containerStatuses": [
        {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "message": message,
                                                     "finishedAt": finished}}}]}}


def test_job_state() -> None:
    assert job_state(job([{"type": "Complete", "status": "True"}])) == "Complete"
    assert job_state(job([{"type": "Failed", "status": "True"}])) == "Failed"
    # Interim conditions (SuccessCriteriaMet, FailureTarget) are not terminal yet.
    assert job_state(job([{"type": "FailureTarget", "status": "True"}])) is None
    assert job_state(job([{"type": "Complete", "status": "False"}])) is None
    assert job_is_active(job(active=1)) and not job_is_active(job())


def test_pick_pod_prefers_the_right_one() -> None:
    ok = pod("a", "Succeeded", 0, "{}", "2026-11-26T03:04:00Z")
    failed1 = pod("b", "Failed", 1, "x", "2026-11-26T03:01:00Z")
    failed2 = pod("c", "Failed", 1, "y", "2026-11-26T03:02:00Z")
    assert pick_pod([failed1, ok, failed2], "Complete") is ok
    assert pick_pod([failed1, ok, failed2], "Failed") is failed2
    assert pick_pod([], "Complete") is None
    assert terminated(failed2) == (1, "y")
    assert terminated({"status": {"containerStatuses": [{"name": "other"}]}}) == (None, None)


def test_parse_trained() -> None:
    result = parse_result(json.dumps(TRAINED), 0, "Complete")
    assert result.outcome == "trained" and result.version == "20261126T030000Z"
    assert result.metrics["eval_loss_adapter"] == 2.2 and result.metrics["eval_loss_serving"] == 2.6
    assert result.examples == {"pairs": 900, "train": 810, "eval": 90}
    assert result.trainer_version == "0.1.0" and result.exit_code == 0


def test_parse_skipped() -> None:
    msg = json.dumps({"outcome": "skipped", "character": "lumina", "reason": "too little data: 42 < 100 examples",
                      "examples": {"pairs": 42}, "metrics": {}})
    result = parse_result(msg, 0, "Complete")
    assert result.outcome == "skipped" and result.reason == "too little data: 42 < 100 examples"
    assert result.version is None


def test_parse_failed_result() -> None:
    msg = json.dumps({"outcome": "failed", "reason": "CUDA out of memory"})
    result = parse_result(msg, 1, "Failed")
    assert result.outcome == "failed" and result.reason == "CUDA out of memory" and result.exit_code == 1


def test_a_failed_job_is_failed_whatever_it_printed() -> None:
    assert parse_result(json.dumps(TRAINED), 137, "Failed").outcome == "failed"
    assert parse_result(json.dumps(TRAINED), 0, "Failed").outcome == "failed"


def test_log_tail_instead_of_json() -> None:
    result = parse_result("Traceback (most recent call last):\n  ...\nRuntimeError: boom", 1, "Failed")
    assert result.outcome == "failed" and "RuntimeError: boom" in (result.reason or "")
    assert (result.reason or "").startswith("exited with code 1: last log lines: Traceback")


def test_a_killed_trainer_is_named_by_its_signal_and_keeps_its_last_log_lines() -> None:
    tail = "\n".join(f"training step {n}" for n in range(500)) + "\ncollected 170 messages"
    result = parse_result(tail, 137, "Failed")
    reason = result.reason or ""
    assert result.outcome == "failed" and result.exit_code == 137 and len(reason) <= 1024
    assert reason.startswith("killed by SIGKILL (out of memory, eviction, node loss, or deleted past its grace "
                             "period), exit code 137: last log lines: …")
    assert reason.endswith("collected 170 messages")
    assert parse_result("", 137, "Failed").reason == (
        "killed by SIGKILL (out of memory, eviction, node loss, or deleted past its grace period), exit code 137: "
        "the trainer left no result")
    assert (parse_result("x", 143, "Failed").reason or "").startswith("killed by SIGTERM (pod deleted or its "
                                                                      "deadline passed), exit code 143: ")
    assert (parse_result("x", 255, "Failed").reason or "").startswith("exited with code 255: ")
    assert parse_result(json.dumps(TRAINED | {"reason": None}), 137, "Failed").reason == (
        "trainer killed by SIGKILL (out of memory, eviction, node loss, or deleted past its grace period), exit code "
        "137")


def test_json_as_last_line_of_a_log_tail() -> None:
    result = parse_result("some log line\n" + json.dumps(TRAINED), 0, "Complete")
    assert result.outcome == "trained"


@pytest.mark.parametrize("message", [None, "", "[]", '{"outcome": "exploded"}', '{"outcome": "trained"}'])
def test_unreadable_results_are_failed(message: str | None) -> None:
    assert parse_result(message, 0, "Complete").outcome == "failed"


def test_long_reasons_are_clipped() -> None:
    result = parse_result("x" * 10000, 1, "Failed")
    assert len(result.reason or "") <= 1024


def test_non_numeric_metrics_become_none() -> None:
    data = {**TRAINED, "metrics": {**TRAINED["metrics"], "eval_loss_serving": None, "train_loss": "nan?",
                                   "tokens_per_second": float("inf")}}
    result = parse_result(json.dumps(data), 0, "Complete")
    assert result.metrics["eval_loss_serving"] is None and result.metrics["train_loss"] is None
    assert result.metrics["tokens_per_second"] is None


def trained(adapter: float, serving: float | None, base: float = 3.0) -> TrainerResult:
    return TrainerResult(outcome="trained", version="20261126T030000Z",
                         metrics={"eval_loss_base": base, "eval_loss_serving": serving, "eval_loss_adapter": adapter})


def test_gate_auto_better_than_serving() -> None:
    decision = gate(trained(2.2, 2.6), manual=False, min_improvement=0.01, serving_version="S",
                    serving_metrics=None)
    assert decision.verdict == "promote" and decision.reference == 2.6


def test_gate_auto_worse_than_serving() -> None:
    decision = gate(trained(2.7, 2.6), manual=False, min_improvement=0.01, serving_version="S",
                    serving_metrics=None)
    assert decision.verdict == "reject" and "not better" in decision.reason


def test_gate_margin_is_relative_and_inclusive() -> None:
    # threshold = 2.0 × (1 − 0.1) = 1.8
    assert gate(trained(1.8, 2.0), manual=False, min_improvement=0.1, serving_version="S",
                serving_metrics=None).verdict == "promote"
    assert gate(trained(1.81, 2.0), manual=False, min_improvement=0.1, serving_version="S",
                serving_metrics=None).verdict == "reject"
    # minImprovement 0: equal is enough.
    assert gate(trained(2.0, 2.0), manual=False, min_improvement=0.0, serving_version="S",
                serving_metrics=None).verdict == "promote"


def test_gate_first_time_compares_with_base() -> None:
    assert gate(trained(2.9, None, base=3.0), manual=False, min_improvement=0.01, serving_version=None,
                serving_metrics=None).verdict == "promote"
    decision = gate(trained(2.99, None, base=3.0), manual=False, min_improvement=0.01, serving_version=None,
                    serving_metrics=None)
    assert decision.verdict == "reject" and decision.reference == 3.0 and "base" in decision.reason


def test_gate_falls_back_to_recorded_serving_loss() -> None:
    # Something serves but the trainer did not evaluate it: use the loss it was promoted with, not base.
    decision = gate(trained(2.5, None, base=3.0), manual=False, min_improvement=0.01, serving_version="S",
                    serving_metrics={"evalLossAdapter": 2.4})
    assert decision.verdict == "reject" and decision.reference == 2.4


def test_gate_manual_waits() -> None:
    decision = gate(trained(1.0, 2.6), manual=True, min_improvement=0.01, serving_version=None,
                    serving_metrics=None)
    assert decision.verdict == "await" and "llmmultichat.io/promote=20261126T030000Z" in decision.reason


@pytest.mark.parametrize("outcome", ["skipped", "failed"])
def test_gate_ignores_runs_without_an_adapter(outcome: str) -> None:
    result = TrainerResult(outcome=outcome, reason="why")  # type: ignore[arg-type]
    assert gate(result, manual=False, min_improvement=0.0, serving_version=None,
                serving_metrics=None).verdict == "none"


def test_gate_without_adapter_loss_rejects() -> None:
    result = TrainerResult(outcome="trained", version="V", metrics={"eval_loss_base": 3.0})
    assert gate(result, manual=False, min_improvement=0.0, serving_version=None,
                serving_metrics=None).verdict == "reject"


def test_run_record_and_recorded() -> None:
    done = job([{"type": "Complete", "status": "True"}])
    result = parse_result(json.dumps(TRAINED), 0, "Complete")
    decision = gate(result, manual=False, min_improvement=0.01, serving_version="S", serving_metrics=None)
    record = run_record(done, result, decision, finished_at=job_finished_at(done, "fallback"))
    assert record["job"] == "lumina-now" and record["jobUID"] == "u-1" and record["outcome"] == "trained"
    assert record["finishedAt"] == "2026-11-26T03:05:00Z" and record["startedAt"] == "2026-11-26T03:00:00Z"
    assert record["metrics"]["evalLossAdapter"] == 2.2 and record["version"] == "20261126T030000Z"
    assert recorded({"history": [record]}, done) and recorded({"lastRun": record}, done)
    other = {"metadata": {"uid": "u-2"}}
    assert not recorded({"history": [record]}, other) and not recorded({}, done)
    # A marked Job is recorded even when the bounded history has forgotten it.
    marked = {"metadata": {"uid": "u-3", "annotations": {"finetune.llmmultichat.io/recorded": "lumina"}}}
    assert recorded({}, marked)
    worse = gate(trained(2.7, 2.6), manual=False, min_improvement=0.01, serving_version="S", serving_metrics=None)
    assert run_record(done, trained(2.7, 2.6), worse, finished_at="t")["outcome"] == "rejected"


def test_job_finished_at_falls_back_to_condition_then_now() -> None:
    failed = {"metadata": {}, "status": {"conditions": [
        {"type": "Failed", "status": "True", "lastTransitionTime": "2026-11-26T04:00:00Z"}]}}
    assert job_finished_at(failed, "now") == "2026-11-26T04:00:00Z"
    assert job_finished_at({"status": {}}, "now") == "now"


def test_engine_compatibility_is_read_and_recorded() -> None:
    gpt2 = {"vllm": {"compatible": False, "max_lora_rank": 8,
                     "reasons": ["architecture GPT2LMHeadModel: vLLM implements no LoRA for it", 7, "x" * 2000]}}
    result = parse_result(json.dumps(TRAINED | {"compatibility": gpt2}), 0, "Complete")
    verdict = result.compatibility["vllm"]
    assert verdict["compatible"] is False and verdict["maxLoraRank"] == 8
    assert verdict["reasons"][0].startswith("architecture GPT2LMHeadModel") and len(verdict["reasons"]) == 2
    assert len(verdict["reasons"][1]) == 1024  # clipped like any reason
    decision = gate(result, manual=False, min_improvement=0.01, serving_version=None, serving_metrics=None)
    record = run_record(job(), result, decision, finished_at="2026-11-26T03:05:00Z")
    assert record["compatibility"] == {"vllm": verdict}
    # An older trainer sends none, or something unreadable: nothing is claimed either way.
    assert parse_result(json.dumps(TRAINED), 0, "Complete").compatibility == {}
    odd = TRAINED | {"compatibility": {"vllm": {"compatible": "yes"}, "other": [], "tgi": {"compatible": True}}}
    assert parse_result(json.dumps(odd), 0, "Complete").compatibility == {
        "tgi": {"compatible": True, "reasons": [], "maxLoraRank": None}}
    assert "compatibility" not in run_record(job(), parse_result(json.dumps(TRAINED), 0, "Complete"), decision,
                                             finished_at="2026-11-26T03:05:00Z")


def test_an_adapter_a_vllm_target_cannot_load_is_not_promoted() -> None:
    gpt2 = {"vllm": {"compatible": False, "max_lora_rank": 8,
                     "reasons": ["architecture GPT2LMHeadModel: vLLM implements no LoRA for it"]}}
    incompatible = parse_result(json.dumps(TRAINED | {"compatibility": gpt2}), 0, "Complete")
    kwargs: dict[str, Any] = {"min_improvement": 0.01, "serving_version": None, "serving_metrics": None}
    refused = gate(incompatible, manual=False, engine="vllm", **kwargs)
    assert refused.verdict == "reject"
    assert refused.reason == ("the target serves through vllm, which cannot load this adapter: architecture "
                              "GPT2LMHeadModel: vLLM implements no LoRA for it")
    assert gate(incompatible, manual=True, engine="vllm", **kwargs).verdict == "reject"  # never a candidate
    # In-process serving loads it; a compatible adapter, or a result without a verdict, goes through the usual gate.
    assert gate(incompatible, manual=False, engine=None, **kwargs).verdict == "promote"
    compatible = parse_result(json.dumps(TRAINED | {"compatibility": {"vllm": {"compatible": True}}}), 0, "Complete")
    assert gate(compatible, manual=False, engine="vllm", **kwargs).verdict == "promote"
    assert gate(parse_result(json.dumps(TRAINED), 0, "Complete"), manual=False, engine="vllm", **kwargs).verdict \
        == "promote"
