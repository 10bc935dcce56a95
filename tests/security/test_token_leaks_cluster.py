"""The history token never leaves its Secret: after real training runs (the trainer pods run as local processes,
reading a real chat service's history API with the token from the Secret), neither the operator's log, the resource
(status included), the Events, the CronJob, the Jobs and pods (termination messages included), the trainer's output
and result nor the chat service's log contain it — not the right token, and not a wrong one that was refused."""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from devkit.cluster import Cluster
from devkit.harness import ChatProcess, Env, environment, install_crd, log_tail, wait_until
from devkit.model import ensure_embedded_model
from devkit.podrunner import run_pod

pytestmark = pytest.mark.cluster


def chat_service(tmp_path: Path, token: str) -> ChatProcess:
    """The real chat service on the embedded model (a base model it cannot load stops it at once, by design)."""
    env = {**os.environ, "HISTORY_TOKEN": token, "BASE_MODEL": str(ensure_embedded_model(progress=False)),
           "HF_HUB_OFFLINE": "1"}
    chat = ChatProcess(["--db", str(tmp_path / "chat.db")], env, tmp_path / "chat.log").start()
    wait_until("the chat service's liveness", lambda: _answers(chat.url), timeout=180)
    return chat


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def import_sessions(url: str, token: str, character: str, sessions: int) -> None:
    now = datetime.now(UTC)
    messages = []
    for n in range(sessions):
        at = (now - timedelta(hours=n + 1)).isoformat()
        messages += [{"session_id": f"s{n}", "character": character, "role": "user", "content": f"hi {n}",
                      "created_at": at},
                     {"session_id": f"s{n}", "character": character, "role": "assistant", "content": f"hello {n}",
                      "created_at": at}]
    response = httpx.post(f"{url}/v1/history", json={"messages": messages},
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert response.status_code == 201, response.text


def train_now(env: Env, name: str, job: str) -> tuple[dict[str, Any], str]:
    """Starts a Job from the CronJob and runs its pod to the end; (its result, everything the trainer printed)."""
    pod = env.start_job(name, job)
    run = run_pod(env.cluster, env.ns, pod, env_overrides={"HF_HUB_OFFLINE": "1"}, timeout=300)
    return json.loads(run.message), "\n".join((run.message, run.stdout, run.stderr))


def everything_written(env: Env) -> dict[str, str]:
    """What a person (or a log collector) can read without the Secret."""
    kinds = "characterfinetunes,cronjobs,jobs,pods,events,deployments"
    return {"operator log": log_tail(env.operator.log_path, lines=100_000),
            "API objects": env.kubectl("get", kinds, "-o", "json").stdout}


def test_the_history_token_is_in_no_log_status_event_or_result(cluster: Cluster, tmp_path: Path) -> None:
    token, wrong = f"tok-{uuid.uuid4().hex}{uuid.uuid4().hex}", f"wrong-{uuid.uuid4().hex}"
    install_crd(cluster)
    chat = chat_service(tmp_path, token)
    try:
        with environment(cluster, tmp_path) as env:
            for secret, value in (("history-token", token), ("wrong-token", wrong)):
                manifest = env.kubectl("create", "secret", "generic", secret, f"--from-literal=token={value}",
                                       "--dry-run=client", "-o", "yaml").stdout
                env.kubectl("apply", "-f", "-", input=manifest)
            import_sessions(chat.url, token, "lumina", sessions=5)
            env.operator.start()
            for name, secret in (("lumina", "history-token"), ("sora", "wrong-token")):
                # backoffLimit 0: a failed run is one pod, not a retry that nobody runs here.
                env.apply_cft(name, data={"historyURL": chat.url, "tokenSecretRef": {"name": secret},
                                          "minExamples": 100}, training={"backoffLimit": 0})
            lumina, lumina_output = train_now(env, "lumina", "lumina-1")
            sora, sora_output = train_now(env, "sora", "sora-1")
            # The token was used for real: lumina's run read the history (too little of it), sora's was refused.
            assert lumina["outcome"] == "skipped" and "5 < 100" in lumina["reason"], lumina
            assert sora["outcome"] == "failed" and "401" in sora["reason"], sora
            for name, job in (("lumina", "lumina-1"), ("sora", "sora-1")):
                env.wait_status(name, "run recorded", lambda s, job=job: (s.get("lastRun") or {}).get("job") == job)
            written = {**everything_written(env), "lumina trainer": lumina_output, "sora trainer": sora_output}
    finally:
        chat.stop()
    written["chat service log"] = log_tail(chat.log_path, lines=100_000)
    assert all(written.values())
    leaks = {where: [name for name, value in (("token", token), ("wrong token", wrong)) if value in text]
             for where, text in written.items()}
    assert {where: found for where, found in leaks.items() if found} == {}
