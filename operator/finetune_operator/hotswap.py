"""The I/O of the hot promotion into a vLLM engine (the pure steps are in engine.py): vLLM's runtime LoRA API on each
ready engine pod, the ConfigMap `<deployment>-serving`, and the chat service's admin endpoint on each ready chat pod
(docs/contracts.md §6). Plain HTTP from the operator's pod to the pods' IPs (deploy/vllm's NetworkPolicies allow it).
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .engine import (
    EngineRefused,
    PodAddress,
    adapter_path,
    container_port,
    label_selector,
    pod_selector,
    ready_addresses,
    serving_configmap,
    to_load,
    to_unload,
)
from .kube import Kube, configmap_path, pods_path
from .manifests import deployment_field_manager
from .spec import FineTuneSpec

log = logging.getLogger(__name__)
BASE_NAME = "base"  # deploy/vllm's --served-model-name


class EngineUnreachable(Exception):
    """A pod did not answer or answered with a server error: try again at the next reconcile."""


def call(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 60.0,
         refused_500: bool = False) -> Any:
    """One JSON request; EngineRefused for a 4xx (the message the pod gave) or, with `refused_500`, a 500 (vLLM
    answers a load its worker refused, e.g. a rank over --max-lora-rank, with 500); EngineUnreachable otherwise."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        message = error_message(exc.read())
        # 401/403: our token or the pod's configuration, not the version; like a 5xx it is retried.
        if (400 <= exc.code < 500 and exc.code not in (401, 403)) or (refused_500 and exc.code == 500):
            raise EngineRefused(f"{method} {url} answered {exc.code}: {message}") from None
        raise EngineUnreachable(f"{method} {url} answered {exc.code}: {message}") from None
    except OSError as exc:
        raise EngineUnreachable(f"{method} {url}: {exc}") from None
    try:
        return json.loads(payload) if payload.strip() else None
    except ValueError:
        return payload.decode(errors="replace")  # vLLM's load/unload answer plain text ("Success: ...")


def error_message(payload: bytes) -> str:
    """vLLM's `{"error": {"message"}}` or FastAPI's `{"detail"}`, else the body."""
    try:
        body = json.loads(payload)
    except ValueError:
        return payload.decode(errors="replace")[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message"))
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        return str(detail.get("message", detail)) if isinstance(detail, dict) else str(detail)
    return json.dumps(body)[:500]


class HotSwap:
    """Makes one character's ready engine and chat pods serve one version (None: the base model)."""

    def __init__(self, kube: Kube, admin_token: str | None, timeout: float) -> None:
        self.kube, self.admin_token, self.timeout = kube, admin_token, timeout

    def engine_pods(self, namespace: str, spec: FineTuneSpec) -> list[PodAddress]:
        assert spec.target.engine is not None
        pods = self.kube.list(pods_path(namespace), label_selector=label_selector(spec.target.engine.pod_selector))
        return ready_addresses(pods, spec.target.engine.port)

    def converge(self, namespace: str, name: str, spec: FineTuneSpec, deployment: dict[str, Any],
                 version: str | None) -> None:
        """Load into every engine pod, record in the ConfigMap, switch every chat pod, then unload the rest.
        Idempotent: a step already in place costs one GET. Raises EngineRefused or EngineUnreachable."""
        engine = spec.target.engine
        assert engine is not None
        pods = self.engine_pods(namespace, spec)
        if not pods:
            raise EngineUnreachable(f"no ready engine pod matches {label_selector(engine.pod_selector)}")
        models = {pod: self.models(pod) for pod in pods}
        for pod in pods:
            self.load(pod, spec, version, models[pod])
        self.record(namespace, name, spec, version)
        chat = ready_addresses(self.kube.list(pods_path(namespace), label_selector=pod_selector(deployment)),
                               container_port(deployment, spec.target.container))
        for pod in chat:
            self.switch_chat(pod, spec.character, version)
        for pod in pods:
            # A fresh look: meanwhile a chat pod may have loaded an old name again for a request rendered for it.
            for adapter in to_unload(self.models(pod), spec.character, version):
                self.unload(pod, adapter)

    def models(self, pod: PodAddress) -> list[str]:
        answer = call("GET", f"{pod.url}/v1/models", timeout=self.timeout)
        return [str(m["id"]) for m in (answer or {}).get("data", [])]

    def load(self, pod: PodAddress, spec: FineTuneSpec, version: str | None, models: list[str]) -> None:
        engine = spec.target.engine
        assert engine is not None
        name = to_load(models, spec.character, version, engine.max_loras, BASE_NAME)
        if name is None or version is None:
            return
        path = adapter_path(engine, spec.character, version)
        log.info("loading %s into engine pod %s from %s", name, pod.name, path)
        try:
            call("POST", f"{pod.url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path},
                 timeout=self.timeout, refused_500=True)
        except EngineRefused as exc:
            if "already been loaded" not in str(exc):
                raise EngineRefused(f"engine pod {pod.name}: {exc}") from None
        models.append(name)

    def unload(self, pod: PodAddress, adapter: str) -> None:
        try:
            call("POST", f"{pod.url}/v1/unload_lora_adapter", {"lora_name": adapter}, timeout=self.timeout)
            log.info("unloaded %s from engine pod %s", adapter, pod.name)
        except (EngineRefused, EngineUnreachable) as exc:
            log.warning("unloading %s from engine pod %s failed, the next reconcile retries: %s", adapter, pod.name,
                        exc)

    def record(self, namespace: str, name: str, spec: FineTuneSpec, version: str | None, *,
               remove: bool = False) -> None:
        """The ConfigMap a chat pod reads when it starts: one key per character, each owned by its resource (an
        apply without the key, `remove`, takes it out)."""
        configmap = serving_configmap(spec.target.deployment)
        body = {"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": configmap, "namespace": namespace,
                             "labels": {"app.kubernetes.io/managed-by": "finetune-operator"}},
                "data": {} if remove else {spec.character: version or ""}}
        self.kube.apply(configmap_path(namespace, configmap), body,
                        field_manager=deployment_field_manager(namespace, name), force=True)

    def switch_chat(self, pod: PodAddress, character: str, version: str | None) -> None:
        quoted = urllib.parse.quote(character, safe="")
        serving = call("GET", f"{pod.url}/v1/characters/{quoted}/versions", timeout=self.timeout)
        if (serving or {}).get("serving_version") == (version or "base"):
            return
        log.info("switching chat pod %s: %s serves %s", pod.name, character, version or "the base model")
        try:
            call("PUT", f"{pod.url}/v1/admin/adapters/{quoted}", {"version": version}, token=self.admin_token,
                 timeout=self.timeout)
        except EngineRefused as exc:
            raise EngineRefused(f"chat pod {pod.name}: {exc}") from None
