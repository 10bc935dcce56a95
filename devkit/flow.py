"""The loop as real pods, through kubectl alone: the one flow `make demo` runs on the local real node and
`make kind-e2e` on a kind cluster (tests/e2e/test_real_node_loop.py runs it and checks what it did).

deploy/embedded (deploy/ with the chat history in SQLite), moved to a namespace and placed on the nodes that run
real pods → the embedded model copied onto its volume by a loader pod (`kubectl cp`) → a random history token → the
operator and chat pods Ready → sample conversations imported through a port-forward to the chat pod → the sample
CharacterFineTune applied with `gpus: 0` → a run started now from the operator's CronJob → the trainer pod's result
read from the `state.terminated.message` the kubelet wrote → the promotion awaited → replies sampled from the rolled
chat pod, and compared with the base model's.

CLI (`make kind-e2e`): `python -m devkit.flow --context kind-llmmultichat`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import httpx
import yaml
from devkit import conversations
from devkit.chat_api import import_history, sample_replies, serving_version
from devkit.image_tags import image_tags
from devkit.model import ensure_embedded_model
from devkit.paths import DEPLOY, SAMPLE_FINETUNE
from devkit.waiting import free_port, stop_process, wait_until

DEPLOYED_NS = "llmmultichat"  # what deploy/kustomization.yaml says
EMBEDDED = DEPLOY / "embedded"
BASE_MODEL_CLAIM = "llmmultichat-base-model"
MODEL_DIR = "tinychat"  # where deploy/ expects the model on that volume (sample baseModel, chat BASE_MODEL)
CHAT = "app.kubernetes.io/name=chat"
OPERATOR = "app.kubernetes.io/name=finetune-operator"
UNSCHEDULABLE_FOR = 120  # seconds
_CANNOT_START = {"ErrImageNeverPull", "ErrImagePull", "ImagePullBackOff", "CreateContainerError",
                 "CreateContainerConfigError", "InvalidImageName"}


class FlowError(RuntimeError):
    """A step of the flow failed; the message says which and what the cluster reported."""


class Kube(Protocol):
    def command(self, *args: str) -> list[str]: ...

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]: ...


@dataclass
class KubeContext:
    """kubectl on PATH, against one context of the user's kubeconfig (a kind cluster's: `kind-<name>`)."""
    context: str

    def command(self, *args: str) -> list[str]:
        return ["kubectl", "--context", self.context, *args]

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.command(*args), input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise FlowError(f"kubectl {' '.join(args)} failed (exit {result.returncode}): {result.stderr.strip()}")
        return result


@dataclass
class Target:
    """Where the flow runs: the cluster, the namespace, and what pins every pod to the nodes that run real pods
    (the local cluster's real node, beside kwok's GPU nodes that run nothing; nothing on kind)."""
    kube: Kube
    namespace: str = DEPLOYED_NS
    placement: dict[str, Any] = field(default_factory=dict)  # pod spec fields: nodeSelector, tolerations

    def run(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.kube.kubectl("-n", self.namespace, *args, **kwargs)

    def get(self, *args: str) -> Any:
        return json.loads(self.run("get", *args, "-o", "json").stdout)

    def apply(self, objects: list[dict[str, Any]]) -> None:
        self.kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump_all(objects))


@dataclass
class Report:
    """What a run of the flow did: the pods it saw, the trainer's result, the replies before and after."""
    resource: dict[str, Any]
    trainer_result: dict[str, Any]
    status: dict[str, Any]
    pods: dict[str, dict[str, Any]]  # operator, chat (before the roll), trainer, rolled_chat
    version_before: str | None
    version_after: str | None
    replies_before: list[str]
    replies_after: list[str]
    operator_metrics: str
    seconds: float = 0.0

    @property
    def character(self) -> str:
        return str(self.resource["spec"]["character"])

    def style(self, replies: list[str]) -> float:
        return conversations.style_score(self.character, replies)


def image(name: str) -> str:
    """A project image as deploy/ names it (`llmmultichat/chat:<tag>`)."""
    return f"{name}:{image_tags()[name]}"


