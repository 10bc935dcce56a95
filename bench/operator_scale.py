"""Operator scale and latency on the real local control plane: N = 10, 100, 500 CharacterFineTunes.

    .venv/bin/python -m bench.operator_scale                 # N = 10, 100, 500 (~12 min on 2 shared cores)
    .venv/bin/python -m bench.operator_scale --sizes 10 --samples 5

For each N, in a fresh namespace (the operator test harness's: chat Deployment, adapter PVC, token Secret, the
operator running as its ServiceAccount bound to the shipped ClusterRole, production timings — resync 60 s,
rollout poll 2 s):

1. create N resources at once; time until every CronJob exists and until every resource's status says
   ``Scheduled`` (reconciled), and how many reconcile errors the operator counted;
2. watch the operator idle for 90 s: CPU and API requests of the periodic resync (every resource is re-checked once
   a minute; the resyncs falling in the window are counted from when each resource was first reconciled);
3. for a sample of the resources: start a Job from its CronJob (``kubectl create job --from`` does the same), release
   the trainer pod with a ``trained`` result (``devkit.podrunner.release_pod``), and time Job ``Complete`` → chat
   Deployment patched with the new version, from watch events on the admin connection;
4. delete everything (the operator's finalizer removes each mount) and the namespace.

The operator's own API requests are counted exactly: a FlowSchema routes its ServiceAccount to a flow of its own, and
kube-apiserver's ``apiserver_flowcontrol_dispatched_requests_total`` for that flow is read before and after each
phase. RSS and CPU come from psutil on the operator process.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import psutil
from devkit.harness import wait_until

from bench._common import log, machine, percentile, table, write_json

GROUP, VERSION, PLURAL = "llmmultichat.io", "v1alpha1", "characterfinetunes"
LABEL_FINETUNE = "llmmultichat.io/finetune"
PROD_TIMINGS = {"FINETUNE_RESYNC_SECONDS": "60", "FINETUNE_ROLLOUT_POLL_SECONDS": "2"}


class Watcher:
    """Records, in a background thread, when each object of a kind was first seen in a given state.

    Times are ``time.monotonic()`` at the watch event's arrival on the admin connection; the same clock for every
    kind, so differences between kinds are latencies as an observer of the API sees them.
    """

    def __init__(self, list_func: Callable[..., Any], key: Callable[[dict[str, Any]], list[str]]) -> None:
        self.list_func = list_func
        self.key = key  # object → the state names it is in now, e.g. ["exists", "complete"]
        self.first: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from kubernetes import watch

        resource_version = None
        while not self.stopped.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(self.list_func, timeout_seconds=30, resource_version=resource_version,
                                           allow_watch_bookmarks=False):
                    self.ready.set()
                    obj = event["raw_object"]
                    resource_version = obj.get("metadata", {}).get("resourceVersion", resource_version)
                    now = time.monotonic()
                    with self.lock:
                        for state in self.key(obj):
                            self.first.setdefault((obj["metadata"]["name"], state), now)
                    if self.stopped.is_set():
                        break
            except Exception as exc:  # a dropped or expired watch: start over with a fresh list
                log(f"    (watch restarted: {type(exc).__name__} {getattr(exc, 'status', '')})")
                resource_version = None
            self.ready.set()

    def when(self, name: str, state: str) -> float | None:
        with self.lock:
            return self.first.get((name, state))

    def count(self, state: str) -> int:
        with self.lock:
            return sum(1 for (_, s) in self.first if s == state)

    def stop(self) -> None:
        self.stopped.set()


def cft(name: str) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "CharacterFineTune", "metadata": {"name": name},
            "spec": {"character": name,
                     "data": {"historyURL": "http://chat:8000", "tokenSecretRef": {"name": "history-token"}},
                     "adapterStorage": {"claimName": "adapters"}, "target": {"deployment": "chat"},
                     "resources": {"gpus": 1}}}


class RequestCounter:
    """Requests the operator's ServiceAccount made, from kube-apiserver's API Priority and Fairness metrics."""

    def __init__(self, cluster: Any, namespace: str) -> None:
        self.cluster = cluster
        self.name = f"bench-{namespace}"
        # Matched before the built-in "service-accounts" schema (precedence 9000) and into the same priority level,
        # so the operator is treated exactly as before, only counted apart.
        schema = {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
                  "metadata": {"name": self.name},
                  "spec": {"matchingPrecedence": 8000, "priorityLevelConfiguration": {"name": "workload-low"},
                           "distinguisherMethod": {"type": "ByUser"},
                           "rules": [{"subjects": [{"kind": "ServiceAccount", "serviceAccount": {
                               "name": "finetune-operator", "namespace": namespace}}],
                               "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                                  "namespaces": ["*"], "clusterScope": True}],
                               "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}]}]}}
        cluster.apply(schema)

    def total(self) -> int:
        text = self.cluster.kubectl("get", "--raw", "/metrics").stdout
        pattern = re.compile(r'^apiserver_flowcontrol_dispatched_requests_total\{flow_schema="'
                             + re.escape(self.name) + r'",[^}]*\} (\S+)$', re.M)
        return sum(int(float(m)) for m in pattern.findall(text))

    def delete(self) -> None:
        self.cluster.kubectl("delete", "flowschema", self.name, "--ignore-not-found")


class ProcessMeter:
    """CPU seconds and RSS of one process, read between phases."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.last = self._cpu()

    def _cpu(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def lap(self) -> tuple[float, float]:
        """(CPU seconds since the last lap, RSS MiB now)."""
        now = self._cpu()
        spent, self.last = now - self.last, now
        return spent, self.process.memory_info().rss / 2**20


def resyncs_between(first_reconciled: Sequence[float], start: float, end: float, period: float,
                    lag: float = 1.0) -> int:
    """How many periodic resyncs fall in [start, end): each resource is re-checked every ``period`` seconds after
    its first reconcile (the operator schedules the next check when one ends, and its daemon notices within the
    rollout poll interval, ``lag`` on average), so the count follows from when each resource was first reconciled —
    exact enough to divide a window's requests by, where resyncs come in bursts."""
    count = 0
    for reconciled in first_reconciled:
        t0 = reconciled + lag
        first_k = max(1, math.ceil((start - t0) / period))
        last_k = math.floor((end - t0 - 1e-9) / period)
        count += max(0, last_k - first_k + 1)
    return count


def reconcile_errors(metrics_text: str) -> int:
    return sum(int(float(v)) for v in re.findall(r"^finetune_reconcile_errors_total\{[^}]*\} (\S+)$", metrics_text,
                                                   re.M))


@contextmanager
def environment(cluster: Any, tmp: Path) -> Iterator[Any]:
    from devkit import harness
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    harness.install_crd(cluster)
    env = harness.Env(cluster, tmp)
    try:
        yield env
    finally:
        # Delete the resources while the operator runs, so that its finalizer cleans the Deployment; one collection
        # DELETE (kubectl would send one request per object). The harness then removes what is left.
        custom = k8s.CustomObjectsApi(k8s_config.new_client_from_config(config_file=str(cluster.kubeconfig)))
        started = time.monotonic()
        try:
            if env.operator.process is not None and env.operator.process.poll() is None:
                custom.delete_collection_namespaced_custom_object(GROUP, VERSION, env.ns, PLURAL)
                wait_until("every resource deleted",
                         lambda: not custom.list_namespaced_custom_object(GROUP, VERSION, env.ns, PLURAL)["items"],
                         timeout=300, interval=1)
                log(f"    deleted all resources in {time.monotonic() - started:.1f}s")
        except Exception as exc:
            log(f"    cleanup: {exc}; the harness removes the finalizers")
        env.teardown()


def run_size(cluster: Any, n: int, samples: int, idle: float, tmp: Path) -> dict[str, Any]:
    from devkit.harness import trained
    from devkit.podrunner import release_pod, wait_for_pod
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    api = k8s_config.new_client_from_config(config_file=str(cluster.kubeconfig))
    custom, batch, apps, core = k8s.CustomObjectsApi(api), k8s.BatchV1Api(api), k8s.AppsV1Api(api), k8s.CoreV1Api(api)
    row: dict[str, Any] = {"n": n}
    watchers: list[Watcher] = []
    with environment(cluster, tmp) as env:
        ns = env.ns
        counter = RequestCounter(cluster, ns)
        try:
            env.operator.start(**PROD_TIMINGS)
            meter = ProcessMeter(env.operator.process.pid)
            time.sleep(2)  # let kopf finish its initial listings before the baseline is read
            meter.lap()
            requests_start = counter.total()

            def cft_states(obj: dict[str, Any]) -> list[str]:
                conditions = (obj.get("status") or {}).get("conditions") or ()
                ok = any(c["type"] == "Scheduled" and c["status"] == "True" for c in conditions)
                return ["scheduled"] if ok else []

            def job_states(obj: dict[str, Any]) -> list[str]:
                conditions = (obj.get("status") or {}).get("conditions") or ()
                return ["complete"] if any(c["type"] == "Complete" and c["status"] == "True" for c in conditions) \
                    else []

            def deployment_states(obj: dict[str, Any]) -> list[str]:
                annotations = obj["spec"]["template"]["metadata"].get("annotations") or {}
                return [f"{k}={v}" for k, v in annotations.items() if k.startswith("llmmultichat.io/adapter-")]

            cronjobs = Watcher(partial(batch.list_namespaced_cron_job, ns), lambda o: ["exists"])
            resources = Watcher(partial(custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL), cft_states)
            jobs = Watcher(partial(batch.list_namespaced_job, ns), job_states)
            pods = Watcher(partial(core.list_namespaced_pod, ns),
                           lambda o: ["succeeded"] if (o.get("status") or {}).get("phase") == "Succeeded" else [])
            deployments = Watcher(partial(apps.list_namespaced_deployment, ns), deployment_states)
            watchers += [cronjobs, resources, jobs, pods, deployments]
            for w in watchers:
                w.ready.wait(10)

            # 1. create N at once (4 client threads: the API server, not this loop, should be the limit)
            log(f"  N={n}: creating")
            names = [f"c{i:04d}" for i in range(n)]
            t0 = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(lambda name: custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL,
                                                                                    cft(name)), names))
            row["create_s"] = time.monotonic() - t0
            timeout = 60 + n
            wait_until(f"{n} CronJobs", lambda: cronjobs.count("exists") >= n, timeout)
            row["all_cronjobs_s"] = max(cronjobs.when(f"{x}-finetune", "exists") for x in names) - t0
            wait_until(f"{n} resources Scheduled", lambda: resources.count("scheduled") >= n, timeout)
            row["all_scheduled_s"] = max(resources.when(x, "scheduled") for x in names) - t0
            cpu, rss = meter.lap()
            requests_created = counter.total()
            reconciled_at = [resources.when(x, "scheduled") or t0 for x in names]
            idle_started = time.monotonic()
            row["create_cpu_s"] = cpu
            row["requests_per_create"] = (requests_created - requests_start) / n

            # 2. idle: what the periodic resync costs
            log(f"  N={n}: idle {idle:.0f}s")
            time.sleep(idle)
            cpu, rss = meter.lap()
            requests_idle = counter.total()
            row["idle_cpu_pct"] = 100 * cpu / idle
            row["rss_mib"] = rss
            # Each resource is re-checked once per resync interval (60 s).
            period = float(PROD_TIMINGS["FINETUNE_RESYNC_SECONDS"])
            resyncs = resyncs_between(reconciled_at, idle_started, time.monotonic(), period)
            row["resyncs_in_idle"] = resyncs
            row["requests_per_resync"] = (requests_idle - requests_created) / resyncs if resyncs else None
            row["idle_requests_per_s"] = (requests_idle - requests_created) / idle

            # 3. Job completion → Deployment patched, on a sample of the resources
            log(f"  N={n}: {samples} runs")
            sampled = names[:: max(1, n // samples)][:samples]
            job_to_patch, pod_to_patch = [], []
            phase_started = time.monotonic()
            for index, name in enumerate(sampled):
                version = f"20261126T{index // 60:02d}{index % 60:02d}00Z"
                # What `kubectl create job --from=cronjob/...` creates: the Job template, owned by the CronJob.
                cronjob = api.sanitize_for_serialization(batch.read_namespaced_cron_job(f"{name}-finetune", ns))
                template = cronjob["spec"]["jobTemplate"]
                owner = {"apiVersion": "batch/v1", "kind": "CronJob", "name": f"{name}-finetune",
                         "uid": cronjob["metadata"]["uid"], "controller": True}
                job_name = f"{name}-run"
                batch.create_namespaced_job(ns, {
                    "apiVersion": "batch/v1", "kind": "Job",
                    "metadata": {"name": job_name, "labels": template["metadata"]["labels"],
                                 "annotations": {"cronjob.kubernetes.io/instantiate": "manual"},
                                 "ownerReferences": [owner]},
                    "spec": template["spec"]})
                pod = wait_for_pod(cluster, ns, f"job-name={job_name}", timeout=60)
                result = trained(name, version, adapter=2.5)
                release_pod(cluster, ns, pod, exit_code=0, message=json.dumps(result))
                state = f"llmmultichat.io/adapter-{name}={version}"
                patched = wait_until(f"{name} {version} patched", lambda s=state: deployments.when("chat", s), 60)
                complete = wait_until(f"Job {job_name} Complete", lambda j=job_name: jobs.when(j, "complete"), 10)
                job_to_patch.append(max(0.0, patched - complete))
                succeeded = wait_until(f"pod {pod} Succeeded", lambda p=pod: pods.when(p, "succeeded"), 10)
                pod_to_patch.append(max(0.0, patched - succeeded))
            sample_s = time.monotonic() - phase_started
            cpu, rss = meter.lap()
            requests_runs = counter.total()
            # Subtract the background resyncs that fell in this phase (the sampled resources' own are part of runs).
            background = resyncs_between(reconciled_at, phase_started, phase_started + sample_s, period)
            resync_share = background * (row["requests_per_resync"] or 0.0)
            row["requests_per_run"] = max(0.0, requests_runs - requests_idle - resync_share) / max(len(sampled), 1)
            row["samples"] = len(sampled)
            row["job_to_patch_p50"] = percentile(job_to_patch, 50)
            row["job_to_patch_p95"] = percentile(job_to_patch, 95)
            row["release_to_patch_p50"] = percentile(pod_to_patch, 50)
            row["release_to_patch_p95"] = percentile(pod_to_patch, 95)
            row["rss_mib"] = max(row["rss_mib"], rss)

            # 4. errors: every resource reconciled, the operator counted no failed attempt
            items = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]
            row["reconciled_ok"] = sum(1 for o in items if cft_states(o) and not (o.get("status") or {}).get(
                "lastError"))
            row["reconcile_errors"] = reconcile_errors(env.operator.metrics())
            row["log_errors"] = sum(1 for line in env.operator.log_tail(10**6).splitlines()
                                    if " ERROR " in line or "Traceback" in line)
        finally:
            for w in watchers:
                w.stop()
            counter.delete()
    log(f"  N={n}: {json.dumps(row)}")
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,500", help="comma-separated N")
    parser.add_argument("--samples", type=int, default=20, help="Job runs timed per N")
    parser.add_argument("--idle", type=float, default=90,
                        help="seconds of idle measurement per N (at least one resync period of 60 s)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import tempfile

    from devkit.cluster import using_cluster

    rows = []
    with using_cluster() as cluster, tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(run_size(cluster, n, min(args.samples, n), args.idle, Path(tmp)))
    info = machine()
    write_json(args.json, {"machine": info, "rows": rows})
    print(f"\n{info}")
    print(table(rows, [
        ("n", "N", ""), ("create_s", "create (client) s", ".1f"), ("all_cronjobs_s", "all CronJobs s", ".1f"),
        ("all_scheduled_s", "all Scheduled s", ".1f"), ("reconciled_ok", "reconciled", ""),
        ("reconcile_errors", "errors", ""), ("job_to_patch_p50", "Job→patch p50 s", ".2f"),
        ("job_to_patch_p95", "p95 s", ".2f"), ("release_to_patch_p50", "pod done→patch p50 s", ".2f"),
        ("rss_mib", "RSS MiB", ".0f"), ("create_cpu_s", "CPU s (create)", ".1f"),
        ("idle_cpu_pct", "idle CPU %", ".1f"), ("requests_per_create", "req/create", ".1f"),
        ("requests_per_resync", "req/resync", ".1f"), ("requests_per_run", "req/run", ".1f"),
    ]))
    print("bars: N=500 reconciled with 0 errors; Job→patch p50 < 2 s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
