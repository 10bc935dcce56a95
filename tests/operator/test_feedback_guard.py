"""The feedback guard's decision and status step (pure; no cluster, no chat service)."""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import pytest
from finetune_operator.feedback import Thumbs, judge, one_sided_p_value, plan_feedback, thumbs_by_version
from finetune_operator.spec import FeedbackGuardSpec, FineTuneSpec
from finetune_operator.status import Desired, plan_rollout

V1, V2 = "20261001T030000Z", "20261101T030000Z"
NOW = "2026-11-26T03:10:00Z"
GUARD = FeedbackGuardSpec(min_rated_replies=30, max_down_rate_increase=0.05, confidence=0.95)


@pytest.fixture
def guarded(spec_dict: dict[str, Any]) -> FineTuneSpec:
    guard = {"minRatedReplies": 30, "maxDownRateIncrease": 0.05, "confidence": 0.95}
    return FineTuneSpec.from_dict({**spec_dict, "promotion": {"feedbackGuard": guard}})


def serving(previous: str | None = V1) -> dict[str, Any]:
    return {"servingVersion": V2, "previousVersion": previous, "approvedVersion": V2,
            "history": [{"job": "j2", "version": V2}, {"job": "j1", "version": V1}]}


def test_spec_defaults_and_opt_in(spec_dict: dict[str, Any]) -> None:
    assert FineTuneSpec.from_dict(spec_dict).promotion.feedback_guard is None
    defaults = FineTuneSpec.from_dict({**spec_dict, "promotion": {"feedbackGuard": {}}}).promotion.feedback_guard
    assert defaults == FeedbackGuardSpec(50, 0.05, 0.95)


def test_p_value_is_the_one_sided_wald_test() -> None:
    new, old = Thumbs(up=16, down=24), Thumbs(up=36, down=4)
    se = (0.6 * 0.4 / 40 + 0.1 * 0.9 / 40) ** 0.5
    assert one_sided_p_value(new, old, 0.05) == pytest.approx(1 - NormalDist().cdf((0.6 - 0.1 - 0.05) / se))
    assert one_sided_p_value(old, new, 0.05) > 0.99  # better, not worse
    assert one_sided_p_value(Thumbs(0, 30), Thumbs(30, 0), 0.05) == 0.0  # no spread: the rise decides
    assert one_sided_p_value(Thumbs(30, 0), Thumbs(30, 0), 0.0) == 1.0


@pytest.mark.parametrize(("new", "old", "decision"), [
    (Thumbs(16, 24), Thumbs(36, 4), "FeedbackRegression"),  # 60 % vs 10 % down
    (Thumbs(36, 4), Thumbs(28, 12), "Keep"),  # liked more
    (Thumbs(33, 7), Thumbs(36, 4), "Keep"),  # 17.5 % vs 10 %: worse, but not clearly beyond the 5-point margin
    (Thumbs(0, 29), Thumbs(36, 4), "Wait"),  # one short of 30 rated replies
    (Thumbs(16, 24), Thumbs(10, 4), "Wait"),  # the previous version has too few
])  # fmt: skip
def test_judge(new: Thumbs, old: Thumbs, decision: str) -> None:
    verdict = judge(GUARD, new, old)
    assert verdict.decision == decision
    assert (verdict.p_value is None) == (decision == "Wait")
    if decision != "Wait":
        assert f"{new.down}/{new.rated}" in verdict.message and "p=" in verdict.message


def test_regression_rolls_back_to_the_previous_version(guarded: FineTuneSpec) -> None:
    counts = thumbs_by_version({"versions": [{"version": V1, "up": 36, "down": 4}, {"version": V2, "up": 16,
                                                                                   "down": 24}]})
    plan = plan_feedback(guarded, serving(), counts, NOW)
    assert (plan.action, plan.version, plan.counters) == ("apply", V1, ["rollback"])
    st = plan.status
    assert st["rollout"] == {"version": V1, "fromVersion": V2, "rollback": True, "reason": "FeedbackRegression",
                             "startedAt": NOW}
    assert (st["approvedVersion"], st["regressedVersion"]) == (V1, V2)
    feedback = st["servingFeedback"]
    assert (feedback["decision"], feedback["up"], feedback["down"], feedback["downRate"]) == (
        "FeedbackRegression", 16, 24, 0.6)
    assert feedback["previous"] == {"up": 36, "down": 4, "downRate": 0.1} and feedback["pValue"] < 0.05
    assert [h.get("feedback", {}).get("down") for h in st["history"]] == [24, 4]
    (event,) = plan.events
    assert (event.type, event.reason) == ("Warning", "FeedbackRegression") and "restoring " + V1 in event.message
    # That version is not promoted again, unless a person pins it.
    desired = Desired(V2, "annotation")
    assert plan_rollout(guarded, desired, V1, {**st, "rollout": None, "servingVersion": V1}, NOW).action == "none"
    pinned = plan_rollout(guarded, Desired(V2, "pinned"), V1, {**st, "rollout": None, "servingVersion": V1}, NOW)
    assert (pinned.action, pinned.version) == ("apply", V2)


def test_a_regression_over_the_base_model_unmounts(guarded: FineTuneSpec) -> None:
    counts = {"base": Thumbs(30, 0), V2: Thumbs(0, 30)}
    plan = plan_feedback(guarded, serving(previous=None), counts, NOW)
    assert (plan.action, plan.version, plan.status["approvedVersion"]) == ("unmount", None, None)
    assert plan.status["servingFeedback"]["previousVersion"] == "base"


def test_keep_and_wait_only_record(guarded: FineTuneSpec) -> None:
    liked = plan_feedback(guarded, serving(), {V1: Thumbs(28, 12), V2: Thumbs(36, 4)}, NOW)
    assert (liked.action, liked.events, liked.status["servingFeedback"]["decision"]) == ("none", [], "Keep")
    assert liked.status["approvedVersion"] == V2 and "rollout" not in liked.status
    few = plan_feedback(guarded, serving(), {V1: Thumbs(28, 12), V2: Thumbs(0, 5)}, NOW)
    assert (few.action, few.status["servingFeedback"]["decision"], few.status["servingFeedback"]["pValue"]) == (
        "none", "Wait", None)


@pytest.mark.parametrize("status", [
    {"servingVersion": None},  # nothing promoted
    {**serving(), "rollout": {"version": V2}},  # a rollout in flight
    {**serving(), "previousVersion": V2},  # after a rollback: nothing to compare
    {**serving(), "regressedVersion": V2},  # pinned back by a person after a regression
])  # fmt: skip
def test_nothing_to_judge(guarded: FineTuneSpec, status: dict[str, Any]) -> None:
    plan = plan_feedback(guarded, status, {V1: Thumbs(0, 50), V2: Thumbs(0, 50)}, NOW)
    assert (plan.action, plan.status) == ("none", status)


def test_off_without_the_guard_or_with_a_pin(spec: FineTuneSpec, spec_dict: dict[str, Any]) -> None:
    counts = {V1: Thumbs(36, 4), V2: Thumbs(16, 24)}
    assert plan_feedback(spec, serving(), counts, NOW).status == serving()
    pinned = FineTuneSpec.from_dict({**spec_dict, "pinnedVersion": V2, "promotion": {"feedbackGuard": {}}})
    assert plan_feedback(pinned, serving(), counts, NOW).action == "none"
