"""The serving state machine, conditions and phase (no cluster)."""

from __future__ import annotations

from typing import Any

import pytest
from finetune_operator.runs import GateDecision, TrainerResult
from finetune_operator.spec import FineTuneSpec
from finetune_operator.status import (
    Observed,
    conditions_for,
    desired_version,
    finalize,
    mark_active,
    phase_for,
    plan_serving,
    record_run,
    rollout_state,
    run_event,
    set_condition,
    status_patch,
)

V1, V2, V3 = "20261001T030000Z", "20261101T030000Z", "20261201T030000Z"
NOW = "2026-11-26T03:10:00Z"


def deployment(mounted: str | None = None, *, generation: int = 1, observed: int | None = None, replicas: int = 1,
               updated: int = 1, available: int = 1, total: int | None = None, deadline: bool = False,
               container: str = "chat") -> dict[str, Any]:
    mounts = [{"name": "lora-lumina", "mountPath": "/models/lora_lumina", "subPath": f"lora_lumina/{mounted}"}]
    conditions = [{"type": "Progressing", "status": "False" if deadline else "True",
                   "reason": "ProgressDeadlineExceeded" if deadline else "NewReplicaSetAvailable"}]
    return {
        "metadata": {"name": "chat", "generation": generation},
        "spec": {"replicas": replicas, "template": {"spec": {"containers": [
            {"name": container, "volumeMounts": mounts if mounted else []}]}}},
        "status": {"observedGeneration": generation if observed is None else observed, "updatedReplicas": updated,
                   "availableReplicas": available, "replicas": updated if total is None else total,
                   "conditions": conditions},
    }


def with_spec(spec_dict: dict[str, Any], **changes: Any) -> FineTuneSpec:
    return FineTuneSpec.from_dict({**spec_dict, **changes})


# --- desired version ----------------------------------------------------------------------------------------------

def test_desired_version_precedence(spec_dict: dict[str, Any]) -> None:
    auto = FineTuneSpec.from_dict(spec_dict)
    manual = with_spec(spec_dict, promotion={"mode": "Manual"})
    pinned = with_spec(spec_dict, pinnedVersion=V1, promotion={"mode": "Manual"})
    note = {"llmmultichat.io/promote": V3}
    assert desired_version(auto, {}, {}).source == "none"
    assert desired_version(auto, note, {"approvedVersion": V2}).version == V2  # Auto ignores the annotation
    assert desired_version(manual, note, {"approvedVersion": V2}).version == V3
    assert desired_version(manual, {}, {"approvedVersion": V2}).version == V2
    d = desired_version(pinned, note, {"approvedVersion": V2})
    assert (d.version, d.source) == (V1, "pinned")


# --- rollout state ------------------------------------------------------------------------------------------------

def test_rollout_state() -> None:
    assert rollout_state(deployment(V1, generation=3), 3) == "Complete"
    assert rollout_state(deployment(V1, generation=3, observed=2), 3) == "Progressing"
    assert rollout_state(deployment(V1, generation=3, replicas=2, updated=1, available=1), 3) == "Progressing"
    assert rollout_state(deployment(V1, generation=3, updated=1, total=2), 3) == "Progressing"
    assert rollout_state(deployment(V1, generation=3, available=0), 3) == "Progressing"
    assert rollout_state(deployment(V1, generation=3, available=0, deadline=True), 3) == "Failed"
    assert rollout_state(deployment(V1, generation=1), 3) == "Lost"
    # A later generation (someone else's change) still tells whether ours got through.
    assert rollout_state(deployment(V1, generation=4), 3) == "Complete"
    assert rollout_state(deployment(V1, generation=3, replicas=0, updated=0, available=0), 3) == "Complete"


# --- plan -----------------------------------------------------------------------------------------------------------

def test_nothing_to_do_without_a_version(spec: FineTuneSpec) -> None:
    plan = plan_serving(spec=spec, annotations={}, status={}, deployment=deployment(), now=NOW)
    assert plan.action == "none" and not plan.events


def test_approved_version_is_applied(spec: FineTuneSpec) -> None:
    plan = plan_serving(spec=spec, annotations={}, status={"approvedVersion": V1}, deployment=deployment(), now=NOW)
    assert plan.action == "apply" and plan.version == V1
    assert plan.status["rollout"] == {"version": V1, "fromVersion": "", "source": "approved", "startedAt": NOW}


