"""Latency of the operator on the real control plane, measured over >= 20 runs (the issue's numbers):

- apply → CronJob: from creating a CharacterFineTune to its CronJob existing;
- Job completion → Deployment patched: from the Job's Complete condition (as seen by polling the API) to the chat
  Deployment's pod template carrying the new version; also reported from the trainer pod's termination.

Prints the numbers and writes them as JSON to $FINETUNE_LATENCY_OUT (default: the test's tmp dir). The bounds
asserted are loose (this machine is shared); the point is the measurement.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import pytest
from devkit.harness import Env, trained, wait_until
from finetune_operator.kube import Kube, cft_path, cronjob_path, deployment_path, jobs_path, pods_path
from kubernetes import config as k8s_config

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
RUNS = 20


def admin_kube(env: Env) -> Kube:
    return Kube(k8s_config.new_client_from_config(config_file=str(env.cluster.kubeconfig)))


def cft(name: str) -> dict[str, Any]:
    return {"apiVersion": "llmmultichat.io/v1alpha1", "kind": "CharacterFineTune", "metadata": {"name": name},
            "spec": {"character": name, "data": {"historyURL": "http://chat:8000",
                                                 "tokenSecretRef": {"name": "history-token"}},
                     "adapterStorage": {"claimName": "adapters"}, "target": {"deployment": "chat"}}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": statistics.median(values), "p90": percentile(values, 0.9),
            "min": min(values), "max": max(values)}


def test_latency(env: Env, tmp_path: Path) -> None:
    env.operator.start()
    kube = admin_kube(env)
    ns = env.ns

    # apply → CronJob
    apply_to_cronjob: list[float] = []
    for i in range(RUNS):
        name = f"lat{i}"
        t0 = time.monotonic()
        kube.request("POST", cft_path(ns), body=cft(name))
        wait_until(f"CronJob {name}", lambda n=name: kube.get(cronjob_path(ns, f"{n}-finetune")), timeout=30,
                   interval=0.01)
        apply_to_cronjob.append(time.monotonic() - t0)

    # Job completion → Deployment patched (one resource, each run better than the last)
    job_to_patch: list[float] = []
    pod_to_patch: list[float] = []
    cronjob = kube.get(cronjob_path(ns, "lat0-finetune"))
    assert cronjob is not None
    for i in range(RUNS):
        version = f"202612{i + 1:02d}T030000Z"
        template = cronjob["spec"]["jobTemplate"]
        # What `kubectl create job --from=cronjob/...` creates: the template, owned by the CronJob.
        owner = {"apiVersion": "batch/v1", "kind": "CronJob", "name": cronjob["metadata"]["name"],
                 "uid": cronjob["metadata"]["uid"], "controller": True}
        job = {"apiVersion": "batch/v1", "kind": "Job",
               "metadata": {"name": f"lat0-run-{i}", "labels": template["metadata"]["labels"],
                            "ownerReferences": [owner]},
               "spec": template["spec"]}
        created = kube.request("POST", jobs_path(ns), body=job)
        uid = created["metadata"]["uid"]

        def running_pod(u: str = uid) -> str | None:
            pods = kube.list(pods_path(ns), label_selector=f"batch.kubernetes.io/controller-uid={u}")
            return next((p["metadata"]["name"] for p in pods if p.get("status", {}).get("phase") == "Running"), None)

        pod = wait_until("pod Running", running_pod, timeout=60, interval=0.05)
        serving = 3.0 - 0.05 * i
        result = trained("lat0", version, adapter=serving - 0.05, serving=serving if i else None)
        kube.merge_patch(f"{pods_path(ns)}/{pod}", {"metadata": {"annotations": {
            "podrunner.llmmultichat.io/exit-code": "0", "podrunner.llmmultichat.io/message": json.dumps(result)}}})
        t_pod = t_job = t_patch = None
        deadline = time.monotonic() + 60
        while t_patch is None and time.monotonic() < deadline:
            now = time.monotonic()
            if t_pod is None:
                p = kube.get(f"{pods_path(ns)}/{pod}") or {}
                if p.get("status", {}).get("phase") == "Succeeded":
                    t_pod = now
            if t_job is None:
                j = kube.get(f"{jobs_path(ns)}/lat0-run-{i}") or {}
                if any(c["type"] == "Complete" and c["status"] == "True"
                       for c in j.get("status", {}).get("conditions") or ()):
                    t_job = now
            d = kube.get(deployment_path(ns, "chat")) or {}
            annotations = d.get("spec", {}).get("template", {}).get("metadata", {}).get("annotations") or {}
            if annotations.get("llmmultichat.io/adapter-lat0") == version:
                t_patch = now
            time.sleep(0.01)
        assert t_patch is not None, env.operator.log_tail()
        # Patched before the Job was seen complete by our poll means ~0 (both within one poll interval).
        job_to_patch.append(max(0.0, t_patch - (t_job or t_patch)))
        pod_to_patch.append(max(0.0, t_patch - (t_pod or t_patch)))
        env.wait_status("lat0", f"Ready on {version}", lambda s, v=version: s.get("servingVersion") == v
                        and s.get("phase") == "Ready", timeout=60)

    numbers = {"runs": RUNS, "apply_to_cronjob_s": summary(apply_to_cronjob),
               "job_complete_to_deployment_patched_s": summary(job_to_patch),
               "pod_terminated_to_deployment_patched_s": summary(pod_to_patch)}
    metrics = env.operator.metrics()
    for line in metrics.splitlines():
        if line.startswith(("finetune_job_to_patch_seconds_sum", "finetune_job_to_patch_seconds_count")):
            key, value = line.split()
            numbers[f"operator_{key}"] = float(value)
    out = Path(os.environ.get("FINETUNE_LATENCY_OUT", tmp_path / "latency.json"))
    out.write_text(json.dumps(numbers, indent=2))
    print("\nOPERATOR LATENCY", json.dumps(numbers, indent=2))
    assert numbers["apply_to_cronjob_s"]["p50"] < 5
    assert numbers["job_complete_to_deployment_patched_s"]["p50"] < 5