def render(target: Target) -> list[dict[str, Any]]:
    """deploy/embedded as kustomize renders it, in the target's namespace, its Deployments placed; the operator
    watches that namespace only."""
    objects = list(yaml.safe_load_all(target.kube.kubectl("kustomize", str(EMBEDDED)).stdout))
    for obj in objects:
        meta = obj["metadata"]
        if obj["kind"] == "Namespace" and meta["name"] == DEPLOYED_NS:
            meta["name"] = target.namespace
        if meta.get("namespace") == DEPLOYED_NS:
            meta["namespace"] = target.namespace
        if obj["kind"] == "ClusterRoleBinding" and target.namespace != DEPLOYED_NS:
            meta["name"] += f"-{target.namespace}"  # beside the binding of a deploy/ in its own namespace
            for subject in obj.get("subjects", []):
                subject["namespace"] = target.namespace
        if obj["kind"] == "Deployment":
            pod = obj["spec"]["template"]["spec"]
            pod.update(target.placement)
            if meta["name"] == "finetune-operator":
                pod["containers"][0].setdefault("env", []).append(
                    {"name": "FINETUNE_NAMESPACES", "value": target.namespace})
    return objects


def reset(target: Target) -> None:
    """Deletes the namespace of an earlier run. Its operator goes with it, and may re-add the resources' cleanup
    finalizer until it has gone, so the finalizers are dropped until the namespace is: it all goes anyway."""
    if target.kube.kubectl("get", "namespace", target.namespace, check=False).returncode != 0:
        return
    target.kube.kubectl("delete", "namespace", target.namespace, "--wait=false")

    def gone() -> bool:
        for name in target.run("get", "cft", "-o", "name", check=False).stdout.split():
            target.run("patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)
        return target.kube.kubectl("get", "namespace", target.namespace, check=False).returncode != 0

    wait_until(f"namespace {target.namespace} deleted", gone, timeout=300, interval=2)


def deploy(target: Target, model: Path) -> str:
    """deploy/embedded in the target, the model on its volume before a chat pod starts (the service loads it once,
    at start), a random history token; returns the token."""
    reset(target)
    rendered = render(target)
    target.apply([o for o in rendered if o["kind"] in ("Namespace", "PersistentVolumeClaim")])
    wait_until("the default ServiceAccount", lambda: target.run(
        "get", "serviceaccount", "default", check=False).returncode == 0, timeout=60)
    load_model(target, model)
    token = secrets.token_hex(24)
    rest = [o for o in rendered if o["kind"] not in ("Namespace", "PersistentVolumeClaim")
            and not (o["kind"] == "Secret" and o["metadata"]["name"] == "chat-history-token")]
    secret = {"apiVersion": "v1", "kind": "Secret", "stringData": {"token": token},
              "metadata": {"name": "chat-history-token", "namespace": target.namespace}}
    target.apply([*rest, secret])
    target.kube.kubectl("wait", "--for=condition=Established", "crd/characterfinetunes.llmmultichat.io",
                        "--timeout=60s")
    return token


def load_model(target: Target, model: Path) -> None:
    """Copies the model onto the base-model volume through a pod of the trainer image (restricted, uid 10001)."""
    restricted = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                  "readOnlyRootFilesystem": True}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "model-loader", "namespace": target.namespace,
                                                          "labels": {"app.kubernetes.io/name": "model-loader"}},
           "spec": {**target.placement, "restartPolicy": "Never",
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                        "fsGroup": 10001, "seccompProfile": {"type": "RuntimeDefault"}},
                    "containers": [{"name": "loader", "image": image("llmmultichat/trainer"),
                                    "imagePullPolicy": "IfNotPresent", "command": ["sleep", "600"],
                                    "securityContext": restricted,
                                    "volumeMounts": [{"name": "models", "mountPath": "/models"}]}],
                    "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": BASE_MODEL_CLAIM}}]}}
    target.apply([pod])
    ready_pod(target, "app.kubernetes.io/name=model-loader", timeout=300)
    target.run("cp", str(model), f"model-loader:/models/{MODEL_DIR}", timeout=300)
    target.run("delete", "pod", "model-loader", "--wait=false")