def test_in_flight_rollout_waits(spec: FineTuneSpec) -> None:
    status = {"approvedVersion": V1, "rollout": {"version": V1, "fromVersion": "", "generation": 2}}
    plan = plan_serving(spec=spec, annotations={}, status=status,
                        deployment=deployment(V1, generation=2, observed=1), now=NOW)
    assert plan.action == "wait" and plan.status == status


def test_completed_rollout_serves(spec: FineTuneSpec) -> None:
    status = {"approvedVersion": V2, "servingVersion": V1,
              "rollout": {"version": V2, "fromVersion": V1, "generation": 2, "source": "approved"},
              "lastRun": {"version": V2, "metrics": {"evalLossAdapter": 2.0}}}
    plan = plan_serving(spec=spec, annotations={}, status=status, deployment=deployment(V2, generation=2), now=NOW)
    assert plan.action == "none"
    assert plan.status["servingVersion"] == V2 and plan.status["previousVersion"] == V1
    assert plan.status["servingMetrics"] == {"evalLossAdapter": 2.0}
    assert plan.status["rollout"] is None
    assert plan.counters == ["promotion"] and plan.events[0].reason == "Promoted"


def test_serving_version_shows_its_engine_compatibility(spec: FineTuneSpec) -> None:
    vllm = {"vllm": {"compatible": False, "reasons": ["architecture GPT2LMHeadModel: ..."], "maxLoraRank": 8}}
    status = {"approvedVersion": V2, "servingVersion": V1,
              "rollout": {"version": V2, "fromVersion": V1, "generation": 2, "source": "approved"},
              "lastRun": {"version": V3}, "history": [{"version": V3}, {"version": V2, "compatibility": vllm}]}
    plan = plan_serving(spec=spec, annotations={}, status=status, deployment=deployment(V2, generation=2), now=NOW)
    assert plan.status["servingCompatibility"] == vllm
    # Back to the base model: nothing to say.
    status = {"servingVersion": V2, "servingCompatibility": vllm, "history": [{"version": V2, "compatibility": vllm}],
              "rollout": {"version": "", "fromVersion": V2, "generation": 2, "source": "none"}}
    plan = plan_serving(spec=spec, annotations={}, status=status, deployment=deployment(None, generation=2), now=NOW)
    assert plan.status["servingVersion"] is None and plan.status["servingCompatibility"] is None


def test_steady_state_is_a_fixed_point(spec: FineTuneSpec) -> None:
    status = {"approvedVersion": V1, "servingVersion": V1}
    plan = plan_serving(spec=spec, annotations={}, status=status, deployment=deployment(V1), now=NOW)
    assert plan.action == "none" and plan.status == status and not plan.events


def test_failed_rollout_rolls_back_to_the_previous_version(spec: FineTuneSpec) -> None:
    status = {"approvedVersion": V2, "servingVersion": V1,
              "rollout": {"version": V2, "fromVersion": V1, "generation": 5}}
    plan = plan_serving(spec=spec, annotations={}, status=status,
                        deployment=deployment(V2, generation=5, available=0, deadline=True), now=NOW)
    assert plan.action == "apply" and plan.version == V1
    assert plan.status["failedVersion"] == V2
    assert plan.status["rollout"] == {"version": V1, "fromVersion": V2, "rollback": True, "startedAt": NOW}
    assert plan.counters == ["rollback"] and plan.events[0].reason == "RolloutFailed"
    assert plan.events[0].type == "Warning"


def test_failed_first_rollout_removes_the_mount(spec: FineTuneSpec) -> None:
    status = {"approvedVersion": V1, "rollout": {"version": V1, "fromVersion": "", "generation": 2}}
    plan = plan_serving(spec=spec, annotations={}, status=status,
                        deployment=deployment(V1, generation=2, available=0, deadline=True), now=NOW)
    assert plan.action == "unmount" and plan.version is None


