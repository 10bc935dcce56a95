"""The feedback guard (opt-in `promotion.feedbackGuard`), pure: from users' thumbs per adapter version, as the chat
service counts them (`GET /v1/characters/{name}/feedback`), to what the status should say and whether the version
that serves now must be rolled back.

The test: H0 "the new version's thumbs-down rate exceeds the previous version's by at most `maxDownRateIncrease`"
against H1 "by more", a one-sided two-proportion z-test (Wald, unpooled variances — under H0 the rates may differ
by the margin, so they are not pooled). The version is rolled back with reason `FeedbackRegression` when the p-value
is below 1 - `confidence`, and only once both versions have `minRatedReplies` rated replies.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .spec import FeedbackGuardSpec, FineTuneSpec
from .status import Event, Plan

BASE = "base"  # the chat service's version name for replies of the base model
Decision = Literal["Wait", "Keep", "FeedbackRegression"]


@dataclass(frozen=True)
class Thumbs:
    up: int = 0
    down: int = 0

    @property
    def rated(self) -> int:
        return self.up + self.down

    @property
    def down_rate(self) -> float | None:
        return self.down / self.rated if self.rated else None


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    p_value: float | None
    message: str


def thumbs_by_version(body: Mapping[str, Any]) -> dict[str, Thumbs]:
    """The chat service's answer as {version: Thumbs}; replies imported without a version are left out."""
    return {v["version"]: Thumbs(int(v["up"]), int(v["down"])) for v in body.get("versions") or () if v.get("version")}


def one_sided_p_value(new: Thumbs, old: Thumbs, margin: float) -> float:
    """P(observing this big a rise | the true rise is `margin`): small means the new version is worse by more."""
    p_new, p_old = new.down / new.rated, old.down / old.rated
    se = math.sqrt(p_new * (1 - p_new) / new.rated + p_old * (1 - p_old) / old.rated)
    rise = p_new - p_old - margin
    if se == 0.0:  # both rates are 0 or 1: no spread, the rise itself decides
        return 0.0 if rise > 0 else 1.0
    return 0.5 * math.erfc(rise / se / math.sqrt(2))  # 1 - Φ(z)


def judge(guard: FeedbackGuardSpec, new: Thumbs, old: Thumbs) -> Verdict:
    """Wait for enough ratings on both versions, then keep the new version or call it a regression."""
    if new.rated < guard.min_rated_replies or old.rated < guard.min_rated_replies:
        return Verdict("Wait", None, f"{new.rated} and {old.rated} rated replies; "
                                     f"{guard.min_rated_replies} each are needed")
    p = one_sided_p_value(new, old, guard.max_down_rate_increase)
    rates = f"thumbs-down {new.down}/{new.rated} ({new.down_rate:.1%}) vs {old.down}/{old.rated} ({old.down_rate:.1%})"
    test = f"one-sided z-test p={p:.3g}, margin {guard.max_down_rate_increase:.1%}, confidence {guard.confidence:.0%}"
    if p < 1 - guard.confidence:
        return Verdict("FeedbackRegression", p, f"{rates}: worse beyond the margin ({test})")
    return Verdict("Keep", p, f"{rates}: not shown worse beyond the margin ({test})")


def guarded_versions(spec: FineTuneSpec, status: Mapping[str, Any]) -> tuple[str, str] | None:
    """(serving, previous) when the guard has something to judge: an opt-in resource serving an adapter it promoted
    (not a pin, nothing rolling out) over another version or the base model."""
    serving = status.get("servingVersion")
    if spec.promotion.feedback_guard is None or spec.pinned_version or status.get("rollout") or not serving:
        return None
    previous = status.get("previousVersion") or BASE
    if previous == serving or serving == status.get("regressedVersion"):
        return None
    return serving, previous


def feedback_record(thumbs: Thumbs) -> dict[str, Any]:
    return {"up": thumbs.up, "down": thumbs.down, "downRate": thumbs.down_rate}


def plan_feedback(spec: FineTuneSpec, status: Mapping[str, Any], counts: Mapping[str, Thumbs], now: str) -> Plan:
    """Record the thumbs (servingFeedback, and each run's in history), and on a regression start the rollback to the
    previous version: its approval moves back to that version, so the disliked one is not promoted again."""
    st = copy.deepcopy(dict(status))
    versions = guarded_versions(spec, st)
    if versions is None or spec.promotion.feedback_guard is None:
        return Plan("none", st)
    serving, previous = versions
    new, old = counts.get(serving, Thumbs()), counts.get(previous, Thumbs())
    verdict = judge(spec.promotion.feedback_guard, new, old)
    st["servingFeedback"] = {"version": serving, **feedback_record(new), "previousVersion": previous,
                             "previous": feedback_record(old), "pValue": verdict.p_value,
                             "decision": verdict.decision, "message": verdict.message, "checkedAt": now}
    st["history"] = [{**run, "feedback": feedback_record(counts[run["version"]])} if run.get("version") in counts
                     else run for run in st.get("history") or ()]
    if verdict.decision != "FeedbackRegression":
        return Plan("none", st)
    back = None if previous == BASE else previous
    st["approvedVersion"] = back
    st["regressedVersion"] = serving
    st["rollout"] = {"version": back or "", "fromVersion": serving, "rollback": True, "reason": "FeedbackRegression",
                     "startedAt": now}
    event = Event("Warning", "FeedbackRegression",
                  f"users like {serving} less than {previous}: {verdict.message}; restoring {back or 'the base model'}")
    return Plan("apply" if back else "unmount", st, version=back, events=[event], counters=["rollback"])
