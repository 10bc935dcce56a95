"""Promotion into a running vLLM engine without restarting it or rolling the chat Deployment (spec.target.engine,
contract §6): the real operator on the real control plane, a real vLLM process and a real chat service process.

The engine and the chat service run here as local processes; their Pod objects (labels as deploy/vllm, podIP patched
to 127.0.0.1 after kwok marked them Running) are how the operator finds them, as it would in a cluster. Opt-in:
`pytest --run-vllm tests/vllm`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from devkit.cluster import Cluster
from devkit.harness import ChatProcess, Env, environment, install_crd, trained, wait_until
from devkit.vllm_engine import VllmServer, build_adapter

pytestmark = [pytest.mark.vllm, pytest.mark.cluster]

V1, V2, V3, BROKEN = "20261201T030000Z", "20261202T030000Z", "20261203T030000Z", "20261204T030000Z"
TOKEN = "admin-s3cret"
CHARACTER = "lumina"


def write_manifest(directory: Path, version: str, base: Path) -> None:
    manifest = {"schema_version": 1, "character": CHARACTER, "version": version, "base_model": str(base),
                "prompt_template": "Instruction: {instruction}\nInput: {input}\nOutput: "}
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


@pytest.fixture(scope="module")
def volume(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The adapter volume (contract §2): three good versions and one whose rank the engine refuses (32 > its
    --max-lora-rank 16), which the chat service alone would accept (a valid PEFT config and manifest)."""
    root = tmp_path_factory.mktemp("hot-volume")
    for seed, version in enumerate((V1, V2, V3), start=11):
        write_manifest(build_adapter(tiny_llama, root / f"lora_{CHARACTER}" / version, seed=seed), version, tiny_llama)
    broken = root / f"lora_{CHARACTER}" / BROKEN
    shutil.copytree(root / f"lora_{CHARACTER}" / V1, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 32}))
    write_manifest(broken, BROKEN, tiny_llama)
    return root


