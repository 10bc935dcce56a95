"""The feedback guard on the real control plane, judging thumbs that users gave through the chat service's API.

Two real chat service processes share one SQLite store: the first serves V1 of both characters, the second V2 (as the
chat pods do before and after a roll), and the replies are rated with POST /v1/feedback. The operator reads the
thumbs per version from the second one (data.historyURL). Planted cases: lumina's V2 is disliked (rolled back),
sora's V2 is liked (kept), and lumina with too few ratings on V2 (no decision).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from devkit.harness import ChatProcess, Env, make_adapter, trained
from devkit.model import ensure_embedded_model

pytestmark = pytest.mark.cluster

V1, V2 = "20261001T030000Z", "20261101T030000Z"
GUARD = {"minRatedReplies": 30, "maxDownRateIncrease": 0.05, "confidence": 0.95}
CHARACTERS = ("lumina", "sora")


def rate_replies(url: str, character: str, *, up: int, down: int) -> None:
    """Chat `up + down` times with `character` and rate each reply: thumbs through the public API."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for rating in ["up"] * up + ["down"] * down:
            body = {"character": character, "message": "こんにちは", "max_tokens": 1, "temperature": 0}
            reply = client.post("/v1/chat", json=body)
            assert reply.status_code == 200, reply.text
            vote = client.post("/v1/feedback", json={"message_id": reply.json()["message_id"], "feedback": rating})
            assert vote.status_code == 200, vote.text


def chat_serving(version: str, tmp_path: Path) -> ChatProcess:
    """The chat service with `version` of both characters mounted, on the shared store."""
    base = ensure_embedded_model(progress=False)
    root = tmp_path / f"models-{version}"
    for seed, character in enumerate(CHARACTERS, start=1):
        make_adapter(base, root, character, version, seed=seed)
    environ = {**os.environ, "BASE_MODEL": str(base), "HF_HUB_OFFLINE": "1", "CHAT_DEVICE": "cpu",
               "CHAT_TORCH_THREADS": "1"}
    process = ChatProcess(["--db", str(tmp_path / "chat.db"), "--adapters-root", str(root)], environ,
                          tmp_path / f"chat-{version}.log").start()
    ready = process.wait_ready()
    assert {c["serving"] for c in ready["characters"].values()} == {version}
    return process


@pytest.fixture
def chat_after_roll(tmp_path: Path) -> Iterator[ChatProcess]:
    """V1's users rated its replies (lumina 4 of 40 down, sora 12 of 40); then V2 serves."""
    first = chat_serving(V1, tmp_path)
    try:
        rate_replies(first.url, "lumina", up=36, down=4)
        rate_replies(first.url, "sora", up=28, down=12)
    finally:
        first.stop()
    second = chat_serving(V2, tmp_path)
    try:
        yield second
    finally:
        second.stop()


def promote_v1_then_v2(env: Env, character: str) -> None:
    env.run_job(character, f"{character}-1", trained(character, V1, adapter=2.2, base=3.1))
    env.wait_status(character, "serving V1", lambda s: s.get("servingVersion") == V1 and not s.get("rollout"))
    env.run_job(character, f"{character}-2", trained(character, V2, adapter=2.0, serving=2.2, serving_version=V1))
    env.wait_status(character, "serving V2 over V1", lambda s: s.get("servingVersion") == V2
                    and s.get("previousVersion") == V1 and not s.get("rollout"))


def judged(env: Env, character: str, decision: str, down: int) -> dict[str, Any]:
    def seen(status: dict[str, Any]) -> bool:
        feedback = status.get("servingFeedback") or {}
        return feedback.get("decision") == decision and feedback.get("down") == down
    return env.wait_status(character, f"feedback guard: {decision}", seen, timeout=60)["servingFeedback"]


def test_guard_rolls_back_a_disliked_version_keeps_a_liked_one_and_waits_for_ratings(
        env: Env, chat_after_roll: ChatProcess) -> None:
    env.operator.start(FINETUNE_FEEDBACK_POLL_SECONDS="0.5")
    data = {"historyURL": chat_after_roll.url, "tokenSecretRef": {"name": "history-token"}}
    for character in CHARACTERS:
        env.apply_cft(character, data=data, promotion={"feedbackGuard": GUARD})
        promote_v1_then_v2(env, character)
    findings: dict[str, Any] = {}

    # Too few ratings on V2 (10, all thumbs-down): no decision, V2 keeps serving.
    rate_replies(chat_after_roll.url, "lumina", up=0, down=10)
    findings["too few"] = judged(env, "lumina", "Wait", down=10)
    assert findings["too few"].get("pValue") is None and env.status("lumina")["servingVersion"] == V2

    # Disliked: 24 of 40 down on V2 against 4 of 40 on V1 — rolled back to V1, and V2 stays out.
    rate_replies(chat_after_roll.url, "lumina", up=16, down=14)
    status = env.wait_status("lumina", "rolled back to V1", lambda s: s.get("servingVersion") == V1
                             and not s.get("rollout") and s.get("regressedVersion") == V2, timeout=60)
    findings["disliked"] = status["servingFeedback"]
    assert findings["disliked"]["decision"] == "FeedbackRegression" and findings["disliked"]["pValue"] < 0.05
    assert status["approvedVersion"] == V1 and env.mounts()["/models/lora_lumina"] == f"lora_lumina/{V1}"
    # The guard decides at the first poll with enough ratings and a significant drop, which may come before the last
    # of the 30 votes above is in: history keeps the counts the decision was made on, not the final ones.
    recorded = {h["version"]: h["feedback"] for h in status["history"]}
    assert recorded[V1]["down"] == 4 and recorded[V2]["down"] == findings["disliked"]["down"]
    assert 14 <= recorded[V2]["down"] <= 24 and recorded[V2]["up"] + recorded[V2]["down"] >= GUARD["minRatedReplies"]
    (event,) = env.events("FeedbackRegression")
    assert event["type"] == "Warning" and event["involvedObject"]["name"] == "lumina"
    assert {"RolledBack"} <= {e["reason"] for e in env.events()}

    # Liked: 4 of 40 down on V2 against 12 of 40 on V1 — kept.
    rate_replies(chat_after_roll.url, "sora", up=36, down=4)
    findings["liked"] = judged(env, "sora", "Keep", down=4)
    assert findings["liked"]["pValue"] > 0.05 and env.status("sora")["servingVersion"] == V2

    metrics = env.operator.metrics()
    assert f'finetune_feedback_regressions_total{{name="lumina",namespace="{env.ns}"}} 1.0' in metrics
    assert f'finetune_feedback_regressions_total{{name="sora",namespace="{env.ns}"}}' not in metrics
    # V2 is not promoted again by the resyncs that follow.
    env.wait_status("lumina", "still V1 after resyncs", lambda s: s.get("servingVersion") == V1, timeout=5)
    assert env.status("lumina")["servingVersion"] == V1 and env.status("lumina")["phase"] == "Ready"
    print("feedback guard decisions:", json.dumps(findings, indent=1))
