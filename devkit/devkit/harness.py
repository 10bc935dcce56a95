"""Test harness for the operator on the real control plane: a namespace with a chat Deployment, the operator as a
real process (running as a ServiceAccount bound to the shipped ClusterRole, so RBAC is exercised too), and helpers to
run training Jobs with a chosen trainer result.

Imported as `devkit.harness` by the operator tests, the demo and bench/.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from devkit.cluster import Cluster
from devkit.podrunner import NEVER_READY_ANNOTATION, release_pod, wait_for_pod

from devkit.paths import REPO_ROOT as REPO
CRD = REPO / "crds" / "characterfinetune.yaml"
RBAC = REPO / "deploy" / "operator" / "rbac.yaml"
PEERING = REPO / "deploy" / "operator" / "peering.yaml"
T = TypeVar("T")
__all__ = ["NEVER_READY_ANNOTATION", "Env", "OperatorProcess", "install_crd", "trained", "wait_for_pod", "wait_until"]


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 30, interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def install_crd(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/characterfinetunes.llmmultichat.io", "--timeout=30s")


def trained(character: str, version: str, adapter: float, *, serving: float | None = None,
            serving_version: str | None = None, base: float = 3.0) -> dict[str, Any]:
    """A trainer result (contract §3)."""
    return {
        "outcome": "trained", "character": character, "version": version, "path": f"lora_{character}/{version}",
        "serving_version": serving_version, "examples": {"pairs": 300, "train": 270, "eval": 30},
        "metrics": {"eval_loss_base": base, "eval_loss_serving": serving, "eval_loss_adapter": adapter,
                    "train_loss": adapter - 0.2, "tokens_per_second": 1000.0, "duration_seconds": 12.5},
        "reason": None, "trainer_version": "0.1.0",
    }


class OperatorProcess:
    """`python -m finetune_operator -n NS` as a child process, with fast test timings."""

    def __init__(self, cluster: Cluster, namespace: str, kubeconfig: Path, log_path: Path,
                 extra_env: dict[str, str] | None = None) -> None:
        self.cluster, self.namespace, self.kubeconfig, self.log_path = cluster, namespace, kubeconfig, log_path
        self.extra_env = extra_env or {}
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, standalone: bool = True, **extra_env: str) -> OperatorProcess:
        env = {**self.cluster.env, "KUBECONFIG": str(self.kubeconfig), "FINETUNE_METRICS_PORT": str(self.metrics_port),
               "FINETUNE_RESYNC_SECONDS": "3", "FINETUNE_ROLLOUT_POLL_SECONDS": "0.3", "FINETUNE_LOG_FORMAT": "plain",
               "FINETUNE_TRAINER_IMAGE": "llmmultichat/trainer:test", **self.extra_env, **extra_env}
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "finetune_operator", "-n", self.namespace,
             *(["--standalone"] if standalone else []),
             "--liveness", f"http://127.0.0.1:{self.health_port}/healthz"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        log.close()
        wait_until("the operator's liveness endpoint", self.healthy, timeout=30, interval=0.2)
        return self

    def healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"operator exited ({self.process and self.process.returncode}):\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as an OOM kill or a node loss."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_bytes().replace(b"\0", b"").decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Env:
    """One test's namespace: chat Deployment, adapter PVC, token Secret, an operator ServiceAccount bound to the
    shipped ClusterRole, and the operator process running as it."""

    def __init__(self, cluster: Cluster, tmp: Path, *, progress_deadline: int = 600, replicas: int = 1) -> None:
        self.cluster = cluster
        self.ns = f"op-{uuid.uuid4().hex[:8]}"
        self.tmp = tmp
        cluster.create_namespace(self.ns)
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "history-token"},
             "stringData": {"token": "s3cret"}},
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "adapters"},
             "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}},
            {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "chat"}, "spec": {
                "replicas": replicas, "progressDeadlineSeconds": progress_deadline,
                "selector": {"matchLabels": {"app": "chat"}},
                "template": {"metadata": {"labels": {"app": "chat"}}, "spec": {"containers": [
                    {"name": "chat", "image": "llmmultichat/chat:test",
                     "volumeMounts": [{"name": "base", "mountPath": "/models/base", "readOnly": True}]}],
                    "volumes": [{"name": "base", "emptyDir": {}}]}}}},
        ]}))
        self.kubeconfig = self._service_account_kubeconfig()
        self.operator = OperatorProcess(cluster, self.ns, self.kubeconfig, tmp / f"operator-{self.ns}.log")

    # --- setup ---------------------------------------------------------------------------------------------------

    def _service_account_kubeconfig(self) -> Path:
        rbac = list(yaml.safe_load_all(RBAC.read_text()))
        role = next(d for d in rbac if d["kind"] == "ClusterRole")
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(role))
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": f"finetune-operator-{self.ns}"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                               "name": role["metadata"]["name"]},
                   "subjects": [{"kind": "ServiceAccount", "name": "finetune-operator", "namespace": self.ns}]}
        self.kubectl("create", "serviceaccount", "finetune-operator")
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(binding))
        token = self.kubectl("create", "token", "finetune-operator", "--duration=2h").stdout.strip()
        admin = yaml.safe_load(self.cluster.kubeconfig.read_text())
        cluster_entry = admin["clusters"][0]
        config = {"apiVersion": "v1", "kind": "Config",
                  "clusters": [{"name": "local", "cluster": cluster_entry["cluster"]}],
                  "users": [{"name": "operator", "user": {"token": token}}],
                  "contexts": [{"name": "operator", "context": {"cluster": "local", "user": "operator"}}],
                  "current-context": "operator"}
        base = self.cluster.kubeconfig.parent
        ca = config["clusters"][0]["cluster"].get("certificate-authority")
        if ca and not os.path.isabs(ca):
            config["clusters"][0]["cluster"]["certificate-authority"] = str(base / ca)
        path = self.tmp / f"kubeconfig-{self.ns}"
        path.write_text(yaml.safe_dump(config))
        return path

    def teardown(self) -> None:
        # Resources go first, while the operator can still run their finalizers; then the namespace.
        if self.operator.process is not None and self.operator.process.poll() is None:
            self.kubectl("delete", "cft", "--all", "--timeout=30s", check=False)
        self.operator.stop()
        for name in self.kubectl("get", "cft", "-o", "name", check=False).stdout.split():
            self.kubectl("patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
        self.cluster.kubectl("delete", "clusterrolebinding", f"finetune-operator-{self.ns}", "--ignore-not-found")
        self.cluster.delete_namespace(self.ns)

    # --- helpers -------------------------------------------------------------------------------------------------

    def kubectl(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl("-n", self.ns, *args, check=check, input=input)

    def get(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def maybe_get(self, *args: str) -> dict[str, Any] | None:
        result = self.kubectl("get", *args, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def apply_cft(self, name: str, character: str | None = None, **spec: Any) -> dict[str, Any]:
        obj = {"apiVersion": "llmmultichat.io/v1alpha1", "kind": "CharacterFineTune", "metadata": {"name": name},
               "spec": {"character": character or name,
                        "data": {"historyURL": "http://chat:8000", "tokenSecretRef": {"name": "history-token"}},
                        "adapterStorage": {"claimName": "adapters"}, "target": {"deployment": "chat"},
                        "resources": {"gpus": 1}, **spec}}
        self.kubectl("apply", "--validate=strict", "-f", "-", input=json.dumps(obj))
        return obj

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.get("cft", name).get("status") or {})

    def condition(self, name: str, type_: str) -> dict[str, Any]:
        return next((c for c in self.status(name).get("conditions") or () if c["type"] == type_), {})

    def wait_status(self, name: str, what: str, predicate: Callable[[dict[str, Any]], bool],
                    timeout: float = 30) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(name)
            return status if predicate(status) else None
        try:
            return wait_until(f"{name}: {what}", probe, timeout=timeout, interval=0.2)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstatus: {json.dumps(self.status(name), indent=1)}\n"
                                 f"operator log:\n{self.operator.log_tail()}") from None

    def deployment(self) -> dict[str, Any]:
        return self.get("deployment", "chat")

    def mounts(self) -> dict[str, str]:
        """mountPath → subPath of the chat container's adapter mounts."""
        container = next(c for c in self.deployment()["spec"]["template"]["spec"]["containers"] if c["name"] == "chat")
        return {m["mountPath"]: m.get("subPath", "") for m in container.get("volumeMounts") or ()
                if m["mountPath"].startswith("/models/lora_")}

    def start_job(self, cr_name: str, job_name: str) -> str:
        """`kubectl create job --from=cronjob/<cr>-finetune`, the documented "train now"; returns its pod."""
        wait_until("the CronJob", lambda: self.maybe_get("cronjob", f"{cr_name}-finetune"), timeout=30)
        self.kubectl("create", "job", job_name, f"--from=cronjob/{cr_name}-finetune")
        return wait_for_pod(self.cluster, self.ns, f"job-name={job_name}", timeout=60)

    def finish_job(self, pod: str, result: dict[str, Any] | str, exit_code: int = 0) -> None:
        message = result if isinstance(result, str) else json.dumps(result)
        release_pod(self.cluster, self.ns, pod, exit_code=exit_code, message=message)

    def run_job(self, cr_name: str, job_name: str, result: dict[str, Any] | str, exit_code: int = 0) -> None:
        self.finish_job(self.start_job(cr_name, job_name), result, exit_code)

    def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        items = self.get("events", "--field-selector", "involvedObject.kind=CharacterFineTune")["items"]
        return [e for e in items if reason is None or e["reason"] == reason]


@contextlib.contextmanager
def environment(cluster: Cluster, tmp: Path, **kwargs: Any) -> Iterator[Env]:
    env = Env(cluster, tmp, **kwargs)
    try:
        yield env
    finally:
        env.teardown()