def test_rollback_completion_and_no_retry_of_the_failed_version(spec: FineTuneSpec) -> None:
    status = {"approvedVersion": V2, "servingVersion": V1, "failedVersion": V2,
              "rollout": {"version": V1, "fromVersion": V2, "rollback": True, "generation": 6}}
    plan = plan_serving(spec=spec, annotations={}, status=status, deployment=deployment(V1, generation=6), now=NOW)
    assert plan.action == "none" and plan.status["servingVersion"] == V1 and plan.status["rollout"] is None
    assert plan.events[0].reason == "RolledBack" and not plan.counters
    # Next round: the approved version is the failed one: stay put.
    again = plan_serving(spec=spec, annotations={}, status=plan.status, deployment=deployment(V1, generation=6),
                         now=NOW)
    assert again.action == "none"
    # A newer approved version is tried.
    newer = plan_serving(spec=spec, annotations={}, status={**plan.status, "approvedVersion": V3},
                         deployment=deployment(V1, generation=6), now=NOW)
    assert newer.action == "apply" and newer.version == V3


def test_restart_after_patch_before_status_resumes_without_a_second_rollout(spec: FineTuneSpec) -> None:
    # The Deployment already mounts V2 (patched just before a crash), the status never heard of it.
    status = {"approvedVersion": V2, "servingVersion": V1}
    plan = plan_serving(spec=spec, annotations={}, status=status, deployment=deployment(V2, generation=7), now=NOW)
    # Re-applying the same configuration is a no-op for the API server: same generation, no new rollout.
    assert plan.action == "apply" and plan.version == V2 and plan.status["rollout"]["fromVersion"] == V1


def test_hand_removed_mount_is_put_back(spec: FineTuneSpec) -> None:
    status = {"approvedVersion": V1, "servingVersion": V1}
    plan = plan_serving(spec=spec, annotations={}, status=status, deployment=deployment(None), now=NOW)
    assert plan.action == "apply" and plan.version == V1


def test_pin_and_unpin(spec_dict: dict[str, Any]) -> None:
    pinned = with_spec(spec_dict, pinnedVersion=V1)
    status = {"approvedVersion": V2, "servingVersion": V2}
    plan = plan_serving(spec=pinned, annotations={}, status=status, deployment=deployment(V2), now=NOW)
    assert plan.action == "apply" and plan.version == V1 and plan.status["rollout"]["source"] == "pinned"
    unpinned = FineTuneSpec.from_dict(spec_dict)
    back = plan_serving(spec=unpinned, annotations={}, status={"approvedVersion": V2, "servingVersion": V1},
                        deployment=deployment(V1), now=NOW)
    assert back.action == "apply" and back.version == V2


def test_unpin_with_nothing_approved_unmounts(spec: FineTuneSpec) -> None:
    plan = plan_serving(spec=spec, annotations={}, status={"servingVersion": V1}, deployment=deployment(V1), now=NOW)
    assert plan.action == "unmount" and plan.status["rollout"]["version"] == ""


def test_manual_promotion_via_annotation(spec_dict: dict[str, Any]) -> None:
    manual = with_spec(spec_dict, promotion={"mode": "Manual"})
    note = {"llmmultichat.io/promote": V2}
    status = {"candidateVersion": V2}
    plan = plan_serving(spec=manual, annotations=note, status=status, deployment=deployment(), now=NOW)
    assert plan.action == "apply" and plan.status["rollout"]["source"] == "annotation"
    done = plan_serving(spec=manual, annotations=note, status={**plan.status, "rollout": {
        **plan.status["rollout"], "generation": 2}}, deployment=deployment(V2, generation=2), now=NOW)
    assert done.status["approvedVersion"] == V2 and done.status["candidateVersion"] is None


def test_target_errors(spec: FineTuneSpec) -> None:
    assert "not found" in (plan_serving(spec=spec, annotations={}, status={}, deployment=None, now=NOW).error or "")
    plan = plan_serving(spec=spec, annotations={}, status={"approvedVersion": V1},
                        deployment=deployment(container="web"), now=NOW)
    assert plan.action == "none" and "no container 'chat'" in (plan.error or "")


def test_lost_rollout_is_replanned(spec: FineTuneSpec) -> None:
    status = {"approvedVersion": V1, "rollout": {"version": V1, "fromVersion": "", "generation": 9}}
    plan = plan_serving(spec=spec, annotations={}, status=status, deployment=deployment(None, generation=1), now=NOW)
    assert plan.action == "apply" and plan.version == V1


# --- recording runs -------------------------------------------------------------------------------------------------