def ready_pod(target: Target, selector: str, exclude: frozenset[str] = frozenset(), timeout: float = 600) -> dict:
    """The Ready pod matching `selector` (not in `exclude`); fails early on a container that cannot start or a pod
    that stays unschedulable (a node too small for it, say)."""
    def probe() -> dict[str, Any] | None:
        for pod in target.get("pods", "-l", selector)["items"]:
            name = pod["metadata"]["name"]
            if name in exclude or pod["metadata"].get("deletionTimestamp"):
                continue
            _fail_if_unschedulable(pod, UNSCHEDULABLE_FOR)
            for status in pod["status"].get("containerStatuses", []):
                waiting = status["state"].get("waiting", {})
                if waiting.get("reason") in _CANNOT_START:
                    raise FlowError(f"{name} cannot start: {waiting}")
                if status.get("restartCount", 0) >= 3:
                    previous = target.run("logs", name, "--previous", check=False).stdout[-3000:]
                    raise FlowError(f"{name} keeps restarting: {status}\n{previous}")
            if any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])):
                return pod
        return None

    return wait_until(f"a Ready pod {selector}", probe, timeout=timeout, interval=2)


def _fail_if_unschedulable(pod: dict[str, Any], grace: float) -> None:
    """Raises once the scheduler has refused the pod for `grace` seconds (shorter refusals happen during a roll)."""
    for condition in pod["status"].get("conditions", []):
        if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable":
            since = datetime.fromisoformat(condition["lastTransitionTime"].replace("Z", "+00:00"))
            if (datetime.now(UTC) - since).total_seconds() > grace:
                raise FlowError(f"{pod['metadata']['name']} cannot be scheduled: {condition.get('message')}")


@contextlib.contextmanager
def forward(target: Target, pod: str, port: int = 8000) -> Iterator[str]:
    """`kubectl port-forward` to one pod (a Service's forward also sticks to one pod, and breaks when it goes);
    yields the local base URL once the chat API answers through it."""
    local = free_port()
    command = target.kube.command("-n", target.namespace, "port-forward", f"pod/{pod}", f"{local}:{port}")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{local}"
    try:
        wait_until(f"the port-forward to {pod}", lambda: _answers(url, process), timeout=60, interval=0.5)
        yield url
    finally:
        stop_process(process, timeout=10)


def _answers(url: str, process: subprocess.Popen[bytes]) -> bool:
    if process.poll() is not None:
        raise FlowError(f"kubectl port-forward exited {process.returncode}: {process.stderr.read().decode()[-500:]}")
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    return False


def apply_finetune(target: Target, history_url: str) -> dict[str, Any]:
    """The sample resource as shipped, with no GPU, its trainer placed, reading the history at `history_url`."""
    resource = yaml.safe_load(SAMPLE_FINETUNE.read_text())
    resource["metadata"]["namespace"] = target.namespace
    resource["spec"]["data"]["historyURL"] = history_url
    resource["spec"]["resources"] = {"gpus": 0, **target.placement}
    target.apply([resource])
    return resource


def start_job_now(target: Target, name: str) -> str:
    """`kubectl create job --from=cronjob/<name>-finetune` once the operator has made the CronJob; the Job's name."""
    cronjob = f"{name}-finetune"
    wait_until(f"the operator's CronJob {cronjob}", lambda: target.run(
        "get", "cronjob", cronjob, check=False).returncode == 0, timeout=120)
    job = f"{name}-now-{datetime.now(UTC):%Y%m%d%H%M%S}"
    target.run("create", "job", f"--from=cronjob/{cronjob}", job)
    return job


def require_trained(result: dict[str, Any]) -> dict[str, Any]:
    """The trainer's result, printed; a run that did not train ends the flow with the trainer's reason."""
    print(f"    trainer: {result['outcome']} {result.get('version')}", flush=True)
    if result["outcome"] != "trained":
        raise FlowError(f"the trainer did not train: {result.get('reason')}")
    return result


