"""Pure functions from what the operator observed to what it should do and what `status` should say.

The status is the operator's memory: every decision that must survive a restart (which Job was recorded, which
version was approved, which rollout is in flight, which version failed) lives there, so a restarted operator
recomputes the same next step from the same inputs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .manifests import ANNOTATION_PROMOTE, has_container, mounted_version
from .runs import GateDecision, TrainerResult
from .spec import FineTuneSpec

RolloutState = Literal["Complete", "Progressing", "Failed", "Lost"]
Source = Literal["pinned", "annotation", "approved", "none"]
CONDITION_TYPES = ("Scheduled", "Trained", "Promoted", "Ready")
MAX_EVENT_MESSAGE_BYTES = 1024  # the API server's limit on an Event's message


@dataclass(frozen=True)
class Desired:
    version: str | None
    source: Source


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str

    def __post_init__(self) -> None:
        # The API refuses an Event whose message is over 1024 bytes (kopf then drops it, logging a warning): a failed
        # run's reason alone may be that long. Keep the start (what happened) and the end (the log's last words).
        data = self.message.encode()
        if len(data) > MAX_EVENT_MESSAGE_BYTES:
            head = data[:300].decode(errors="ignore")
            tail = data[-(MAX_EVENT_MESSAGE_BYTES - 310):].decode(errors="ignore")
            object.__setattr__(self, "message", f"{head} … {tail}")


@dataclass
class Plan:
    """The next step for the serving side: `apply` (mount `version`), `unmount`, `wait` (a rollout is in flight)
    or `none`; `status` is the status to write once the step succeeded."""

    action: Literal["apply", "unmount", "wait", "none"]
    status: dict[str, Any]
    version: str | None = None
    events: list[Event] = field(default_factory=list)
    counters: list[Literal["promotion", "rollback"]] = field(default_factory=list)
    error: str | None = None


# --- desired serving version ---------------------------------------------------------------------------------------

def desired_version(spec: FineTuneSpec, annotations: Mapping[str, str], status: Mapping[str, Any]) -> Desired:
    """What should serve: a pin wins; with Manual promotion the promote annotation; else the last approved version."""
    if spec.pinned_version:
        return Desired(spec.pinned_version, "pinned")
    if spec.promotion.manual and annotations.get(ANNOTATION_PROMOTE):
        return Desired(annotations[ANNOTATION_PROMOTE].strip(), "annotation")
    if status.get("approvedVersion"):
        return Desired(status["approvedVersion"], "approved")
    return Desired(None, "none")


# --- rollout of the target Deployment -------------------------------------------------------------------------------

def rollout_state(deployment: Mapping[str, Any], generation: int) -> RolloutState:
    """Where the rollout of Deployment `generation` stands, by the rules `kubectl rollout status` uses."""
    meta = deployment.get("metadata") or {}
    if int(meta.get("generation") or 0) < generation:
        return "Lost"  # the Deployment was deleted and re-created since we patched it
    status = deployment.get("status") or {}
    if int(status.get("observedGeneration") or 0) < generation:
        return "Progressing"
    for condition in status.get("conditions") or ():
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return "Failed"
    spec = deployment.get("spec") or {}
    replicas = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas") or 0)
    if updated < replicas:
        return "Progressing"
    if int(status.get("replicas") or 0) > updated:
        return "Progressing"  # old pods still terminating
    if int(status.get("availableReplicas") or 0) < updated:
        return "Progressing"
    return "Complete"


def plan_serving(
    *,
    spec: FineTuneSpec,
    annotations: Mapping[str, str],
    status: Mapping[str, Any],
    deployment: Mapping[str, Any] | None,
    now: str,
) -> Plan:
    """Decide the next serving step. Idempotent: the same inputs give the same plan, and applying a plan whose
    effect is already in place is harmless (server-side apply of an unchanged configuration changes nothing)."""
    st = copy.deepcopy(dict(status))
    if deployment is None:
        return Plan("none", st, error=f"target Deployment {spec.target.deployment!r} not found")
    if not has_container(deployment, spec.target.container):
        return Plan("none", st, error=(f"target Deployment {spec.target.deployment!r} has no container "
                                       f"{spec.target.container!r}"))
    rollout = st.get("rollout")
    if rollout:
        state = rollout_state(deployment, int(rollout.get("generation") or 0))
        if state == "Progressing":
            return Plan("wait", st)
        st["rollout"] = None
        if state == "Complete":
            return rollout_complete(rollout, st, status)
        if state == "Failed":
            return rollout_failed(rollout, st, status, now)
        # Lost: the Deployment was replaced; plan afresh below.
    return plan_rollout(spec, desired_version(spec, annotations, status), mounted_version(deployment, spec), st, now)


def rollout_complete(rollout: Mapping[str, Any], st: dict[str, Any], status: Mapping[str, Any]) -> Plan:
    """The rollout in flight finished: the version it mounted serves now (a rollback's too)."""
    version = rollout.get("version") or None
    st["servingVersion"] = version
    st["servingMetrics"] = metrics_of(version, status)
    st["servingCompatibility"] = compatibility_of(version, status)
    if rollout.get("rollback"):
        return Plan("none", st, events=[Event("Normal", "RolledBack", f"serving {version or 'the base model'} again")])
    st["previousVersion"] = rollout.get("fromVersion") or None
    st["failedVersion"] = None
    st["failedReason"] = None
    if rollout.get("source") == "annotation":
        # A person approved it: it stays approved if the mode later goes back to Auto.
        st["approvedVersion"] = version
    if st.get("candidateVersion") == version:
        st["candidateVersion"] = None
    if not version:
        return Plan("none", st, events=[Event("Normal", "Unmounted", "rollout complete, serving the base model")])
    return Plan("none", st, events=[Event("Normal", "Promoted", f"rollout complete, serving adapter {version}")],
                counters=["promotion"])


def rollout_failed(rollout: Mapping[str, Any], st: dict[str, Any], status: Mapping[str, Any], now: str) -> Plan:
    """The rollout in flight exceeded its progress deadline: roll back to what served before (once)."""
    version = rollout.get("version") or None
    if rollout.get("rollback"):
        st["servingVersion"] = version
        st["servingMetrics"] = metrics_of(version, status)
        st["servingCompatibility"] = compatibility_of(version, status)
        return Plan("none", st, events=[Event("Warning", "RollbackFailed",
                                              f"restoring {version or 'the base model'} did not complete either; "
                                              "check the Deployment")])
    back = rollout.get("fromVersion") or None
    st["failedVersion"] = version or ""
    st["rollout"] = {"version": back or "", "fromVersion": version or "", "rollback": True, "startedAt": now}
    event = Event("Warning", "RolloutFailed", f"rollout of {version or 'the base model'} exceeded its progress "
                                              f"deadline; restoring {back or 'the base model'}")
    return Plan("apply" if back else "unmount", st, version=back, events=[event], counters=["rollback"])


def plan_rollout(spec: FineTuneSpec, desired: Desired, mounted: str | None, st: dict[str, Any], now: str) -> Plan:
    """No rollout in flight: start the one that makes the Deployment serve `desired`, if any is needed."""
    if desired.version is None:
        if mounted is None and not st.get("servingVersion"):
            return Plan("none", st)
        st["rollout"] = {"version": "", "fromVersion": st.get("servingVersion") or mounted or "",
                         "source": desired.source, "startedAt": now}
        return Plan("unmount", st)
    if desired.version == st.get("failedVersion"):
        return Plan("none", st)  # stays on what serves; phase says RolloutFailed
    if desired.version == st.get("regressedVersion") and desired.source != "pinned":
        return Plan("none", st)  # the feedback guard rolled it back: only a pin brings it back
    if mounted == desired.version and st.get("servingVersion") == desired.version:
        return Plan("none", st)
    st["rollout"] = {"version": desired.version, "fromVersion": st.get("servingVersion") or "",
                     "source": desired.source, "startedAt": now}
    event = Event("Normal", "Promoting", f"mounting adapter {desired.version} ({desired.source}) in "
                                         f"Deployment {spec.target.deployment}")
    return Plan("apply", st, version=desired.version, events=[event])


def metrics_of(version: str | None, status: Mapping[str, Any]) -> dict[str, Any] | None:
    """The metrics a version was trained with, if a run that produced it is still in the history."""
    return _recorded(version, status, "metrics")


def compatibility_of(version: str | None, status: Mapping[str, Any]) -> dict[str, Any] | None:
    """Which serving engines can load a version (the trainer's check at publish), if its run is in the history."""
    return _recorded(version, status, "compatibility")


def _recorded(version: str | None, status: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    if not version:
        return None
    for run in [status.get("lastRun") or {}, *(status.get("history") or ())]:
        if run.get("version") == version and run.get(key):
            return dict(run[key])
    return None


# --- recording runs -------------------------------------------------------------------------------------------------

def record_run(
    status: Mapping[str, Any],
    record: Mapping[str, Any],
    result: TrainerResult,
    decision: GateDecision,
    *,
    history_limit: int,
) -> dict[str, Any]:
    """The status after recording one finished run, including the gate's verdict."""
    st = copy.deepcopy(dict(status))
    st["lastRun"] = dict(record)
    st["history"] = [dict(record), *[h for h in st.get("history") or () if h.get("jobUID") != record.get("jobUID")]]
    st["history"] = st["history"][:history_limit]
    if (st.get("activeRun") or {}).get("job") == record.get("job"):
        st["activeRun"] = None
    if decision.verdict == "promote":
        st["approvedVersion"] = result.version
    elif decision.verdict == "await":
        st["candidateVersion"] = result.version
    return st


def run_event(record: Mapping[str, Any]) -> Event:
    outcome = record.get("outcome")
    version = record.get("version")
    job = record.get("job")
    reason = record.get("reason") or ""
    if outcome == "trained":
        return Event("Normal", "RunTrained", f"Job {job} trained adapter {version}: {reason}")
    if outcome == "rejected":
        return Event("Normal", "RunRejected", f"Job {job} trained adapter {version}, not promoted: {reason}")
    if outcome == "skipped":
        return Event("Normal", "RunSkipped", f"Job {job} skipped: {reason}")
    return Event("Warning", "RunFailed", f"Job {job} failed: {reason}")


def mark_active(status: Mapping[str, Any], job: Mapping[str, Any]) -> dict[str, Any]:
    st = copy.deepcopy(dict(status))
    st["activeRun"] = {"job": job["metadata"]["name"],
                       "startedAt": (job.get("status") or {}).get("startTime")
                       or job["metadata"].get("creationTimestamp")}
    return st


# --- conditions and phase -------------------------------------------------------------------------------------------

def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    *,
    type: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """metav1.Condition semantics: lastTransitionTime changes only when `status` changes."""
    out: list[dict[str, Any]] = []
    found = False
    for old in conditions:
        if old.get("type") != type:
            out.append(dict(old))
            continue
        found = True
        changed = old.get("status") != status
        out.append({
            "type": type, "status": status, "reason": reason, "message": message[:32768],
            "observedGeneration": generation,
            "lastTransitionTime": now if changed else old.get("lastTransitionTime", now),
        })
    if not found:
        out.append({"type": type, "status": status, "reason": reason, "message": message[:32768],
                    "observedGeneration": generation, "lastTransitionTime": now})
    order = {t: i for i, t in enumerate(CONDITION_TYPES)}
    return sorted(out, key=lambda c: order.get(c["type"], len(order)))


@dataclass(frozen=True)
class Observed:
    """What the controller saw this round, besides the status itself."""

    generation: int
    cronjob_error: str | None = None
    target_error: str | None = None
    reconcile_error: str | None = None


ConditionValue = tuple[Literal["True", "False", "Unknown"], str, str]  # status, reason, message


def scheduled_condition(spec: FineTuneSpec, observed: Observed) -> ConditionValue:
    """Is the CronJob in place and active?"""
    if observed.cronjob_error:
        return "False", "CronJobError", observed.cronjob_error
    if spec.suspend:
        return "False", "Suspended", "scheduled runs are suspended (spec.suspend)"
    tz = f" ({spec.time_zone})" if spec.time_zone else ""
    return "True", "CronJobReady", f"trains on schedule '{spec.schedule}'{tz}"


def trained_condition(status: Mapping[str, Any]) -> ConditionValue:
    """What the last finished run did."""
    last = status.get("lastRun") or {}
    outcome = last.get("outcome")
    if not last and status.get("activeRun"):
        return "Unknown", "Training", f"Job {status['activeRun'].get('job')} is running"
    if not last:
        return "Unknown", "NoRunYet", "no training run has finished yet"
    if outcome in ("trained", "rejected"):
        reason = "Trained" if outcome == "trained" else "Rejected"
        return "True", reason, f"{last.get('job')}: adapter {last.get('version')}; {last.get('reason', '')}"
    if outcome == "skipped":
        return "False", "Skipped", f"{last.get('job')}: {last.get('reason', 'skipped')}"
    return "False", "Failed", f"{last.get('job')}: {last.get('reason', 'failed')}"


def promoted_condition(spec: FineTuneSpec, annotations: Mapping[str, str], status: Mapping[str, Any],
                       observed: Observed) -> ConditionValue:
    """Does the Deployment carry the version that should serve?"""
    desired = desired_version(spec, annotations, status)
    serving = status.get("servingVersion")
    rollout = status.get("rollout") or {}
    candidate = status.get("candidateVersion")
    if observed.target_error:
        return "False", "TargetError", observed.target_error
    if rollout and rollout.get("rollback"):
        return "False", "RolloutFailed", (f"rollout of {rollout.get('fromVersion') or 'the base model'} failed; "
                                          f"restoring {rollout.get('version') or 'the base model'}")
    if rollout:
        return "False", "RolloutInProgress", f"rolling out {rollout.get('version') or 'the base model'}"
    if desired.version and desired.version == status.get("failedVersion"):
        why = f": {status['failedReason']}" if status.get("failedReason") else ""
        return "False", "RolloutFailed", (f"rollout of {desired.version} failed; serving "
                                          f"{serving or 'the base model'}{why}")
    if desired.version and serving == desired.version:
        return "True", "Promoted", f"serving adapter {serving} ({desired.source})"
    if spec.promotion.manual and candidate and candidate != serving:
        return "False", "AwaitingApproval", f"annotate llmmultichat.io/promote={candidate} to promote it"
    if not status.get("lastRun"):
        return "Unknown", "NoRunYet", "nothing trained yet"
    return "False", "NothingToPromote", f"no adapter approved yet; serving {serving or 'the base model'}"


def ready_condition(spec: FineTuneSpec, status: Mapping[str, Any], observed: Observed) -> ConditionValue:
    """Has the Deployment finished rolling out what this resource wants serving?"""
    serving = status.get("servingVersion")
    if observed.target_error:
        return "False", "TargetError", observed.target_error
    if status.get("rollout"):
        return "False", "RolloutInProgress", f"Deployment {spec.target.deployment} is rolling out"
    if serving:
        return "True", "RolloutComplete", f"Deployment {spec.target.deployment} serves adapter {serving}"
    return "False", "NotServing", "no adapter serves this character yet (the base model does)"


def conditions_for(
    spec: FineTuneSpec, annotations: Mapping[str, str], status: Mapping[str, Any], observed: Observed, now: str
) -> list[dict[str, Any]]:
    conditions: list[dict[str, Any]] = list(status.get("conditions") or ())
    values = {
        "Scheduled": scheduled_condition(spec, observed),
        "Trained": trained_condition(status),
        "Promoted": promoted_condition(spec, annotations, status, observed),
        "Ready": ready_condition(spec, status, observed),
    }
    for type_, (value, reason, message) in values.items():
        conditions = set_condition(conditions, type=type_, status=value, reason=reason, message=message,
                                   generation=observed.generation, now=now)
    return conditions


def phase_for(spec: FineTuneSpec, annotations: Mapping[str, str], status: Mapping[str, Any],
              observed: Observed) -> str:
    desired = desired_version(spec, annotations, status)
    rollout = status.get("rollout") or {}
    if observed.reconcile_error or observed.target_error or observed.cronjob_error:
        return "Error"
    if rollout and rollout.get("rollback"):
        return "RolloutFailed"
    if rollout:
        return "Promoting"
    if desired.version and desired.version == status.get("failedVersion"):
        return "RolloutFailed"
    if status.get("activeRun"):
        return "Training"
    if spec.promotion.manual and status.get("candidateVersion") and status["candidateVersion"] != desired.version:
        return "AwaitingApproval"
    if spec.suspend:
        return "Suspended"
    if status.get("servingVersion"):
        return "Ready"
    return "Scheduled"


def finalize(
    spec: FineTuneSpec, annotations: Mapping[str, str], status: Mapping[str, Any], observed: Observed, now: str
) -> dict[str, Any]:
    """Status with phase, conditions and observedGeneration brought up to date."""
    st = copy.deepcopy(dict(status))
    st["conditions"] = conditions_for(spec, annotations, st, observed, now)
    st["phase"] = phase_for(spec, annotations, st, observed)
    st["observedGeneration"] = observed.generation
    st["lastError"] = observed.reconcile_error or observed.target_error or observed.cronjob_error
    return st


def status_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) turning `old` into `new` (None removes a field). Nested objects are diffed too:
    the API server merges an object in a merge patch into the stored one, so a key that `new` leaves out must be
    sent as None — else a failed run's `lastRun` kept the previous run's version and metrics."""
    patch: dict[str, Any] = {}
    for key in set(old) | set(new):
        before, after = old.get(key), new.get(key)
        if before == after:
            continue
        both_objects = isinstance(before, Mapping) and isinstance(after, Mapping)
        patch[key] = status_patch(before, after) if both_objects else after
    return patch
