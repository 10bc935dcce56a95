"""The local control plane behaves as a real cluster: real API server, controllers and scheduler, kwok nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from devkit.cluster import Cluster
from devkit.podrunner import (
    NEVER_READY_ANNOTATION,
    PodRunError,
    pvc_local_path,
    release_pod,
    run_pod,
    start_pod_process,
    wait_for_pod,
)

pytestmark = pytest.mark.cluster

IMAGE = "registry.invalid/never-pulled:1"


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[str]:
    name = f"cp-test-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(name)
    yield name
    cluster.delete_namespace(name)


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.25)
    return value


def container(command: list[str], **extra: Any) -> dict[str, Any]:
    return {"name": "main", "image": IMAGE, "command": command, **extra}


def job(name: str, spec: dict[str, Any], labels: dict[str, str] | None = None) -> dict[str, Any]:
    labels = labels or {"app": name}
    template = {"metadata": {"labels": labels},
                "spec": {"restartPolicy": "Never", "containers": [container(["sleep", "3600"])]} | spec}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
            "spec": {"backoffLimit": 0, "template": template}}


def job_condition(cluster: Cluster, ns: str, name: str) -> str | None:
    conditions = cluster.get_json("job", name, "-n", ns)["status"].get("conditions") or []
    done = [c["type"] for c in conditions if c["type"] in ("Complete", "Failed") and c["status"] == "True"]
    return done[0] if done else None


def terminated(cluster: Cluster, ns: str, pod: str) -> dict[str, Any]:
    status = cluster.get_json("pod", pod, "-n", ns)["status"]
    return dict(status["containerStatuses"][0]["state"]["terminated"])


@pytest.fixture(scope="module", autouse=True)
def ticking_cronjob(cluster: Cluster) -> Iterator[str]:
    """A `* * * * *` CronJob made before the other tests run, so that its first minute boundary passes meanwhile
    (its test comes last)."""
    name = f"cp-cron-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(name)
    template = job("unused", {})["spec"]
    cluster.apply({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "tick"},
                   "spec": {"schedule": "* * * * *", "concurrencyPolicy": "Forbid", "jobTemplate": {"spec": template}}},
                  namespace=name)
    yield name
    cluster.delete_namespace(name)


def test_nodes_are_ready_with_gpu_capacity(cluster: Cluster) -> None:
    nodes = {n["metadata"]["name"]: n for n in cluster.get_json("nodes")["items"]}
    assert {"gpu-node-1", "gpu-node-2", "cpu-node-1"} <= set(nodes)
    for name, node in nodes.items():
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", name
    for name in ("gpu-node-1", "gpu-node-2"):
        node = nodes[name]
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "2"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "2"
        assert node["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
    assert "nvidia.com/gpu" not in nodes["cpu-node-1"]["status"]["capacity"]
    table = cluster.kubectl("get", "nodes").stdout
    assert all(f"{name}   Ready" in table for name in ("gpu-node-1", "gpu-node-2", "cpu-node-1")), table
    # The server really is the pinned release, built from source.
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert server["gitVersion"].startswith("v1.") and server["gitTreeState"] == "clean"


def deployment(name: str, replicas: int, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}, "annotations": annotations or {}},
                                  "spec": {"containers": [container(["serve"], env=[{"name": "V", "value": "1"}])]}}}}


def test_deployment_becomes_available_and_rolls_to_new_replicaset(cluster: Cluster, ns: str) -> None:
    cluster.apply(deployment("web", 2), namespace=ns)
    cluster.kubectl("rollout", "status", "deployment/web", "-n", ns, "--timeout=60s")
    status = cluster.get_json("deployment", "web", "-n", ns)["status"]
    assert status["availableReplicas"] == 2
    first = {rs["metadata"]["name"] for rs in cluster.get_json("rs", "-n", ns, "-l", "app=web")["items"]}
    assert len(first) == 1

    cluster.kubectl("set", "env", "deployment/web", "-n", ns, "V=2")
    cluster.kubectl("rollout", "status", "deployment/web", "-n", ns, "--timeout=60s")
    sets = {rs["metadata"]["name"]: rs for rs in cluster.get_json("rs", "-n", ns, "-l", "app=web")["items"]}
    new = [name for name in sets if name not in first]
    assert len(new) == 1
    assert sets[new[0]]["status"].get("readyReplicas") == 2
    assert sets[first.pop()]["spec"]["replicas"] == 0
    pods = cluster.get_json("pods", "-n", ns, "-l", "app=web")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(live) == 2
    assert all(p["metadata"]["labels"]["pod-template-hash"] in new[0] for p in live)


def test_never_ready_pods_keep_a_rollout_unavailable(cluster: Cluster, ns: str) -> None:
    cluster.apply(deployment("stuck", 1, {NEVER_READY_ANNOTATION: "true"}), namespace=ns)
    pod = wait_for_pod(cluster, ns, "app=stuck")
    conditions = {c["type"]: c["status"] for c in cluster.get_json("pod", pod, "-n", ns)["status"]["conditions"]}
    assert conditions["Ready"] == "False"
    rollout = cluster.kubectl("rollout", "status", "deployment/stuck", "-n", ns, "--timeout=3s", check=False)
    assert rollout.returncode != 0
    assert cluster.get_json("deployment", "stuck", "-n", ns)["status"].get("availableReplicas", 0) == 0


@pytest.mark.parametrize(("exit_code", "outcome"), [(0, "Complete"), (3, "Failed")])
def test_released_job_ends_with_chosen_exit_code_and_message(cluster: Cluster, ns: str, exit_code: int,
                                                             outcome: str) -> None:
    cluster.apply(job("work", {}), namespace=ns)
    pod = wait_for_pod(cluster, ns, "job-name=work")
    time.sleep(1)
    # Held: kwok keeps Job pods Running until they are released.
    assert cluster.get_json("pod", pod, "-n", ns)["status"]["phase"] == "Running"
    message = json.dumps({"outcome": "trained" if exit_code == 0 else "failed", "reason": "ünïcode \"quotes\"\n"})
    release_pod(cluster, ns, pod, exit_code=exit_code, message=message)
    wait_for(f"job to be {outcome}", lambda: job_condition(cluster, ns, "work") == outcome)
    state = terminated(cluster, ns, pod)
    assert state["exitCode"] == exit_code
    assert state["message"] == message
    assert cluster.get_json("pod", pod, "-n", ns)["status"]["phase"] == ("Succeeded" if exit_code == 0 else "Failed")
    with pytest.raises(PodRunError, match="already ended"):
        release_pod(cluster, ns, pod, exit_code=0, message="twice")
    with pytest.raises(PodRunError, match=r"0\.\.255"):
        release_pod(cluster, ns, pod, exit_code=256, message="")


def test_run_pod_runs_the_container_command_locally(cluster: Cluster, ns: str) -> None:
    cluster.apply([
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tok"}, "stringData": {"token": "s3cret"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"}, "data": {"greeting": "hello"}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "data"},
         "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
    ], namespace=ns)
    script = (
        "import os, sys, json\n"
        "out = sys.argv[1]\n"
        "os.makedirs(out, exist_ok=True)\n"
        "open(os.path.join(out, 'result.txt'), 'w').write(os.environ['GREETING'] + ' ' + os.environ['TOKEN'])\n"
        "open(sys.argv[2], 'w').write(json.dumps({'wrote': out, 'mode': os.environ['MODE']}))\n"
        "print('done'); sys.exit(3)\n"
    )
    spec = {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
            "containers": [container(
                ["python", "-c", script], args=["/data/run-1", "$(RESULT)"],
                env=[{"name": "RESULT", "value": "/dev/termination-log"},
                     {"name": "MODE", "value": "pod"},
                     {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "tok", "key": "token"}}},
                     {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}}],
                volumeMounts=[{"name": "data", "mountPath": "/data"}])]}
    cluster.apply(job("runner", spec), namespace=ns)
    pod = wait_for_pod(cluster, ns, "job-name=runner")

    result = run_pod(cluster, ns, pod, env_overrides={"MODE": "local"})

    assert result.exit_code == 3
    assert result.stdout.strip() == "done"
    reported = json.loads(result.message)
    assert reported["mode"] == "local"
    local = pvc_local_path(cluster, ns, "data")
    assert (local / "run-1" / "result.txt").read_text() == "hello s3cret"
    # The path the process saw was the sandbox's view of the claim, not the container path.
    assert reported["wrote"].endswith("/data/run-1") and reported["wrote"] != "/data/run-1"
    wait_for("job to fail", lambda: job_condition(cluster, ns, "runner") == "Failed")
    state = terminated(cluster, ns, pod)
    assert (state["exitCode"], state["message"]) == (3, result.message)


def test_start_pod_process_runs_a_deployment_pod_until_stopped(cluster: Cluster, ns: str) -> None:
    serve = deployment("svc", 1)
    serve["spec"]["template"]["spec"]["containers"][0]["command"] = [
        "python3", "-c", "import os, time; print('serving', os.environ['V'], flush=True); time.sleep(120)"]
    cluster.apply(serve, namespace=ns)
    pod = wait_for_pod(cluster, ns, "app=svc")
    local = start_pod_process(cluster, ns, pod, env_overrides={"V": "local"})
    try:
        wait_for("the process to print", lambda: local.stdout_path.read_text().strip() == "serving local", 20)
        assert local.process.poll() is None
    finally:
        local.stop()
    assert local.process.returncode is not None and not local.sandbox.exists()


def gpu_pod(name: str, gpus: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [container(["train"], resources={"limits": {"nvidia.com/gpu": str(gpus)}})],
                     "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}}


def test_gpu_pods_schedule_on_gpu_nodes_or_stay_unschedulable(cluster: Cluster, ns: str) -> None:
    cluster.apply([gpu_pod("one-gpu", 1), gpu_pod("too-many", 3)], namespace=ns)
    wait_for("one-gpu to run", lambda: cluster.get_json("pod", "one-gpu", "-n", ns)["status"].get("phase") == "Running")
    assert cluster.get_json("pod", "one-gpu", "-n", ns)["spec"]["nodeName"] in ("gpu-node-1", "gpu-node-2")

    def unschedulable() -> bool:
        status = cluster.get_json("pod", "too-many", "-n", ns)["status"]
        return any(c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable"
                   for c in status.get("conditions") or [])

    wait_for("too-many to be marked Unschedulable", unschedulable)
    pod = cluster.get_json("pod", "too-many", "-n", ns)
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
    assert "nvidia.com/gpu" in pod["status"]["conditions"][0]["message"]


def test_deleting_an_owner_garbage_collects_what_it_owns(cluster: Cluster, ns: str) -> None:
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}, namespace=ns)
    uid = cluster.get_json("configmap", "owner", "-n", ns)["metadata"]["uid"]
    owned = {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "owned", "ownerReferences": [
                 {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}}
    cluster.apply([owned, deployment("gone", 1), job("gone-job", {}, labels={"app": "gone"})], namespace=ns)
    wait_for_pod(cluster, ns, "app=gone,job-name=gone-job")
    wait_for_pod(cluster, ns, "app=gone,!job-name")

    cluster.kubectl("delete", "configmap", "owner", "-n", ns)
    # A Job's running pod carries the Job controller's tracking finalizer: it goes only once it has ended.
    cluster.kubectl("delete", "deployment/gone", "job/gone-job", "-n", ns, "--wait=false")

    def collected() -> bool:
        owned_left = cluster.kubectl("get", "configmap", "owned", "-n", ns, check=False)
        pods_left = cluster.kubectl("get", "rs,pods", "-n", ns, "-l", "app=gone", "-o", "name").stdout.strip()
        return "NotFound" in owned_left.stderr and not pods_left

    wait_for("the garbage collector to delete the owned objects", collected)


def test_cluster_up_twice_is_harmless_and_down_leaves_nothing(tmp_path: Path) -> None:
    """A second, separate cluster (its own state dir and ports), so the shared one keeps serving other tests."""
    env = {**os.environ, "LLMMULTICHAT_CLUSTER_DIR": str(tmp_path / "cluster")}
    env.pop("KUBECONFIG", None)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "devkit.cluster", *args], env=env, capture_output=True,
                              text=True, timeout=180, check=True)

    def pids() -> dict[str, int]:
        return {name: proc["pid"] for name, proc in json.loads(cli("status").stdout)["processes"].items()
                if proc["alive"]}

    cli("up")
    try:
        first = pids()
        assert set(first) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
        assert "already running" in cli("up").stderr
        assert pids() == first
    finally:
        cli("down")
    # Gone, or a zombie whose new parent (the container's init) has not reaped it yet.
    assert not [pid for pid in first.values()
                if Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().rsplit(")")[1].split()[0]
                != "Z"]
    assert json.loads(cli("status").stdout) == {"running": False}
    assert not (tmp_path / "cluster" / "etcd").exists() and not (tmp_path / "cluster" / "kubeconfig").exists()


def test_cronjob_spawns_jobs_on_schedule_and_on_demand(cluster: Cluster, ticking_cronjob: str) -> None:
    ns = ticking_cronjob
    cluster.kubectl("create", "job", "now", "--from=cronjob/tick", "-n", ns)
    owner = cluster.get_json("job", "now", "-n", ns)["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"]) == ("CronJob", "tick")
    pod = wait_for_pod(cluster, ns, "job-name=now")
    release_pod(cluster, ns, pod, exit_code=0, message="on demand")
    wait_for("job now to complete", lambda: job_condition(cluster, ns, "now") == "Complete")

    def scheduled() -> list[str]:
        jobs = cluster.get_json("jobs", "-n", ns)["items"]
        return [j["metadata"]["name"] for j in jobs if j["metadata"]["name"].startswith("tick-")]

    # The controller creates the first Job at the first minute boundary after the CronJob was made.
    names = wait_for("the CronJob to spawn a Job by itself", scheduled, timeout=75)
    assert cluster.get_json("cronjob", "tick", "-n", ns)["status"].get("lastScheduleTime")
    wait_for_pod(cluster, ns, f"job-name={names[0]}")