def local_pod(env: Env, name: str, labels: dict[str, str]) -> None:
    """A Pod object standing for a local process: kwok marks it Running and Ready, then its IP becomes 127.0.0.1."""
    env.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "main", "image": "local"}]}}))
    wait_until(f"pod {name} running", lambda: (env.get("pod", name).get("status") or {}).get("podIP"), timeout=30)
    env.kubectl("patch", "pod", name, "--subresource=status", "--type=merge", "-p",
                json.dumps({"status": {"podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}]}}))


@dataclass
class Stack:
    env: Env
    engine: VllmServer
    chat: ChatProcess
    serving_dir: Path

    def reply_version(self) -> str:
        body = {"character": CHARACTER, "message": "hello", "max_tokens": 2, "temperature": 0}
        reply = httpx.post(f"{self.chat.url}/v1/chat", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        return str(reply.json()["adapter_version"])

    def engine_adapters(self) -> set[str]:
        models = httpx.get(f"{self.engine.url}/v1/models", timeout=30).json()["data"]
        return {m["id"] for m in models} - {"base"}

    def pin(self, version: str) -> None:
        patch = json.dumps({"spec": {"pinnedVersion": version}})
        self.env.kubectl("patch", "cft", CHARACTER, "--type=merge", "-p", patch)

    def wait_serving(self, version: str, timeout: float = 60) -> dict[str, Any]:
        return self.env.wait_status(CHARACTER, f"Ready serving {version}", lambda s: s.get("servingVersion") == version
                                    and s.get("phase") == "Ready", timeout=timeout)


@pytest.fixture(scope="module")
def stack(cluster: Cluster, engine: VllmServer, tiny_llama: Path, volume: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("hot-promotion")
    for name in {m["id"] for m in httpx.get(f"{engine.url}/v1/models", timeout=30).json()["data"]} - {"base"}:
        httpx.post(f"{engine.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)
    install_crd(cluster)
    serving_dir = tmp / "serving"  # the ConfigMap chat-serving as mounted (empty: the base model)
    serving_dir.mkdir()
    chat = ChatProcess(["--db", str(tmp / "chat.db"), "--adapters-root", str(tmp / "no-mounts")], {
        **os.environ, "BASE_MODEL": str(tiny_llama), "HF_HUB_OFFLINE": "1", "HISTORY_TOKEN": "t",
        "CHAT_ENGINE": "openai", "CHAT_ENGINE_URL": engine.url, "CHAT_ENGINE_ADAPTERS_ROOT": str(volume),
        "CHAT_ENGINE_SERVING_DIR": str(serving_dir), "CHAT_ADMIN_TOKEN": TOKEN}, tmp / "chat.log").start()
    with environment(cluster, tmp, replicas=0) as env:
        try:
            chat.wait_ready()
            env.kubectl("patch", "deployment", "chat", "--type=json", "-p", json.dumps([{
                "op": "add", "path": "/spec/template/spec/containers/0/ports",
                "value": [{"name": "http", "containerPort": chat.port}]}]))
            local_pod(env, "chat-local", {"app": "chat"})
            local_pod(env, "vllm-local", {"app.kubernetes.io/name": "vllm"})
            env.operator.start(FINETUNE_CHAT_ADMIN_TOKEN=TOKEN)
            env.apply_cft(CHARACTER, target={"deployment": "chat", "engine": {
                "kind": "vLLM", "podSelector": {"app.kubernetes.io/name": "vllm"}, "port": engine.port,
                "adaptersPath": str(volume), "maxLoras": 8}})
            yield Stack(env, engine, chat, serving_dir)
        finally:
            chat.stop()


def test_promotion_hot_loads_without_restarting_anything(stack: Stack) -> None:
    """A trained, approved run: the engine (same process) serves V1 within seconds, the chat service's replies say
    V1, the ConfigMap names it; then V2 over V1: V1 is unloaded after the switch and the Deployment never rolled."""
    env, pid = stack.env, stack.engine.process.pid if stack.engine.process else None
    generation = env.deployment()["metadata"]["generation"]
    assert stack.reply_version() == "base"
    started = time.monotonic()
    env.run_job(CHARACTER, "lumina-1", trained(CHARACTER, V1, adapter=2.2, base=3.1))
    stack.wait_serving(V1)
    assert stack.reply_version() == V1
    print(f"\nJob finished → Ready and replies from {V1}: {time.monotonic() - started:.1f}s")
    assert stack.engine_adapters() == {f"{CHARACTER}-{V1}"}
    assert env.get("configmap", "chat-serving")["data"] == {CHARACTER: V1}

    started = time.monotonic()
    stack.pin(V2)
    stack.wait_serving(V2)
    assert stack.reply_version() == V2
    seconds = time.monotonic() - started
    print(f"pin {V2} → Ready and replies from it: {seconds:.1f}s")
    assert seconds < 20, "a hot promotion takes seconds (0.8 s measured on 2 shared cores)"
    assert stack.engine_adapters() == {f"{CHARACTER}-{V2}"}  # the previous version unloaded after the switch
    assert stack.engine.process is not None and stack.engine.process.pid == pid  # no engine restart
    assert env.deployment()["metadata"]["generation"] == generation  # no roll: nothing mounted, nothing changed
    assert not env.mounts()
    assert len(env.events("Promoted")) == 2


def test_rollback_and_a_restarted_chat_pod(stack: Stack) -> None:
    """Pinning the previous version rolls back the same way; a chat process that starts later reads the version from
    the serving folder (the ConfigMap as mounted) and serves it from its first reply."""
    stack.pin(V2)
    stack.wait_serving(V2)
    stack.pin(V1)
    status = stack.wait_serving(V1)
    assert stack.reply_version() == V1 and status["previousVersion"] == V2
    assert stack.engine_adapters() == {f"{CHARACTER}-{V1}"}
    (stack.serving_dir / CHARACTER).write_text(stack.env.get("configmap", "chat-serving")["data"][CHARACTER])
    stack.chat.stop()
    stack.chat.start()
    ready = stack.chat.wait_ready()
    assert ready["characters"][CHARACTER]["serving"] == V1
    assert stack.reply_version() == V1


def test_restarted_engine_serves_the_current_version_again(stack: Stack) -> None:
    """The engine restarts (all adapters gone): the operator loads the serving version into it again on its own (no
    chat request needed), and replies come from that version."""
    stack.pin(V3)
    stack.wait_serving(V3)
    stack.engine.stop()
    stack.engine.start()
    wait_until("the operator re-loads V3 into the restarted engine",
               lambda: stack.engine_adapters() == {f"{CHARACTER}-{V3}"}, timeout=60, interval=0.5)
    assert stack.reply_version() == V3
    assert stack.env.status(CHARACTER)["phase"] == "Ready"


def test_refused_adapter_keeps_the_previous_version_serving(stack: Stack) -> None:
    """An adapter vLLM refuses to load: the previous version keeps answering, status says RolloutFailed with vLLM's
    own message, and nothing was switched or unloaded."""
    stack.pin(V1)
    stack.wait_serving(V1)
    stack.pin(BROKEN)
    status = stack.env.wait_status(CHARACTER, "RolloutFailed", lambda s: s.get("phase") == "RolloutFailed")
    assert status["servingVersion"] == V1 and status["failedVersion"] == BROKEN
    assert "LoRA rank 32 is greater than max_lora_rank" in status["failedReason"], status  # vLLM's words
    promoted = stack.env.condition(CHARACTER, "Promoted")
    assert promoted["reason"] == "RolloutFailed" and "max_lora_rank" in promoted["message"]
    assert any("max_lora_rank" in e["message"] for e in stack.env.events("RolloutFailed"))
    assert stack.reply_version() == V1
    assert stack.engine_adapters() == {f"{CHARACTER}-{V1}"}
    assert stack.env.get("configmap", "chat-serving")["data"] == {CHARACTER: V1}
