"""The API server restarted mid-run, and etcd restarted mid-run, on a real control plane: the operator converges —
each run recorded once, each trained version promoted once (one pod-template change, one ReplicaSet), the status and
the Deployment agreeing on what serves.

A private control plane (its own state dir, ports, etcd data; `devkit.cluster` with $LLMMULTICHAT_CLUSTER_DIR) so
that the restarts do not break other test sessions on the shared one. Each component is stopped (SIGTERM, as a
rolling control-plane upgrade or a crash-looping static pod would), kept away a few seconds, and started again with
its first command line: the same port and certificates, etcd on its data dir. Two moments per component:

- while the trainer Job runs (the operator has seen it; the result comes after the restart);
- between the result and the promotion: the operator is frozen (SIGSTOP) while the pod ends with its result and the
  component stops, and thawed during the outage — so it has certainly not recorded the run or mounted the version
  when the outage begins, and meets it with the result pending.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from devkit.cluster import Cluster
from devkit.harness import Env, environment, install_crd, trained, wait_until

pytestmark = pytest.mark.cluster

V1, V2 = "20261001T030000Z", "20261101T030000Z"
ADAPTER = "llmmultichat.io/adapter-lumina"
DOWN_SECONDS = 5.0


class PrivateControlPlane:
    """`python -m devkit.cluster` on a state dir of its own."""

    def __init__(self, state_dir: Path) -> None:
        self.env = {**os.environ, "LLMMULTICHAT_CLUSTER_DIR": str(state_dir)}
        self.env.pop("KUBECONFIG", None)
        self.state_file = state_dir / "state.json"
        self.kubeconfig = state_dir / "kubeconfig"

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "devkit.cluster", *args], env=self.env, capture_output=True,
                              text=True, timeout=240)
        assert done.returncode == 0, f"devkit.cluster {' '.join(args)}: {done.stderr[-3000:]}"
        return done.stdout

    def process(self, component: str) -> dict[str, object]:
        return dict(json.loads(self.state_file.read_text())["processes"][component])


@pytest.fixture(scope="module")
def private(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PrivateControlPlane, Cluster]]:
    plane = PrivateControlPlane(tmp_path_factory.mktemp("private-cluster") / "cluster")
    plane.cli("up")
    try:
        cluster = Cluster(plane.kubeconfig)
        install_crd(cluster)
        yield plane, cluster
    finally:
        plane.cli("down")


@pytest.fixture
def env(private: tuple[PrivateControlPlane, Cluster], tmp_path: Path) -> Iterator[Env]:
    with environment(private[1], tmp_path) as e:
        yield e


def replica_sets_with(env: Env, version: str) -> int:
    items = env.get("replicasets", "-l", "app=chat")["items"]
    return sum(1 for rs in items if (rs["spec"]["template"]["metadata"].get("annotations") or {}).get(ADAPTER)
               == version)


def ready_on(version: str) -> object:
    return lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == version and not s.get("rollout")


def serving_flag(env: Env) -> str | None:
    container = env.get("cronjob", "lumina-finetune")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    flags = container["containers"][0]["args"]
    return flags[flags.index("--serving-version") + 1] if "--serving-version" in flags else None


def outage(plane: PrivateControlPlane, component: str, thaw: int | None = None) -> float:
    """Stops `component`, keeps it away DOWN_SECONDS (thawing the frozen process `thaw` meanwhile), starts it
    again; checks it came back as itself."""
    before = plane.process(component)
    stopped = time.monotonic()
    plane.cli("stop", component)
    if thaw is not None:
        os.kill(thaw, signal.SIGCONT)
    time.sleep(DOWN_SECONDS)
    plane.cli("start", component)
    after = plane.process(component)
    assert after["pid"] != before["pid"] and after["argv"] == before["argv"]  # same ports, certificates, data dir
    return time.monotonic() - stopped


@pytest.mark.parametrize("component", ["kube-apiserver", "etcd"])
def test_a_control_plane_restart_mid_run_converges_exactly_once(
    private: tuple[PrivateControlPlane, Cluster], env: Env, component: str
) -> None:
    plane = private[0]
    generation = env.deployment()["metadata"]["generation"]
    env.operator.start()
    env.apply_cft("lumina")

    # 1. While the trainer Job runs.
    pod = env.start_job("lumina", "lumina-1")
    env.wait_status("lumina", "the Job seen", lambda s: (s.get("activeRun") or {}).get("job") == "lumina-1")
    away = outage(plane, component)
    back = time.monotonic()
    env.finish_job(pod, trained("lumina", V1, adapter=2.0))
    env.wait_status("lumina", "Ready on V1", ready_on(V1), timeout=180)
    print(f"{component} away {away:.1f}s while the Job ran; V1 Ready {time.monotonic() - back:.1f}s after it was "
          "back")

    # 2. Between the result and the promotion.
    pod = env.start_job("lumina", "lumina-2")
    assert env.operator.process is not None
    os.kill(env.operator.process.pid, signal.SIGSTOP)
    try:
        env.finish_job(pod, trained("lumina", V2, adapter=1.5, serving=2.0, serving_version=V1))
        away = outage(plane, component, thaw=env.operator.process.pid)
    finally:
        os.kill(env.operator.process.pid, signal.SIGCONT)
    back = time.monotonic()
    status = env.wait_status("lumina", "Ready on V2", ready_on(V2), timeout=180)
    print(f"{component} away {away:.1f}s between result and promotion; V2 Ready {time.monotonic() - back:.1f}s "
          "after it was back")

    assert [h["job"] for h in status["history"]] == ["lumina-2", "lumina-1"]
    assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V2}"}
    assert env.deployment()["spec"]["template"]["metadata"]["annotations"][ADAPTER] == V2
    assert env.deployment()["metadata"]["generation"] == generation + 2  # one template change per promotion
    assert replica_sets_with(env, V1) == 1 and replica_sets_with(env, V2) == 1
    wait_until("the CronJob evaluating against V2", lambda: serving_flag(env) == V2, timeout=30)
    promoted = Counter(e["message"] for e in env.events("Promoted"))
    assert all(n == 1 for n in promoted.values()) and all((e.get("count") or 1) == 1 for e in env.events("Promoted"))
    assert env.operator.process is not None and env.operator.process.poll() is None, env.operator.log_tail()
