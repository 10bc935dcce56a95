"""`make demo`: the whole fine-tuning loop as real pods on the local cluster, step by step.

control plane and real node up (containerd, runc, kubelet, kube-proxy, CoreDNS: docs/local-cluster.md) → the three
images built from their Dockerfiles on a local Debian base and imported into the node's containerd
(devkit.localimages) → devkit.flow, the flow `make kind-e2e` runs on kind too: deploy/embedded, the embedded model on
its volume, sample conversations through the chat API, a run started now from the operator's CronJob, the trainer
pod's result from its termination message, the promotion rolling the chat Deployment, replies before and after.

`--simulated` runs the same loop with the pods as local processes on kwok nodes instead (devkit.podrunner; the
operator as a process with its ServiceAccount's token, so its RBAC is exercised for real): the quick check that
`make test` runs on every change (tests/e2e/test_demo.py), without images.

Rerunning is safe: each run starts on a fresh namespace, and each run publishes a new adapter version.
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
import time
from pathlib import Path
from typing import Any

import yaml
from devkit import conversations, flow, localimages, realnode
from devkit.chat_api import PROBES_PER_PROMPT, sample_replies, serving_version
from devkit.cluster import Cluster, ClusterError, ensure_cluster
from devkit.flow import (
    BASE_MODEL_CLAIM,
    MODEL_DIR,
    FlowError,
    Report,
    Target,
    import_sample_history,
    require_trained,
    reset,
    start_job_now,
    step,
    wait_promoted,
)
from devkit.harness import OPERATOR_SA, OperatorProcess, free_port, service_account_kubeconfig, wait_chat_ready
from devkit.model import ensure_embedded_model
from devkit.paths import REPO_ROOT as REPO
from devkit.paths import SAMPLE_FINETUNE as SAMPLE
from devkit.podrunner import LocalPod, pvc_local_path, run_pod, start_pod_process, wait_for_pod
from devkit.rollsim import local_args
from devkit.waiting import wait_until

NAMESPACE = "llmmultichat"


def kube_json(cluster: Cluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


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


def apply_sample(cluster: Cluster, history_url: str) -> dict[str, Any]:
    """The sample resource as shipped, pointed at the locally running chat service."""
    resource = yaml.safe_load(SAMPLE.read_text())
    resource["metadata"]["namespace"] = NAMESPACE
    resource["spec"]["data"]["historyURL"] = history_url
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=yaml.safe_dump(resource))
    return resource


def run_training_now(cluster: Cluster, name: str) -> dict[str, Any]:
    job = start_job_now(Target(cluster, NAMESPACE), name)
    pod = wait_for_pod(cluster, NAMESPACE, f"job-name={job}", phase="Running", timeout=120)
    print(f"    job {job}: trainer pod {pod} runs as a local process", flush=True)
    result = run_pod(cluster, NAMESPACE, pod, env_overrides={"HF_HUB_OFFLINE": "1"}, timeout=1800, echo=sys.stdout)
    if result.exit_code != 0:
        raise RuntimeError(f"trainer failed ({result.exit_code}): {result.message}\n{result.stderr[-3000:]}")
    return require_trained(json.loads(result.message))


def run_simulated(cluster: Cluster, workdir: Path, *, sessions: int = 160) -> Report:
    """The loop with the operator, chat and trainer pods as local processes (see the module's docstring)."""
    started = time.monotonic()
    target = Target(cluster, NAMESPACE)
    step("Embedded base model (built once, then cached)")
    model = ensure_embedded_model()
    step(f"Fresh namespace {NAMESPACE}; deploy/embedded (one chat replica, SQLite); the model on its volume")
    reset(target)
    apply_manifests(cluster)
    token = set_history_token(cluster)
    place_base_model(cluster, model)
    resource = yaml.safe_load(SAMPLE.read_text())
    character, name = resource["spec"]["character"], resource["metadata"]["name"]
    prompts = conversations.held_out_prompts(character)
    with operator_process(cluster, workdir).start(standalone=False) as operator:
        step("Chat service: the chat Deployment's pod as a local process")
        chat, chat_pod, url = start_chat(cluster, free_port())
        try:
            step(f"Sample conversations for {character} and sora, imported through the chat API")
            import_sample_history(url, token, character, sessions)
            version_before, replies_before = serving_version(url, character), sample_replies(url, character, prompts)
            step("Apply deploy/samples/finetune.yaml and train now (kubectl create job --from=cronjob/...)")
            resource = apply_sample(cluster, url)
            trainer_result = run_training_now(cluster, name)
            step("Operator gates, promotes and rolls the chat Deployment")
            status = wait_promoted(target, name, trainer_result["version"], timeout=300)
        finally:
            chat.stop()
        step("Chat service restarted from the rolled pod, now mounting the adapter")
        chat, _, url = start_chat(cluster, free_port(), exclude={chat_pod})
        try:
            version_after, replies_after = serving_version(url, character), sample_replies(url, character, prompts)
        finally:
            chat.stop()
        metrics = operator.metrics()
    return Report(resource, trainer_result, status, {}, version_before, version_after, replies_before,
                  replies_after, metrics, time.monotonic() - started)


def run_on_real_node(cluster: Cluster, *, sessions: int = 160) -> Report:
    step("The project's images, built here and imported into the node (rebuilt only when their content changed)")
    if localimages.main([]) != 0:
        raise RuntimeError("building or importing the images failed; see the output above")
    return flow.run(Target(cluster, NAMESPACE, realnode.PLACEMENT), sessions=sessions)


def print_summary(cluster: Cluster, report: Report) -> None:
    step("kubectl get characterfinetunes")
    print(cluster.kubectl("-n", NAMESPACE, "get", "cft").stdout)
    metrics = report.trainer_result["metrics"]
    step("The run")
    print(f"    serving version     {report.version_before or '(base)'} -> {report.version_after}")
    print(f"    eval loss           base {metrics['eval_loss_base']:.3f} -> adapter {metrics['eval_loss_adapter']:.3f}")
    print(f"    style score         {report.style(report.replies_before):.2f} -> "
          f"{report.style(report.replies_after):.2f}")
    print(f"    tokens/s            {metrics.get('tokens_per_second', 0):.0f}")
    print(f"    training run        {metrics.get('duration_seconds', 0):.0f}s (the whole loop {report.seconds:.0f}s)")
    for role, pod in report.pods.items():
        status = pod["status"]["containerStatuses"][0]
        print(f"    {role + ' pod':<19} {pod['metadata']['name']} on {pod['spec']['nodeName']}: {status['image']}")
    step("Replies before / after (the first of each prompt's)")
    pairs = zip(report.replies_before, report.replies_after, strict=True)
    for before, after in itertools.islice(pairs, 0, None, PROBES_PER_PROMPT):
        print(f"    before: {before[:100]!r}\n    after:  {after[:100]!r}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=160, help="generated chat sessions per character")
    parser.add_argument("--simulated", action="store_true",
                        help="pods as local processes on kwok nodes: no real node, no images")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Stopped with SIGTERM, still stop the operator and chat processes it started (their `finally` blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    step("Local control plane" + ("" if args.simulated else " and real node") + " (make cluster-up)")
    cluster = ensure_cluster(real_node=not args.simulated)
    try:
        if args.simulated:
            with tempfile.TemporaryDirectory(prefix="llmmc-demo-") as tmp:
                report = run_simulated(cluster, Path(tmp), sessions=args.sessions)
        else:
            report = run_on_real_node(cluster, sessions=args.sessions)
    except (FlowError, ClusterError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_summary(cluster, report)
    print("\nDone. The cluster keeps running for `kubectl --kubeconfig .cluster/kubeconfig ...`;"
          " `make cluster-down` stops it.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
