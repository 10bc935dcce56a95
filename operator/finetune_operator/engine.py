"""Pure functions of the hot promotion into a vLLM engine (spec.target.engine; contract §6).

The serving side of such a target converges on every reconcile, with the same steps whether a version is new or a pod
is: every ready engine pod holds `<character>-<version>` (loaded from the adapter volume), the ConfigMap
`<deployment>-serving` names the version (what a chat pod that starts later reads), every ready chat pod serves it,
and the engine pods drop this character's other versions. A version the engine (or the chat service) refuses is not
switched to: the previous one keeps serving and the status says RolloutFailed with the refusal's words.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .spec import EngineSpec, FineTuneSpec
from .status import Event, Plan, desired_version, plan_rollout, rollout_complete

VERSION = re.compile(r"^[0-9]{8}T[0-9]{6}Z$")  # contract §2; also pinnedVersion's pattern
SERVING_SUFFIX = "-serving"


class EngineRefused(Exception):
    """The engine (or a chat pod) refused the version itself: retrying the same version cannot help."""


@dataclass(frozen=True)
class PodAddress:
    name: str
    url: str


def adapter_name(character: str, version: str) -> str:
    """The engine's name for one version: a name never stands for two sets of weights (vLLM #42125)."""
    return f"{character}-{version}"


def adapter_path(engine: EngineSpec, character: str, version: str) -> str:
    return f"{engine.adapters_path.rstrip('/')}/lora_{character}/{version}"


def serving_configmap(deployment: str) -> str:
    return f"{deployment}{SERVING_SUFFIX}"


def label_selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def is_ready(pod: Mapping[str, Any]) -> bool:
    """Running, not terminating, with an IP and the Ready condition: what a Service would route to."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return False
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or ())


def ready_addresses(pods: Iterable[Mapping[str, Any]], port: int) -> list[PodAddress]:
    """Base URLs of the ready pods, by name (a stable order, so that logs and retries read the same)."""
    ready = sorted((p for p in pods if is_ready(p)), key=lambda p: p["metadata"]["name"])
    return [PodAddress(p["metadata"]["name"], _url(p["status"]["podIP"], port)) for p in ready]


def _url(ip: str, port: int) -> str:
    return f"http://[{ip}]:{port}" if ":" in ip else f"http://{ip}:{port}"


def container_port(deployment: Mapping[str, Any], container: str, default: int = 8000) -> int:
    """The chat container's API port: the one named http, else its first, else `default`."""
    for spec in ((deployment.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or ():
        if spec.get("name") != container:
            continue
        ports = list(spec.get("ports") or ())
        named = [p for p in ports if p.get("name") == "http"]
        for port in named or ports:
            return int(port["containerPort"])
    return default


def pod_selector(deployment: Mapping[str, Any]) -> str:
    """The Deployment's pods (its matchLabels; matchExpressions are not used by the shipped manifests)."""
    return label_selector(((deployment.get("spec") or {}).get("selector") or {}).get("matchLabels") or {})


def loaded_versions(models: Sequence[str], character: str) -> list[str]:
    """This character's versions among the engine's model names (other characters' and the base are not)."""
    prefix = f"{character}-"
    return sorted(m[len(prefix):] for m in models if m.startswith(prefix) and VERSION.match(m[len(prefix):]))


def to_load(models: Sequence[str], character: str, version: str | None, max_loras: int, base: str) -> str | None:
    """The adapter to load into a pod serving `models` (None: nothing to load). Raises EngineRefused when the pod
    would hold more than `max_loras` adapters."""
    if version is None or adapter_name(character, version) in models:
        return None
    adapters = [m for m in models if m != base]
    if len(adapters) + 1 > max_loras:
        raise EngineRefused(f"loading {adapter_name(character, version)} would make {len(adapters) + 1} adapters, "
                            f"over target.engine.maxLoras {max_loras} (loaded: {', '.join(sorted(adapters))})")
    return adapter_name(character, version)


def to_unload(models: Sequence[str], character: str, keep: str | None) -> list[str]:
    """This character's versions other than `keep`: after a switch nobody asks for them any more."""
    return [adapter_name(character, v) for v in loaded_versions(models, character) if v != keep]


def plan_engine(spec: FineTuneSpec, annotations: Mapping[str, str], status: Mapping[str, Any], now: str) -> Plan:
    """The next serving step of an engine target: `apply`/`unmount` a new desired version (its `rollout` is the
    switch about to happen, never left in the status) or `none` (converge on what serves)."""
    st = copy.deepcopy(dict(status))
    st["rollout"] = None  # a switch is done within one reconcile; an interrupted one is simply done again
    plan = plan_rollout(spec, desired_version(spec, annotations, status), st.get("servingVersion") or None, st, now)
    if plan.action == "apply":
        plan.events = [Event("Normal", "Promoting", f"loading adapter {plan.version} into the vLLM engine pods")]
    return plan


def switched(plan: Plan, status: Mapping[str, Any]) -> Plan:
    """Every pod serves the plan's version now: the status and events of a completed rollout."""
    st = {**plan.status, "rollout": None}
    done = rollout_complete(plan.status["rollout"], st, status)
    return Plan("none", done.status, events=[*plan.events, *done.events], counters=done.counters)


def refused(plan: Plan, status: Mapping[str, Any], message: str) -> Plan:
    """The version was refused: the previous one keeps serving; failedVersion keeps it from being tried again until
    the desired version changes."""
    version = plan.version
    st = {**copy.deepcopy(dict(status)), "rollout": None, "failedVersion": version or "", "failedReason": message}
    serving = st.get("servingVersion") or "the base model"
    event = Event("Warning", "RolloutFailed", f"adapter {version} not switched to, {serving} keeps serving: {message}")
    return Plan("none", st, events=[event], counters=[])