def train_now(target: Target, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A run started now from the operator's CronJob; returns the trainer pod and its termination message, parsed."""
    job = start_job_now(target, name)

    def finished() -> dict[str, Any] | None:
        pods = target.get("pods", "-l", f"job-name={job}")["items"]
        return next((p for p in pods if p["status"].get("phase") in ("Succeeded", "Failed")), None)

    pod = wait_until(f"the trainer pod of {job} finished", finished, timeout=2400, interval=5)
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    if pod["status"]["phase"] != "Succeeded":
        logs = target.run("logs", pod["metadata"]["name"], check=False).stdout[-4000:]
        raise FlowError(f"the trainer pod failed: {terminated}\n{logs}")
    return pod, json.loads(terminated["message"])


def wait_promoted(target: Target, name: str, version: str, timeout: float = 900) -> dict[str, Any]:
    """The resource's status once it is Ready serving `version`; fails as soon as the operator turns it down."""
    def probe() -> dict[str, Any] | None:
        status = target.get("cft", name).get("status", {})
        if status.get("phase") in {"RolloutFailed", "Failed"}:
            raise FlowError(f"{name} ended {status['phase']}: {json.dumps(status.get('conditions'))}")
        last_run = status.get("lastRun") or {}
        if last_run.get("version") == version and last_run.get("outcome") in {"rejected", "failed", "skipped"}:
            raise FlowError(f"the operator did not promote {version}: {last_run['outcome']}: {last_run.get('reason')}")
        return status if status.get("phase") == "Ready" and status.get("servingVersion") == version else None

    return wait_until(f"{name} Ready serving {version}", probe, timeout=timeout, interval=2)


def operator_metrics(target: Target, pod: str) -> str:
    """The operator's /metrics, through the API server's proxy to its pod."""
    path = f"/api/v1/namespaces/{target.namespace}/pods/{pod}:8080/proxy/metrics"
    return target.kube.kubectl("get", "--raw", path).stdout


def import_sample_history(url: str, token: str, character: str, sessions: int) -> None:
    now = datetime.now(UTC)
    for seed, name in enumerate((character, "sora"), start=1):
        history = conversations.generate_history(name, sessions=sessions, seed=seed, start=now - timedelta(days=25),
                                                 end=now - timedelta(minutes=1))
        print(f"    {name}: {import_history(url, token, history)} messages", flush=True)


def run(target: Target, *, sessions: int = 160) -> Report:
    """The whole flow, step by step (printed), on a fresh namespace; see the module's docstring."""
    started = time.monotonic()
    step(f"deploy/embedded in namespace {target.namespace}, the embedded model on its volume (a loader pod)")
    token = deploy(target, ensure_embedded_model())
    pods = {"operator": ready_pod(target, OPERATOR, timeout=300), "chat": ready_pod(target, CHAT, timeout=900)}
    resource = yaml.safe_load(SAMPLE_FINETUNE.read_text())
    character, name = resource["spec"]["character"], resource["metadata"]["name"]
    prompts = conversations.held_out_prompts(character)
    with forward(target, pods["chat"]["metadata"]["name"]) as url:
        step(f"Sample conversations for {character} and sora, imported through the chat API")
        import_sample_history(url, token, character, sessions)
        version_before, replies_before = serving_version(url, character), sample_replies(url, character, prompts)
    step("Apply deploy/samples/finetune.yaml (gpus: 0) and train now (kubectl create job --from=cronjob/...)")
    # The trainer pod reads the history at the chat Service's DNS name, as on any cluster.
    resource = apply_finetune(target, f"http://chat.{target.namespace}.svc:8000")
    pods["trainer"], result = train_now(target, name)
    print(f"    trainer pod {pods['trainer']['metadata']['name']} on {pods['trainer']['spec']['nodeName']}")
    require_trained(result)
    step("The operator gates, promotes and rolls the chat Deployment")
    status = wait_promoted(target, name, result["version"])
    pods["rolled_chat"] = ready_pod(target, CHAT, exclude=frozenset({pods["chat"]["metadata"]["name"]}))
    with forward(target, pods["rolled_chat"]["metadata"]["name"]) as url:
        version_after, replies_after = serving_version(url, character), sample_replies(url, character, prompts)
    metrics = operator_metrics(target, pods["operator"]["metadata"]["name"])
    return Report(resource, result, status, pods, version_before, version_after, replies_before, replies_after,
                  metrics, time.monotonic() - started)


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.flow", description=__doc__.splitlines()[0])
    parser.add_argument("--context", required=True, help="the kubeconfig context of the cluster (kind-<name>)")
    parser.add_argument("--namespace", default=DEPLOYED_NS)
    args = parser.parse_args(argv)
    try:
        report = run(Target(KubeContext(args.context), args.namespace))
    except FlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"\n{report.character}: {report.version_before or '(base)'} -> {report.version_after}, style "
          f"{report.style(report.replies_before):.2f} -> {report.style(report.replies_after):.2f}, "
          f"{report.seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
