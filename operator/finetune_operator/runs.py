"""Pure functions about training runs: is a Job finished, which pod tells its result, what the result says,
and whether the new adapter should serve (the gate)."""

from __future__ import annotations

import json
import math
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .manifests import ANNOTATION_RECORDED, TRAINER_CONTAINER

JobState = Literal["Complete", "Failed"]
Verdict = Literal["promote", "reject", "await", "none"]

# Contract §3: trainer metric names (snake_case) → status field names (camelCase, Kubernetes conventions).
METRIC_FIELDS = {
    "eval_loss_base": "evalLossBase",
    "eval_loss_serving": "evalLossServing",
    "eval_loss_adapter": "evalLossAdapter",
    "train_loss": "trainLoss",
    "tokens_per_second": "tokensPerSecond",
    "duration_seconds": "durationSeconds",
}
MAX_REASON = 1024
# Contract §2 "Engine compatibility": how many reasons per engine the status keeps (the trainer sends at most 4).
MAX_COMPATIBILITY_REASONS = 4


@dataclass(frozen=True)
class TrainerResult:
    """The trainer's result (contract §3), normalised: anything unreadable becomes a `failed` result."""

    outcome: Literal["trained", "skipped", "failed"]
    version: str | None = None
    reason: str | None = None
    serving_version: str | None = None
    metrics: Mapping[str, float | None] = field(default_factory=dict)
    examples: Mapping[str, int] = field(default_factory=dict)
    # Per serving engine ("vllm"): {"compatible", "reasons", "maxLoraRank"}, as status shows it.
    compatibility: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    trainer_version: str | None = None
    exit_code: int | None = None


@dataclass(frozen=True)
class GateDecision:
    verdict: Verdict
    reason: str
    reference: float | None = None


def job_state(job: Mapping[str, Any]) -> JobState | None:
    """`Complete` or `Failed` once the Job has its terminal condition, else None (still running or retrying)."""
    for condition in (job.get("status") or {}).get("conditions") or ():
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return condition["type"]
    return None


def job_is_active(job: Mapping[str, Any]) -> bool:
    return job_state(job) is None and bool((job.get("status") or {}).get("active"))


def pick_pod(pods: Sequence[Mapping[str, Any]], state: JobState) -> Mapping[str, Any] | None:
    """The pod whose termination message is the run's result: the succeeded one for a complete Job, else the
    last one to terminate (with backoffLimit > 0 a failed Job has several failed pods)."""
    wanted = "Succeeded" if state == "Complete" else "Failed"
    candidates = [p for p in pods if (p.get("status") or {}).get("phase") == wanted]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (_finished_at(p) or "", p.get("metadata", {}).get("name", "")))


def terminated(pod: Mapping[str, Any]) -> tuple[int | None, str | None]:
    """(exit code, termination message) of the trainer container."""
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        if status.get("name") == TRAINER_CONTAINER:
            term = (status.get("state") or {}).get("terminated") or {}
            return term.get("exitCode"), term.get("message")
    return None, None


def _finished_at(pod: Mapping[str, Any]) -> str | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or ():
        term = (status.get("state") or {}).get("terminated") or {}
        if term.get("finishedAt"):
            return str(term["finishedAt"])
    return None


