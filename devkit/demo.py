"""`make demo`: the whole fine-tuning loop on the local control plane, step by step.

control plane up → CRD, RBAC, operator and chat manifests applied from `deploy/embedded` (deploy/ with one chat
replica on SQLite instead of PostgreSQL) → the operator runs as a local process with its ServiceAccount's token (so
its RBAC is exercised for real) → the chat Deployment's pod runs as a local process → sample conversations are
imported through the chat API → the sample `CharacterFineTune` is applied → a run is started now (`kubectl create
job --from=cronjob/...`) → the trainer pod runs as a local process → the operator gates, promotes and rolls the
Deployment → the new chat pod serves the adapter → before/after replies and scores are printed.

Rerunning is safe: every step converges on what is already there, and each run publishes a new adapter version.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from devkit import conversations
from devkit.cluster import Cluster, ensure_cluster
from devkit.harness import (
    OPERATOR_SA,
    OperatorProcess,
    free_port,
    service_account_kubeconfig,
    wait_chat_ready,
    wait_until,
)
from devkit.model import ensure_embedded_model
from devkit.paths import REPO_ROOT as REPO
from devkit.paths import SAMPLE_FINETUNE as SAMPLE
from devkit.podrunner import LocalPod, pvc_local_path, run_pod, start_pod_process, wait_for_pod
from devkit.rollsim import local_args

NAMESPACE = "llmmultichat"
BASE_MODEL_CLAIM = "llmmultichat-base-model"
PROBES_PER_PROMPT = 3
MODEL_DIR = "tinychat"  # where deploy/ expects the model on that volume (sample baseModel, chat BASE_MODEL)


@dataclass
class CharacterReport:
    character: str
    version_before: str | None
    version_after: str | None
    style_before: float
    style_after: float
    replies_before: list[str]
    replies_after: list[str]
    metrics: dict[str, Any]


@dataclass
class DemoResult:
    resource: dict[str, Any]
    report: CharacterReport
    trainer_result: dict[str, Any]
    operator_metrics: str
    chat_characters: list[dict[str, Any]] = field(default_factory=list)


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def kube_json(cluster: Cluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def reset_namespace(cluster: Cluster) -> None:
    """Delete the demo's namespace of an earlier run. No operator runs now to honour the resources' cleanup
    finalizer, and the whole namespace (the chat Deployment with it) goes anyway, so the finalizers are dropped."""
    if cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode != 0:
        return
    for name in cluster.kubectl("-n", NAMESPACE, "get", "cft", "-o", "name").stdout.split():
        cluster.kubectl("-n", NAMESPACE, "patch", name, "--type=merge", "-p", '{"metadata":{"finalizers":null}}')
    cluster.delete_namespace(NAMESPACE, wait=True)


def apply_manifests(cluster: Cluster) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(REPO / "deploy" / "embedded"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/characterfinetunes.llmmultichat.io", "--timeout=60s")


def set_history_token(cluster: Cluster) -> str:
    """Replace the Secret template's placeholder with a random token (kept when it is already set)."""
    secret = kube_json(cluster, "-n", NAMESPACE, "get", "secret", "chat-history-token")
    current = base64.b64decode(secret.get("data", {}).get("token", "")).decode()
    if current and current != "change-me-before-use":
        return current
    token = secrets.token_hex(24)
    manifest = cluster.kubectl(
        "-n", NAMESPACE, "create", "secret", "generic", "chat-history-token",
        f"--from-literal=token={token}", "--dry-run=client", "-o", "yaml",
    ).stdout
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=manifest)
    return token


def operator_process(cluster: Cluster, workdir: Path) -> OperatorProcess:
    """The operator Deployment's container, to run locally with the Deployment's env and the ServiceAccount's token
    (so the demo runs with its RBAC only)."""
    deployment = kube_json(cluster, "-n", NAMESPACE, "get", "deployment", OPERATOR_SA)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    settings = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    kubeconfig = service_account_kubeconfig(cluster, NAMESPACE, OPERATOR_SA, workdir / "operator-kubeconfig")
    return OperatorProcess(cluster, NAMESPACE, kubeconfig, workdir / "operator.log", settings=settings)


def place_base_model(cluster: Cluster, model: Path) -> None:
    """Copy the embedded model onto the base-model volume, where chat and trainer pods mount it."""
    target = pvc_local_path(cluster, NAMESPACE, BASE_MODEL_CLAIM) / MODEL_DIR
    if (target / ".source").exists() and (target / ".source").read_text() == str(model):
        return
    shutil.copytree(model, target, dirs_exist_ok=True)
    (target / ".source").write_text(str(model))


