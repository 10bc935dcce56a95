"""The operator killed at every step of its flow, on the real control plane, and restarted (as its Deployment would):
every fault point of finetune_operator.settings.FAULT_POINTS in turn. Whatever step the kill lands on, the end is the
same — each run recorded exactly once, each trained version promoted once (one pod-template change, one ReplicaSet),
a failed rollout rolled back once, the status and the Deployment agreeing on what serves, and a deleted resource's
mount gone.

The flow driven: a CharacterFineTune → Job 1 trains V1 (promoted, rolled out) → Job 2 trains V2 whose pods never
get ready (rolled back to V1 at the progress deadline) → the resource deleted (mount removed, finalizer released).
A test runs the flow up to the phase its fault point is in, and asserts on every phase it ran.
"""

from __future__ import annotations

import inspect
import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from devkit.cluster import Cluster
from devkit.harness import NEVER_READY_ANNOTATION, Env, environment, install_crd, trained, wait_until
from finetune_operator import controller
from finetune_operator.settings import FAULT_POINTS, Settings
from pydantic import ValidationError

V1, V2 = "20261001T030000Z", "20261101T030000Z"
ADAPTER = "llmmultichat.io/adapter-lumina"
# The phase of the flow in which each point is first reached.
PHASE = {point: "promote" for point in FAULT_POINTS} | {"after-rollback-started": "rollback",
                                                        "after-unmount": "delete"}
PHASES = ("promote", "rollback", "delete")
OUR_EVENTS = {"RunTrained", "RunRejected", "RunSkipped", "RunFailed", "Promoting", "Promoted", "RolloutFailed",
              "RolledBack", "Unmounted"}


class Restarter:
    """Plays the Deployment's restart: when the operator process exits, it is started again without the fault."""

    def __init__(self, env: Env) -> None:
        self.env, self.exits = env, []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stopping.wait(0.1):
            process = self.env.operator.process
            if process is not None and process.poll() is not None:
                self.exits.append(process.returncode)
                self.env.operator.start()

    def __enter__(self) -> Restarter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(60)


@pytest.fixture
def env(cluster: Cluster, tmp_path: Path) -> Iterator[Env]:
    install_crd(cluster)
    with environment(cluster, tmp_path, progress_deadline=6) as e:
        yield e


def replica_sets_with(env: Env, version: str) -> int:
    items = env.get("replicasets", "-l", "app=chat")["items"]
    return sum(1 for rs in items if (rs["spec"]["template"]["metadata"].get("annotations") or {}).get(ADAPTER)
               == version)


def serving_flag(env: Env) -> str | None:
    args = env.get("cronjob", "lumina-finetune")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    flags = args["args"]
    return flags[flags.index("--serving-version") + 1] if "--serving-version" in flags else None


def promote(env: Env) -> None:
    env.apply_cft("lumina")
    env.run_job("lumina", "lumina-1", trained("lumina", V1, adapter=2.0))
    env.wait_status("lumina", "Ready on V1", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V1,
                    timeout=90)
    wait_until("the CronJob evaluating against V1", lambda: serving_flag(env) == V1, timeout=60)


def roll_back(env: Env) -> None:
    pod = env.start_job("lumina", "lumina-2")
    env.kubectl("patch", "deployment", "chat", "--type=merge", "-p", json.dumps(
        {"spec": {"template": {"metadata": {"annotations": {NEVER_READY_ANNOTATION: "true"}}}}}))
    env.finish_job(pod, trained("lumina", V2, adapter=1.5, serving=2.0, serving_version=V1))
    env.wait_status("lumina", "V2 rolled back", lambda s: s.get("failedVersion") == V2 and not s.get("rollout")
                    and s.get("servingVersion") == V1, timeout=120)
    # The pods heal; what serves stays V1, V2 is not tried again.
    env.kubectl("patch", "deployment", "chat", "--type=json", "-p", json.dumps(
        [{"op": "remove", "path": "/spec/template/metadata/annotations/podrunner.llmmultichat.io~1never-ready"}]))
    env.wait_status("lumina", "V1 ready again", lambda s: s.get("servingVersion") == V1 and not s.get("rollout")
                    and any(c["type"] == "Ready" and c["status"] == "True" for c in s.get("conditions") or ()),
                    timeout=90)


def delete(env: Env) -> None:
    env.kubectl("delete", "cft", "lumina", "--timeout=90s")
    wait_until("the mount removed", lambda: "/models/lora_lumina" not in env.mounts(), timeout=60)


def check_promoted(env: Env, generation: int) -> None:
    status = env.status("lumina")
    assert [h["job"] for h in status["history"]] == ["lumina-1"]
    assert status["servingVersion"] == V1 and env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V1}"}
    assert env.deployment()["metadata"]["generation"] == generation + 1  # one template change
    assert replica_sets_with(env, V1) == 1
    assert serving_flag(env) == V1


def check_rolled_back(env: Env, generation: int) -> None:
    status = env.status("lumina")
    assert [h["job"] for h in status["history"]] == ["lumina-2", "lumina-1"]
    assert status["servingVersion"] == V1 and status["failedVersion"] == V2
    assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V1}"}
    # Template changes: V1; never-ready; V2; V1 restored (still never-ready); healed (V1's first template again).
    assert env.deployment()["metadata"]["generation"] == generation + 5
    assert replica_sets_with(env, V2) == 1 and replica_sets_with(env, V1) == 2
    assert serving_flag(env) == V1


def check_events(env: Env) -> None:
    """The operator's Events are best effort (one lost with the killed process is acceptable); a repeat is not."""
    ours = [e for e in env.events() if e["reason"] in OUR_EVENTS]
    seen = Counter((e["reason"], e["message"]) for e in ours)
    repeated = {key: n for key, n in seen.items() if n > 1}
    repeated |= {(e["reason"], e["message"]): e["count"] for e in ours if (e.get("count") or 1) > 1}
    assert repeated == {}


@pytest.mark.cluster
@pytest.mark.parametrize("point", FAULT_POINTS)
def test_the_operator_killed_at_any_step_converges_exactly_once(env: Env, point: str) -> None:
    phases = PHASES[: PHASES.index(PHASE[point]) + 1]
    generation = env.deployment()["metadata"]["generation"]
    env.operator.start(FINETUNE_CRASH_POINT=point)
    with Restarter(env) as restarts:
        promote(env)
        if "rollback" in phases:
            check_promoted(env, generation)
            roll_back(env)
        if "delete" in phases:
            check_rolled_back(env, generation)
            check_events(env)
            delete(env)
    assert restarts.exits == [137], f"the operator did not die at {point} exactly once: {restarts.exits}"
    assert f"fault injection: exiting hard at {point}" in env.operator.log_tail(100_000)
    if "delete" in phases:
        assert env.maybe_get("cft", "lumina") is None
        return
    (check_rolled_back if "rollback" in phases else check_promoted)(env, generation)
    check_events(env)


def test_every_fault_point_is_in_the_operator_and_a_typo_is_refused() -> None:
    reached = re.findall(r'self\._crash\("([a-z-]+)"\)', inspect.getsource(controller))
    assert sorted(reached) == sorted(FAULT_POINTS)  # each once, none unlisted
    with pytest.raises(ValidationError, match="unknown fault point"):
        Settings(crash_point="after-cronjob-aplied")