def parse_result(message: str | None, exit_code: int | None, job_state: JobState) -> TrainerResult:
    """Read the trainer's JSON result. A failed Job is `failed` whatever it printed; a non-JSON message (a crash's
    log tail, via FallbackToLogsOnError) is `failed` with that text as the reason."""
    text = (message or "").strip()
    data: Any = None
    if text:
        # The trainer prints the JSON as the last line; be lenient to a log tail that ends with it.
        for candidate in (text, text.splitlines()[-1]):
            try:
                data = json.loads(candidate)
                break
            except ValueError:
                continue
    if not isinstance(data, dict):
        prefix = f"{exit_description(exit_code)}: " if exit_code not in (None, 0) else ""
        if not text:
            return TrainerResult(outcome="failed", reason=prefix + "the trainer left no result", exit_code=exit_code)
        # A log tail says what broke at its end: keep the end (and what ended the process, in front).
        return TrainerResult(outcome="failed", reason=prefix + "last log lines: " +
                             _clip_tail(text, MAX_REASON - len(prefix) - 16), exit_code=exit_code)
    outcome = data.get("outcome")
    reason = data.get("reason")
    if job_state == "Failed" or exit_code not in (None, 0):
        outcome = "failed"
        if not reason:
            reason = f"trainer {exit_description(exit_code)}" if exit_code else "the Job failed"
    if outcome not in ("trained", "skipped", "failed"):
        return TrainerResult(outcome="failed", reason=f"unknown outcome {outcome!r} in trainer result",
                             exit_code=exit_code)
    version = data.get("version") or None
    if outcome == "trained" and not version:
        return TrainerResult(outcome="failed", reason="trainer reported 'trained' without a version",
                             exit_code=exit_code)
    metrics = data.get("metrics") or {}
    return TrainerResult(
        outcome=outcome,
        version=str(version) if version else None,
        reason=_clip(str(reason)) if reason else None,
        serving_version=data.get("serving_version") or None,
        metrics={key: _number(metrics.get(key)) for key in METRIC_FIELDS if key in metrics},
        examples={k: int(v) for k, v in (data.get("examples") or {}).items()
                  if k in ("pairs", "train", "eval") and isinstance(v, int)},
        compatibility=_compatibility(data.get("compatibility")),
        trainer_version=data.get("trainer_version") or None,
        exit_code=exit_code,
    )


def gate(
    result: TrainerResult,
    *,
    manual: bool,
    min_improvement: float,
    serving_version: str | None,
    serving_metrics: Mapping[str, Any] | None,
    engine: str | None = None,
) -> GateDecision:
    """Should the new adapter serve? Only a `trained` result can, and only if the target's serving `engine` (None:
    in-process) can load it, by the trainer's check. Auto: iff its eval loss is at most reference × (1 −
    minImprovement), the reference being the serving adapter's eval loss measured by this run (or the serving
    adapter's recorded loss, or the base model's when nothing serves). Manual: wait for a person."""
    if result.outcome != "trained":
        return GateDecision("none", result.reason or result.outcome)
    verdict = result.compatibility.get(engine or "") or {}
    if verdict.get("compatible") is False:
        return GateDecision("reject", f"the target serves through {engine}, which cannot load this adapter: "
                                      + "; ".join(verdict.get("reasons") or ["(no reason given)"]))
    if manual:
        return GateDecision("await", f"promotion is Manual: annotate llmmultichat.io/promote={result.version}")
    adapter = result.metrics.get("eval_loss_adapter")
    if adapter is None:
        return GateDecision("reject", "the result has no eval_loss_adapter")
    reference, what = _reference(result, serving_version, serving_metrics)
    if reference is None:
        return GateDecision("reject", "no reference eval loss (neither serving nor base) to compare with")
    threshold = reference * (1.0 - min_improvement)
    arithmetic = (f"eval loss {adapter:.4g} vs {what} {reference:.4g} × (1 − {min_improvement:g}) = "
                  f"{threshold:.4g}")
    if adapter <= threshold:
        return GateDecision("promote", f"better: {arithmetic}", reference)
    return GateDecision("reject", f"not better: {arithmetic}", reference)


def _reference(
    result: TrainerResult, serving_version: str | None, serving_metrics: Mapping[str, Any] | None
) -> tuple[float | None, str]:
    measured = result.metrics.get("eval_loss_serving")
    if measured is not None:
        return measured, f"serving {result.serving_version or serving_version}"
    if serving_version and serving_metrics and serving_metrics.get("evalLossAdapter") is not None:
        # The trainer could not evaluate the serving adapter; fall back to the loss it was promoted with.
        return float(serving_metrics["evalLossAdapter"]), f"serving {serving_version} (recorded)"
    return result.metrics.get("eval_loss_base"), "base"


