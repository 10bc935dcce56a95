"""The one harness that tests, bench/ and the demo run the project's processes with.

- The operator as a real process (`OperatorProcess`), authenticated as a ServiceAccount (`service_account_kubeconfig`)
  so that its RBAC is exercised too; `Env` is one test's namespace with a chat Deployment and that operator in it.
- The chat service as a real process (`ChatProcess`, `wait_chat_ready`) and LoRA adapters for it (`make_adapter`).
- `free_port` and `wait_until` (from the leaf module devkit.waiting, which the cluster and pod runner use too).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import yaml
from devkit.cluster import Cluster
from devkit.paths import CRD, DEPLOY, REPO_ROOT
from devkit.podrunner import NEVER_READY_ANNOTATION, release_pod, wait_for_pod
from devkit.waiting import WaitTimeout, free_port, stop_process, wait_until

RBAC = DEPLOY / "operator" / "rbac.yaml"
PEERING = DEPLOY / "operator" / "peering.yaml"
OPERATOR_SA = "finetune-operator"
PROMPT_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nOutput: "  # contract §2
# The operator's settings in tests: resyncs and rollout polls in seconds, so a test sees them happen.
TEST_OPERATOR_SETTINGS = {"FINETUNE_RESYNC_SECONDS": "3", "FINETUNE_ROLLOUT_POLL_SECONDS": "0.3",
                          "FINETUNE_LOG_FORMAT": "plain", "FINETUNE_TRAINER_IMAGE": "llmmultichat/trainer:test"}
__all__ = ["NEVER_READY_ANNOTATION", "ChatProcess", "Env", "OperatorProcess", "WaitTimeout", "free_port",
           "install_crd", "make_adapter", "service_account_kubeconfig", "trained", "wait_chat_ready", "wait_for_pod",
           "wait_until"]


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


def log_tail(path: Path, lines: int = 60) -> str:
    """The last lines of a process's log ("" when there is none yet)."""
    try:
        text = path.read_bytes().replace(b"\0", b"").decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- the operator ----------------------------------------------------------------------------------------------------