def start_chat(cluster: Cluster, port: int, *, exclude: set[str] = frozenset()) -> tuple[LocalPod, str, str]:
    """Run the chat Deployment's current Ready pod as a local process; returns it, its pod name and base URL."""
    pod_name = wait_until(
        "a Running chat pod of the current ReplicaSet",
        lambda: _current_chat_pod(cluster, exclude),
        timeout=120,
    )
    pod = kube_json(cluster, "-n", NAMESPACE, "get", "pod", pod_name)
    local = start_pod_process(cluster, NAMESPACE, pod_name, args_override=local_args(pod, port))
    url = f"http://127.0.0.1:{port}"
    wait_chat_ready(url, local.process, local.stderr_path, timeout=180)
    return local, pod_name, url


def _current_chat_pod(cluster: Cluster, exclude: set[str]) -> str | None:
    pods = kube_json(cluster, "-n", NAMESPACE, "get", "pods", "-l", "app.kubernetes.io/name=chat")["items"]
    for pod in pods:
        name = pod["metadata"]["name"]
        if name in exclude or pod["metadata"].get("deletionTimestamp") or pod["status"].get("phase") != "Running":
            continue
        return name
    return None


def import_history(url: str, token: str, messages: list[dict[str, Any]]) -> int:
    """Send recorded conversations through the chat API's import endpoint, in bounded batches."""
    imported = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        for start in range(0, len(messages), 200):
            batch = [{k: v for k, v in m.items() if k != "id"} for m in messages[start : start + 200]]
            response = client.post("/v1/history", json={"messages": batch})
            response.raise_for_status()
            imported += len(response.json()["ids"])
    return imported


def sample_replies(url: str, character: str, prompts: list[str]) -> list[str]:
    """:data:`PROBES_PER_PROMPT` replies to each prompt, each in a new session, sampled as the service serves them
    (the character's temperature): a style score over 8 replies moves in steps of 0.125, too coarse for a 0.1 bar."""
    replies = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for index, prompt in enumerate(prompts):
            for probe in range(PROBES_PER_PROMPT):
                body = {"character": character, "session_id": f"demo-probe-{index}-{probe}", "message": prompt}
                response = client.post("/v1/chat", json=body)
                response.raise_for_status()
                replies.append(response.json()["reply"])
    return replies


def serving_version(url: str, character: str) -> str | None:
    characters = httpx.get(f"{url}/v1/characters", timeout=10).json()["characters"]
    return next(c.get("adapter_version") for c in characters if c["name"] == character)


def apply_sample(cluster: Cluster, history_url: str) -> dict[str, Any]:
    """The sample resource as shipped, pointed at the locally running chat service."""
    resource = yaml.safe_load(SAMPLE.read_text())
    resource["metadata"]["namespace"] = NAMESPACE
    resource["spec"]["data"]["historyURL"] = history_url
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(resource))
    return resource


def run_training_now(cluster: Cluster, name: str, character: str) -> dict[str, Any]:
    cronjob = f"{name}-finetune"
    wait_until(f"CronJob {cronjob}", lambda: _exists(cluster, "cronjob", cronjob), timeout=60)
    job = f"{name}-now-{datetime.now(UTC):%Y%m%d%H%M%S}"
    cluster.kubectl("-n", NAMESPACE, "create", "job", f"--from=cronjob/{cronjob}", job)
    pod = wait_for_pod(cluster, NAMESPACE, f"job-name={job}", phase="Running", timeout=120)
    print(f"    job {job}: trainer pod {pod} runs as a local process", flush=True)
    result = run_pod(cluster, NAMESPACE, pod, env_overrides={"HF_HUB_OFFLINE": "1"}, timeout=1800, echo=sys.stdout)
    if result.exit_code != 0:
        raise RuntimeError(f"trainer failed ({result.exit_code}): {result.message}\n{result.stderr[-3000:]}")
    return json.loads(result.message)


def _exists(cluster: Cluster, kind: str, name: str) -> bool:
    return cluster.kubectl("-n", NAMESPACE, "get", kind, name, check=False).returncode == 0