def test_record_run_bounds_history_and_applies_the_verdict() -> None:
    history = [{"jobUID": f"u{i}", "job": f"j{i}"} for i in range(10)]
    status = {"history": history, "activeRun": {"job": "new"}}
    record = {"jobUID": "u-new", "job": "new", "outcome": "trained", "version": V3}
    result = TrainerResult(outcome="trained", version=V3)
    st = record_run(status, record, result, GateDecision("promote", "better"), history_limit=10)
    assert st["lastRun"] == record and st["history"][0] == record and len(st["history"]) == 10
    assert st["approvedVersion"] == V3 and st["activeRun"] is None
    st2 = record_run({}, record, result, GateDecision("await", "manual"), history_limit=10)
    assert st2["candidateVersion"] == V3 and "approvedVersion" not in st2
    st3 = record_run({"approvedVersion": V1}, {**record, "outcome": "rejected"}, result,
                     GateDecision("reject", "worse"), history_limit=10)
    assert st3["approvedVersion"] == V1


@pytest.mark.parametrize(("outcome", "kind", "reason"), [("trained", "Normal", "RunTrained"),
                                                          ("rejected", "Normal", "RunRejected"),
                                                          ("skipped", "Normal", "RunSkipped"),
                                                          ("failed", "Warning", "RunFailed")])
def test_run_events(outcome: str, kind: str, reason: str) -> None:
    event = run_event({"outcome": outcome, "job": "j", "version": V1, "reason": "r"})
    assert (event.type, event.reason) == (kind, reason)


def test_mark_active() -> None:
    st = mark_active({}, {"metadata": {"name": "j", "creationTimestamp": "t0"}, "status": {}})
    assert st["activeRun"] == {"job": "j", "startedAt": "t0"}


# --- conditions and phase -----------------------------------------------------------------------------------------

def test_set_condition_keeps_transition_time_when_status_is_unchanged() -> None:
    c1 = set_condition([], type="Ready", status="False", reason="A", message="m", generation=1, now="t1")
    c2 = set_condition(c1, type="Ready", status="False", reason="B", message="m2", generation=2, now="t2")
    assert c2[0]["lastTransitionTime"] == "t1" and c2[0]["reason"] == "B" and c2[0]["observedGeneration"] == 2
    c3 = set_condition(c2, type="Ready", status="True", reason="C", message="m3", generation=2, now="t3")
    assert c3[0]["lastTransitionTime"] == "t3"


def test_first_visit_sets_all_four_conditions(spec: FineTuneSpec) -> None:
    conditions = conditions_for(spec, {}, {}, Observed(generation=1), NOW)
    by_type = {c["type"]: c for c in conditions}
    assert list(by_type) == ["Scheduled", "Trained", "Promoted", "Ready"]
    assert by_type["Scheduled"]["status"] == "True"
    assert by_type["Trained"]["status"] == "Unknown" and by_type["Promoted"]["status"] == "Unknown"
    assert by_type["Ready"]["status"] == "False"
    assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] == NOW for c in conditions)