def run_record(
    job: Mapping[str, Any], result: TrainerResult, decision: GateDecision, *, finished_at: str
) -> dict[str, Any]:
    """The status entry for one finished run (status.lastRun and status.history[])."""
    meta = job.get("metadata") or {}
    outcome = "rejected" if decision.verdict == "reject" else result.outcome
    record: dict[str, Any] = {
        "job": meta.get("name"),
        "jobUID": meta.get("uid"),
        "outcome": outcome,
        "reason": _clip(decision.reason if result.outcome == "trained" else (result.reason or outcome)),
        "finishedAt": finished_at,
    }
    started = (job.get("status") or {}).get("startTime")
    if started:
        record["startedAt"] = started
    if result.version:
        record["version"] = result.version
    if result.exit_code is not None:
        record["exitCode"] = result.exit_code
    if result.trainer_version:
        record["trainerVersion"] = result.trainer_version
    if result.examples:
        record["examples"] = dict(result.examples)
    if result.metrics:
        record["metrics"] = {METRIC_FIELDS[k]: v for k, v in result.metrics.items()}
    if result.compatibility:
        record["compatibility"] = {engine: dict(verdict) for engine, verdict in result.compatibility.items()}
    return record


def job_finished_at(job: Mapping[str, Any], fallback: str) -> str:
    status = job.get("status") or {}
    if status.get("completionTime"):
        return str(status["completionTime"])
    for condition in status.get("conditions") or ():
        if condition.get("type") in ("Complete", "Failed") and condition.get("lastTransitionTime"):
            return str(condition["lastTransitionTime"])
    return fallback


def recorded(status: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    """Was this Job already recorded? Its mark says so; the status says so for the window between writing the
    status and marking the Job (a crash there must not record it twice)."""
    meta = job.get("metadata") or {}
    if ANNOTATION_RECORDED in (meta.get("annotations") or {}):
        return True
    uid = meta.get("uid")
    last = status.get("lastRun") or {}
    return last.get("jobUID") == uid or any(r.get("jobUID") == uid for r in status.get("history") or ())


def _compatibility(value: Any) -> dict[str, dict[str, Any]]:
    """The result's `compatibility` (contract §2) in status form; an engine whose verdict is not a boolean is left
    out (an older trainer sends none: nothing is known, nothing is claimed)."""
    verdicts: dict[str, dict[str, Any]] = {}
    for engine, verdict in (value.items() if isinstance(value, dict) else ()):
        if not isinstance(verdict, dict) or not isinstance(verdict.get("compatible"), bool):
            continue
        reasons = [_clip(str(r)) for r in verdict.get("reasons") or () if isinstance(r, str)]
        rank = verdict.get("max_lora_rank")
        verdicts[str(engine)] = {"compatible": verdict["compatible"], "reasons": reasons[:MAX_COMPATIBILITY_REASONS],
                                 "maxLoraRank": rank if isinstance(rank, int) and not isinstance(rank, bool) else None}
    return verdicts


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _clip(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def _clip_tail(text: str, limit: int = MAX_REASON) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1):]


def exit_description(exit_code: int | None) -> str:
    """What an exit code says: runtimes report a process ended by signal N as 128 + N. A SIGKILL leaves no result
    behind — the kernel's OOM killer, an eviction or node loss, a deletion past its grace period."""
    if exit_code is not None and 128 < exit_code < 128 + 65:
        try:
            name = signal.Signals(exit_code - 128).name
        except ValueError:
            return f"exited with code {exit_code}"
        cause = {"SIGKILL": " (out of memory, eviction, node loss, or deleted past its grace period)",
                 "SIGTERM": " (pod deleted or its deadline passed)"}.get(name, "")
        return f"killed by {name}{cause}, exit code {exit_code}"
    return f"exited with code {exit_code}"