def wait_ready_on(cluster: Cluster, name: str, version: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        resource = kube_json(cluster, "-n", NAMESPACE, "get", "cft", name)
        status = resource.get("status", {})
        if status.get("phase") in {"RolloutFailed", "Failed"}:
            raise RuntimeError(f"{name} ended {status['phase']}: {json.dumps(status.get('conditions'))}")
        last_run = status.get("lastRun") or {}
        if last_run.get("version") == version and last_run.get("outcome") in {"rejected", "failed", "skipped"}:
            outcome, reason = last_run["outcome"], last_run.get("reason")
            raise RuntimeError(f"the operator did not promote {version}: {outcome}: {reason}")
        if status.get("phase") == "Ready" and status.get("servingVersion") == version:
            return resource
        return None

    return wait_until(f"{name} Ready serving {version}", probe, timeout=300)


def run_demo(cluster: Cluster, workdir: Path, *, sessions: int = 160) -> DemoResult:
    step("Embedded base model (built once, then cached)")
    model = ensure_embedded_model()
    print(f"    {model}")

    step(f"Fresh namespace {NAMESPACE} (a rerun starts over: base model serving, no adapters)")
    reset_namespace(cluster)

    step("CRD, RBAC, operator and chat manifests from deploy/embedded (one chat replica, SQLite)")
    apply_manifests(cluster)
    token = set_history_token(cluster)
    place_base_model(cluster, model)

    resource_name = yaml.safe_load(SAMPLE.read_text())["metadata"]["name"]
    with operator_process(cluster, workdir).start(standalone=False) as operator:
        step("Chat service: the chat Deployment's pod as a local process")
        chat, chat_pod, url = start_chat(cluster, free_port())
        try:
            character = yaml.safe_load(SAMPLE.read_text())["spec"]["character"]
            step(f"Sample conversations for {character} and sora, imported through the chat API")
            now = datetime.now(UTC)
            for name, seed in ((character, 1), ("sora", 2)):
                history = conversations.generate_history(
                    name, sessions=sessions, seed=seed, start=now - timedelta(days=25), end=now - timedelta(minutes=1)
                )
                print(f"    {name}: {import_history(url, token, history)} messages")

            prompts = conversations.held_out_prompts(character)
            version_before = serving_version(url, character)
            replies_before = sample_replies(url, character, prompts)

            step("Apply deploy/samples/finetune.yaml and train now (kubectl create job --from=cronjob/...)")
            apply_sample(cluster, url)
            trainer_result = run_training_now(cluster, resource_name, character)
            print(f"    trainer: {trainer_result['outcome']} {trainer_result.get('version')}")
            if trainer_result["outcome"] != "trained":
                raise RuntimeError(f"trainer did not train: {trainer_result.get('reason')}")

            step("Operator gates, promotes and rolls the chat Deployment")
            resource = wait_ready_on(cluster, resource_name, trainer_result["version"])
            print(f"    {resource_name}: Ready, serving {trainer_result['version']}")
        finally:
            chat.stop()

        step("Chat service restarted from the rolled pod, now mounting the adapter")
        chat, _, url = start_chat(cluster, free_port(), exclude={chat_pod})
        try:
            version_after = serving_version(url, character)
            replies_after = sample_replies(url, character, prompts)
            chat_characters = httpx.get(f"{url}/v1/characters", timeout=10).json()["characters"]
        finally:
            chat.stop()
        operator_metrics = operator.metrics()

    report = CharacterReport(
        character=character,
        version_before=version_before,
        version_after=version_after,
        style_before=conversations.style_score(character, replies_before),
        style_after=conversations.style_score(character, replies_after),
        replies_before=replies_before,
        replies_after=replies_after,
        metrics=trainer_result["metrics"],
    )
    return DemoResult(resource, report, trainer_result, operator_metrics, chat_characters)


def print_summary(cluster: Cluster, result: DemoResult) -> None:
    report = result.report
    step("kubectl get characterfinetunes")
    print(cluster.kubectl("-n", NAMESPACE, "get", "cft").stdout)
    metrics = report.metrics
    step("The run")
    print(f"    serving version     {report.version_before or '(base)'} -> {report.version_after}")
    print(f"    eval loss           base {metrics['eval_loss_base']:.3f} -> adapter {metrics['eval_loss_adapter']:.3f}")
    print(f"    style score         {report.style_before:.2f} -> {report.style_after:.2f}")
    print(f"    tokens/s            {metrics.get('tokens_per_second', 0):.0f}")
    print(f"    training run        {metrics.get('duration_seconds', 0):.0f}s")
    step("Replies before / after (the first of each prompt's)")
    pairs = zip(report.replies_before, report.replies_after, strict=True)
    for before, after in itertools.islice(pairs, 0, None, PROBES_PER_PROMPT):
        print(f"    before: {before[:100]!r}\n    after:  {after[:100]!r}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=160, help="generated chat sessions per character")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Stopped with SIGTERM, still stop the operator and chat processes it started (their `finally` blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    step("Local control plane (make cluster-up)")
    cluster = ensure_cluster()
    with tempfile.TemporaryDirectory(prefix="llmmc-demo-") as tmp:
        result = run_demo(cluster, Path(tmp), sessions=args.sessions)
    print_summary(cluster, result)
    print("\nDone. The control plane keeps running for `kubectl --kubeconfig .cluster/kubeconfig ...`;"
          " `make cluster-down` stops it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