def test_conditions_and_phase_through_a_life(spec_dict: dict[str, Any]) -> None:
    spec = FineTuneSpec.from_dict(spec_dict)
    obs = Observed(generation=2)

    def summary(status: dict[str, Any], s: FineTuneSpec = spec, o: Observed = obs,
                notes: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
        st = finalize(s, notes or {}, status, o, NOW)
        return st["phase"], {c["type"]: f"{c['status']}/{c['reason']}" for c in st["conditions"]}

    assert summary({}) == ("Scheduled", {"Scheduled": "True/CronJobReady", "Trained": "Unknown/NoRunYet",
                                         "Promoted": "Unknown/NoRunYet", "Ready": "False/NotServing"})
    phase, c = summary({"activeRun": {"job": "j"}})
    assert phase == "Training" and c["Trained"] == "Unknown/Training"
    run = {"job": "j", "outcome": "trained", "version": V1}
    phase, c = summary({"lastRun": run, "approvedVersion": V1, "rollout": {"version": V1}})
    assert phase == "Promoting" and c["Promoted"] == "False/RolloutInProgress"
    phase, c = summary({"lastRun": run, "approvedVersion": V1, "servingVersion": V1})
    assert phase == "Ready" and c["Promoted"] == "True/Promoted" and c["Ready"] == "True/RolloutComplete"
    phase, c = summary({"lastRun": {**run, "outcome": "rejected"}, "approvedVersion": V1, "servingVersion": V1})
    assert phase == "Ready" and c["Trained"] == "True/Rejected"
    phase, c = summary({"lastRun": {"job": "j", "outcome": "skipped"}})
    assert phase == "Scheduled" and c["Trained"] == "False/Skipped" and c["Promoted"] == "False/NothingToPromote"
    phase, c = summary({"lastRun": {"job": "j", "outcome": "failed"}})
    assert c["Trained"] == "False/Failed"
    phase, c = summary({"lastRun": run, "approvedVersion": V2, "servingVersion": V1, "failedVersion": V2})
    assert phase == "RolloutFailed" and c["Promoted"] == "False/RolloutFailed" and c["Ready"] == "True/RolloutComplete"
    phase, c = summary({"rollout": {"version": V1, "fromVersion": V2, "rollback": True}})
    assert phase == "RolloutFailed" and c["Ready"] == "False/RolloutInProgress"
    suspended = with_spec(spec_dict, suspend=True)
    phase, c = summary({}, suspended)
    assert phase == "Suspended" and c["Scheduled"] == "False/Suspended"
    manual = with_spec(spec_dict, promotion={"mode": "Manual"})
    phase, c = summary({"lastRun": run, "candidateVersion": V1}, manual)
    assert phase == "AwaitingApproval" and c["Promoted"] == "False/AwaitingApproval"
    phase, c = summary({}, spec, Observed(generation=2, target_error="target Deployment 'chat' not found"))
    assert phase == "Error" and c["Ready"] == "False/TargetError"
    phase, c = summary({}, spec, Observed(generation=2, cronjob_error="bad"))
    assert phase == "Error" and c["Scheduled"] == "False/CronJobError"


def test_finalize_records_generation_and_error(spec: FineTuneSpec) -> None:
    st = finalize(spec, {}, {}, Observed(generation=4, target_error="boom"), NOW)
    assert st["observedGeneration"] == 4 and st["lastError"] == "boom"
    assert finalize(spec, {}, st, Observed(generation=4), NOW)["lastError"] is None


def test_phase_for_prefers_errors(spec: FineTuneSpec) -> None:
    assert phase_for(spec, {}, {"servingVersion": V1}, Observed(1, reconcile_error="x")) == "Error"


def test_status_patch_sets_and_removes() -> None:
    assert status_patch({"a": 1, "b": 2, "c": 3}, {"a": 1, "b": 5, "c": None, "d": 4}) == {"b": 5, "c": None,
                                                                                            "d": 4}
    assert status_patch({"a": [1]}, {"a": [1]}) == {}


def test_an_event_message_fits_the_api_servers_limit_keeping_its_start_and_end() -> None:
    """A failed run's reason may be 1024 characters of log tail; "Job x failed: " on top made the API refuse the
    Event (422), so a killed run posted none (found by tests/reliability/test_trainer_killed_cluster.py)."""
    reason = "killed by SIGKILL, exit code 137: last log lines: …" + "ログ" * 400 + " step 1/12"
    event = run_event({"job": "lumina-2", "outcome": "failed", "reason": reason})
    assert event.reason == "RunFailed" and len(event.message.encode()) <= 1024
    assert event.message.startswith("Job lumina-2 failed: killed by SIGKILL, exit code 137")
    assert event.message.endswith(" step 1/12") and " … " in event.message
    assert run_event({"job": "j", "outcome": "failed", "reason": "short"}).message == "Job j failed: short"


def test_status_patch_removes_what_a_nested_object_no_longer_has() -> None:
    """The API server merges nested objects of a merge patch: a failed run's lastRun must drop the last run's
    version and metrics, not inherit them."""
    trained = {"job": "lumina-1", "outcome": "trained", "version": "V1", "metrics": {"evalLossAdapter": 2.0}}
    failed = {"job": "lumina-2", "outcome": "failed", "reason": "killed"}
    patch = status_patch({"lastRun": trained, "x": 1}, {"lastRun": failed, "x": 1})
    assert patch == {"lastRun": {"job": "lumina-2", "outcome": "failed", "reason": "killed", "version": None,
                                 "metrics": None}}
    assert status_patch({"a": {"b": {"c": 1, "d": 2}}}, {"a": {"b": {"c": 1}}}) == {"a": {"b": {"d": None}}}
    assert status_patch({"a": {"b": 1}}, {"a": None}) == {"a": None}
    assert status_patch({"a": 1}, {"a": {"b": 1}}) == {"a": {"b": 1}}
