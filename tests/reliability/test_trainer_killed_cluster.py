"""The trainer killed (SIGKILL: an OOM kill, a node loss) in each phase of its run — collect, train, evaluate, publish
— on the real control plane with the real operator: the run is recorded `failed` with a reason that says what ended
it, no partial version is visible on the adapter volume, and the serving adapter and the Deployment are untouched.

The trainer pod is the operator's own Job pod, run as a local process from its pod spec (devkit.podrunner: the
adapter claim is the volume's host directory, the termination message falls back to the log tail as a kubelet's
does), reading a real chat service's history API. The test-only `TRAINING_TEST_PAUSE=<phase>:<s>` holds it at a
point inside the phase (training.pausing), where it is killed.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from devkit.cluster import Cluster
from devkit.conversations import generate_history
from devkit.harness import ChatProcess, Env, environment, install_crd, make_adapter, trained, wait_until
from devkit.model import ensure_embedded_model
from devkit.podrunner import pvc_local_path, run_pod
from finetune_operator.status import run_event

pytestmark = pytest.mark.cluster

V1 = "20261001T030000Z"
TOKEN = "s3cret"  # the harness's history-token Secret
PHASES = ("collect", "train", "evaluate", "publish")


@pytest.fixture(scope="module")
def base_model() -> Path:
    return ensure_embedded_model(progress=False)


@pytest.fixture(scope="module")
def history_url(tmp_path_factory: pytest.TempPathFactory, base_model: Path) -> Iterator[str]:
    """A real chat service holding 40 sessions of Lumina's conversations (enough for 30 training examples)."""
    tmp = tmp_path_factory.mktemp("chat")
    env = {**os.environ, "HISTORY_TOKEN": TOKEN, "BASE_MODEL": str(base_model), "HF_HUB_OFFLINE": "1",
           "CHAT_TORCH_THREADS": "1"}
    chat = ChatProcess(["--db", str(tmp / "chat.db")], env, tmp / "chat.log").start()
    try:
        wait_until("the chat service's liveness", lambda: _answers(chat.url), timeout=180)
        end = datetime.now(UTC)
        messages = generate_history("lumina", sessions=40, seed=3, start=end - timedelta(days=20), end=end)
        body = {"messages": [{k: v for k, v in m.items() if k != "id"} for m in messages]}
        response = httpx.post(f"{chat.url}/v1/history", json=body, headers={"Authorization": f"Bearer {TOKEN}"},
                              timeout=60)
        assert response.status_code == 201, response.text
        yield chat.url
    finally:
        chat.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def env(cluster: Cluster, tmp_path: Path) -> Iterator[Env]:
    install_crd(cluster)
    with environment(cluster, tmp_path) as e:
        yield e


def serving_v1(env: Env, base_model: Path, history_url: str) -> Path:
    """V1 published on the adapter volume (a real adapter: evaluation loads it) and promoted by the operator."""
    character_dir = pvc_local_path(env.cluster, env.ns, "adapters") / "lora_lumina"
    made = make_adapter(base_model, env.tmp / "made", "lumina", V1)
    character_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(made, character_dir / V1)
    env.apply_cft("lumina", baseModel=str(base_model),
                  data={"historyURL": history_url, "tokenSecretRef": {"name": "history-token"}, "minExamples": 30},
                  training={"epochs": 1, "batchSize": 8, "backoffLimit": 0})
    env.run_job("lumina", "lumina-1", trained("lumina", V1, adapter=2.0))
    env.wait_status("lumina", "Ready on V1", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V1,
                    timeout=90)
    return character_dir


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class KillAt:
    """`run_pod`'s line hook: SIGKILL the trainer once it says it is paused in `phase`."""

    def __init__(self, phase: str) -> None:
        self.phase, self.killed_at = phase, None

    def __call__(self, line: str, process: subprocess.Popen[str]) -> None:
        if self.killed_at is None and line.startswith(f"{self.phase}: paused"):
            self.killed_at = time.monotonic()
            process.send_signal(signal.SIGKILL)


@pytest.mark.parametrize("phase", PHASES)
def test_the_trainer_killed_in_any_phase_fails_the_run_and_leaves_what_serves(
    env: Env, base_model: Path, history_url: str, phase: str
) -> None:
    env.operator.start()
    character_dir = serving_v1(env, base_model, history_url)
    serving_files = snapshot(character_dir / V1)
    deployment = env.deployment()
    started = time.monotonic()

    pod = env.start_job("lumina", "lumina-2")
    kill = KillAt(phase)
    run = run_pod(env.cluster, env.ns, pod, env_overrides={"HF_HUB_OFFLINE": "1", "TRAINING_TEST_PAUSE":
                                                           f"{phase}:300"}, timeout=600, on_line=kill)
    assert kill.killed_at is not None, f"the trainer never reached {phase}:\n{run.stdout[-2000:]}{run.stderr[-3000:]}"
    assert run.exit_code == 137

    status = env.wait_status("lumina", "the killed run recorded",
                             lambda s: (s.get("lastRun") or {}).get("job") == "lumina-2", timeout=60)
    print(f"{phase}: killed {kill.killed_at - started:.1f}s after the Job started; failed run recorded "
          f"{time.monotonic() - kill.killed_at:.1f}s after the kill")
    last = status["lastRun"]
    assert last["outcome"] == "failed" and last["exitCode"] == 137 and not last.get("version")
    assert last["reason"].startswith("killed by SIGKILL (out of memory, eviction, node loss, or deleted past its "
                                     "grace period), exit code 137: last log lines: ")
    assert [h["job"] for h in status["history"]] == ["lumina-2", "lumina-1"]
    # No partial version: only V1 is a version; anything else is a hidden work directory readers skip.
    assert sorted(p.name for p in character_dir.iterdir() if not p.name.startswith(".")) == [V1]
    if phase == "publish":
        assert [p.name for p in character_dir.iterdir() if p.name.startswith(".tmp-")]  # killed before the rename
    assert snapshot(character_dir / V1) == serving_files
    assert status["servingVersion"] == V1 and env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V1}"}
    after = env.deployment()
    assert after["metadata"]["generation"] == deployment["metadata"]["generation"]
    assert json.dumps(after["spec"]["template"]) == json.dumps(deployment["spec"]["template"])
    failed_events = wait_until("the RunFailed Event", lambda: env.events("RunFailed"), timeout=30)
    assert [e["message"] for e in failed_events] == [run_event(last).message]  # fitted to the API's 1024 bytes
    assert len(env.events("Promoting")) <= 1  # V1's, if its Event made it; nothing for the killed run


def test_every_pause_point_is_in_the_trainer() -> None:
    """Each phase's pause point is reached from the trainer's code (a phase without one would never be killed)."""
    from training import pausing, pipeline, publish, train

    sources = "".join(inspect.getsource(m) for m in (pipeline, publish, train))
    assert sorted(p for p in pausing.PHASES if f'pause_point("{p}"' in sources) == sorted(PHASES)
