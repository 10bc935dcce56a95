"""deploy/vllm: the engine component agrees with the chat service pointed at it, and the API server accepts it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from chat_service.config import Settings, env_var
from devkit.paths import DEPLOY, REPO_ROOT
from devkit.vllm_engine import engine_container

COMPONENT = DEPLOY / "vllm"


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((COMPONENT / name).read_text(encoding="utf-8")) if doc]


def chat_env() -> dict[str, str]:
    (patch,) = load("chat-engine.yaml")
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", "") for e in container["env"]}


def engine_pod() -> dict[str, Any]:
    (deployment,) = load("engine.yaml")
    return deployment["spec"]["template"]["spec"]


def flag(args: tuple[str, ...], name: str) -> str:
    return next(arg.split("=", 1)[1] for arg in args if arg.startswith(f"{name}="))


def test_the_chat_service_reaches_the_engine_service_and_its_adapter_mount() -> None:
    env = chat_env()
    assert set(env) <= {env_var(name) for name in Settings.model_fields}  # real settings, not typos
    (service,) = load("service.yaml")
    url = urlsplit(env["CHAT_ENGINE_URL"])
    container = engine_container()
    assert url.hostname == service["metadata"]["name"]
    assert url.port == service["spec"]["ports"][0]["port"] == int(flag(container.args, "--port"))
    pod = engine_pod()
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    claims = {v["name"]: v["persistentVolumeClaim"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    # The service loads <CHAT_ENGINE_ADAPTERS_ROOT>/lora_<c>/<version>: that must be the adapter volume in the pod.
    assert mounts["adapters"]["mountPath"] == env["CHAT_ENGINE_ADAPTERS_ROOT"]
    assert mounts["adapters"]["readOnly"] and claims["adapters"]["readOnly"]
    chat = yaml.safe_load((DEPLOY / "chat" / "storage.yaml").read_text(encoding="utf-8").split("---")[0])
    assert claims["adapters"]["claimName"] == chat["metadata"]["name"]
    assert flag(container.args, "--served-model-name") == Settings.model_fields["engine_base_name"].default


def test_the_engine_is_a_gpu_deployment_with_runtime_lora_and_probes() -> None:
    pod = engine_pod()
    container = pod["containers"][0]
    assert container["image"].startswith("vllm/vllm-openai:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    assert "--enable-lora" in container["args"]


@pytest.mark.cluster
def test_deploy_with_the_vllm_component_applies_server_side(cluster: Any, tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    relative = Path(os.path.relpath(DEPLOY, overlay))
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "namespace": "llmmultichat",
                "resources": [str(relative)],
                "components": [str(relative / "vllm")],
            }
        ),
        encoding="utf-8",
    )
    rendered = [doc for doc in yaml.safe_load_all(cluster.kubectl("kustomize", str(overlay)).stdout) if doc]
    names = {(doc["kind"], doc["metadata"]["name"]) for doc in rendered}
    assert {("Deployment", "vllm"), ("Service", "vllm"), ("NetworkPolicy", "vllm-ingress")} <= names
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-k", str(REPO_ROOT / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/characterfinetunes.llmmultichat.io", "--timeout=60s")
    cluster.kubectl("apply", "--server-side", "-f", str(DEPLOY / "namespace" / "namespace.yaml"))
    out = cluster.kubectl("apply", "--server-side", "--dry-run=server", "-k", str(overlay))
    assert "deployment.apps/vllm" in out.stdout
    sample_file = DEPLOY / "samples" / "finetune-vllm.yaml"
    sample = cluster.kubectl("apply", "--server-side", "--dry-run=server", "--validate=strict", "-f", str(sample_file))
    assert "characterfinetune.llmmultichat.io/sora" in sample.stdout


def test_the_hot_promotion_finds_what_the_manifests_declare() -> None:
    """The sample's target.engine names the engine pods and port; the chat patch mounts the whole adapter volume at
    the engine's path and the operator's ConfigMap at CHAT_ENGINE_SERVING_DIR; chat and operator share the admin
    token's Secret (contract §6)."""
    from finetune_operator.engine import serving_configmap
    from finetune_operator.spec import FineTuneSpec

    sample = yaml.safe_load((DEPLOY / "samples" / "finetune-vllm.yaml").read_text(encoding="utf-8"))
    engine = FineTuneSpec.from_dict(sample["spec"]).target.engine
    assert engine is not None and engine.kind == "vLLM"
    (deployment,) = load("engine.yaml")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert engine.pod_selector.items() <= labels.items()
    args = engine_container().args
    assert engine.port == int(flag(args, "--port"))
    assert 2 <= engine.max_loras <= int(flag(args, "--max-cpu-loras"))
    (patch,) = load("chat-engine.yaml")
    pod = patch["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    env = chat_env()
    assert mounts["adapters"]["mountPath"] == env["CHAT_ENGINE_ADAPTERS_ROOT"] == engine.adapters_path
    assert volumes["adapters"]["persistentVolumeClaim"] == engine_pod()["volumes"][1]["persistentVolumeClaim"]
    assert mounts["serving"]["mountPath"] == env["CHAT_ENGINE_SERVING_DIR"]
    assert volumes["serving"]["configMap"] == {"name": serving_configmap(sample["spec"]["target"]["deployment"]),
                                               "optional": True}
    (operator,) = load("operator-engine.yaml")
    secrets = [e["valueFrom"]["secretKeyRef"] for doc in (patch, operator)
               for e in doc["spec"]["template"]["spec"]["containers"][0]["env"] if "valueFrom" in e]
    assert secrets == [{"name": "chat-admin-token", "key": "token", "optional": True}] * 2