def service_account_kubeconfig(cluster: Cluster, namespace: str, service_account: str, path: Path) -> Path:
    """Writes a kubeconfig to `path` that authenticates as `namespace/service_account` (a fresh 2 h token) against
    the cluster's current context, so a process run with it has that account's RBAC only."""
    token = cluster.kubectl("-n", namespace, "create", "token", service_account, "--duration=2h").stdout.strip()
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    server = dict(next(c for c in admin["clusters"] if c["name"] == context["cluster"])["cluster"])
    ca = server.get("certificate-authority")
    if ca and not os.path.isabs(ca):
        # Relative to the admin kubeconfig, which this one does not sit beside.
        server["certificate-authority"] = str(cluster.kubeconfig.parent / ca)
    config = {"apiVersion": "v1", "kind": "Config",
              "clusters": [{"name": "local", "cluster": server}],
              "users": [{"name": service_account, "user": {"token": token}}],
              "contexts": [{"name": service_account, "context": {"cluster": "local", "user": service_account}}],
              "current-context": service_account}
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class OperatorProcess:
    """`python -m finetune_operator -n NS` as a child process, with `settings` as its FINETUNE_* environment
    (fast test timings unless told otherwise). A context manager: leaving the `with` block stops it."""

    def __init__(self, cluster: Cluster, namespace: str, kubeconfig: Path, log_path: Path,
                 settings: Mapping[str, str] = TEST_OPERATOR_SETTINGS) -> None:
        self.cluster, self.namespace, self.kubeconfig, self.log_path = cluster, namespace, kubeconfig, log_path
        self.settings = dict(settings)
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, standalone: bool = True, **extra_env: str) -> OperatorProcess:
        """Starts it (without peering unless `standalone=False`) and returns once its liveness endpoint answers."""
        env = {**self.cluster.env, **self.settings, **extra_env, "KUBECONFIG": str(self.kubeconfig),
               "FINETUNE_METRICS_PORT": str(self.metrics_port)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "finetune_operator", "-n", self.namespace,
                 *(["--standalone"] if standalone else []),
                 "--liveness", f"http://127.0.0.1:{self.health_port}/healthz"],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            )
        try:
            wait_until("the operator's liveness endpoint", self.healthy, timeout=30)
        except BaseException:
            self.stop()  # not yet in a `with` block or an Env: nothing else would
            raise
        return self

    def __enter__(self) -> OperatorProcess:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    def healthy(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"operator exited ({self.process and self.process.returncode}):\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=15)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as an OOM kill or a node loss."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def log_tail(self, lines: int = 60) -> str:
        return log_tail(self.log_path, lines)


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
        """The operator's ServiceAccount in this namespace, bound to the shipped ClusterRole; its kubeconfig."""
        role = next(d for d in yaml.safe_load_all(RBAC.read_text()) if d["kind"] == "ClusterRole")
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(role))
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": f"finetune-operator-{self.ns}"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                               "name": role["metadata"]["name"]},
                   "subjects": [{"kind": "ServiceAccount", "name": OPERATOR_SA, "namespace": self.ns}]}
        self.kubectl("create", "serviceaccount", OPERATOR_SA)
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(binding))
        return service_account_kubeconfig(self.cluster, self.ns, OPERATOR_SA, self.tmp / f"kubeconfig-{self.ns}")

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
        except WaitTimeout as exc:
            raise WaitTimeout(f"{exc}\nstatus: {json.dumps(self.status(name), indent=1)}\n"
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


# --- the chat service ------------------------------------------------------------------------------------------------


def wait_chat_ready(url: str, process: subprocess.Popen[bytes], log_path: Path,
                    timeout: float = 180) -> dict[str, Any]:
    """Polls the chat service at `url` until `/readyz` answers 200 (model loaded, store open) and returns that body;
    fails at once, with the end of `log_path`, when `process` exits first."""

    def ready() -> dict[str, Any] | None:
        if process.poll() is not None:
            raise RuntimeError(f"chat service exited with {process.returncode}:\n{log_tail(log_path, 30)}")
        try:
            response = httpx.get(f"{url}/readyz", timeout=2)
        except httpx.HTTPError:
            return None
        return dict(response.json()) if response.status_code == 200 else None

    return wait_until(f"the chat service at {url} to be ready", ready, timeout=timeout)


class ChatProcess:
    """`python -m chat_service --host 127.0.0.1 --port <free port> ARGS` as a child process, as its pod runs it;
    output appended to `log_path`. `start()` again after a stop or kill restarts it on the same port."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args, self.env, self.log_path = list(args), dict(env), log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ChatProcess:
        command = [sys.executable, "-m", "chat_service", "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, timeout: float = 180) -> dict[str, Any]:
        assert self.process is not None, "start() it first"
        return wait_chat_ready(self.url, self.process, self.log_path, timeout)

    def stop(self, timeout: float = 15) -> None:
        if self.process is not None:
            stop_process(self.process, timeout)


def make_adapter(base_model: Path, root: Path, character: str, version: str, *, untrained: bool = False,
                 r: int = 4, alpha: int = 64, dropout: float = 0.0, seed: int = 1,
                 base_name: str | None = None) -> Path:
    """A real PEFT LoRA adapter on the attention projections peft picks for the base model's architecture (Llama's
    `q_proj`/`v_proj`, GPT-2's `c_attn`, ...), as mounted for the chat service (contract §2):
    `<root>/lora_<character>/{adapter_config.json, adapter_model.safetensors, manifest.json}`.

    By default its A and B are random and large, so it visibly changes the model's output. `untrained=True` keeps
    PEFT's initialisation (B = 0): the output is the base model's token for token and only the adapter's compute
    is added, which is what a latency benchmark wants."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    # GPT-2 keeps its projections in Conv1D layers, whose weights are stored transposed.
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, fan_in_fan_out=base.config.model_type == "gpt2",
                        init_lora_weights=untrained, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    target_modules = sorted(model.peft_config["default"].target_modules)
    if not untrained:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.5)
    directory = root / f"lora_{character}"
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    manifest = {"schema_version": 1, "character": character, "version": version,
                "base_model": base_name or str(base_model), "prompt_template": PROMPT_TEMPLATE,
                "trainer_version": "devkit", "created_at": "2026-11-26T03:04:05Z",
                "lora": {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": target_modules}}
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return directory
