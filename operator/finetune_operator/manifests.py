"""Pure builders of what the operator writes: the trainer CronJob and its share of the chat Deployment.

Both are written with server-side apply, so each builder returns a complete *apply configuration*: the fields this
operator (or one resource, for the Deployment) owns, nothing else. Contract references are to docs/contracts.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from .settings import Settings
from .spec import FineTuneSpec

# Contract §5: labels on the CronJob, its Job template and pod template.
LABEL_FINETUNE = "llmmultichat.io/finetune"
LABEL_CHARACTER = "llmmultichat.io/character"
# Contract §5: a person approves a version with `promotion: Manual`.
ANNOTATION_PROMOTE = "llmmultichat.io/promote"
ANNOTATION_ADAPTER_PREFIX = "llmmultichat.io/adapter-"
# Set on a training Job once its result is recorded in the resource's status. status.history is bounded, so it alone
# cannot remember every Job still in the cluster (Jobs created by hand outlive the CronJob's history limits).
ANNOTATION_RECORDED = "finetune.llmmultichat.io/recorded"

TRAINER_CONTAINER = "trainer"
ADAPTER_ROOT = "/adapters"
MODELS_ROOT = "/models"
RESULT_FILE = "/dev/termination-log"
FIELD_MANAGER = "finetune-operator"


def cronjob_name(name: str) -> str:
    return f"{name}-finetune"


def resource_labels(name: str, character: str) -> dict[str, str]:
    return {
        LABEL_FINETUNE: name,
        LABEL_CHARACTER: character,
        "app.kubernetes.io/name": "llmmultichat-trainer",
        "app.kubernetes.io/component": "finetune",
        "app.kubernetes.io/managed-by": "finetune-operator",
    }


def deployment_field_manager(namespace: str, name: str) -> str:
    """One field manager per resource: its mount is its own, and another resource's apply cannot remove it."""
    return f"{FIELD_MANAGER}/{namespace}.{name}"


def adapter_annotation(character: str) -> str:
    return f"{ANNOTATION_ADAPTER_PREFIX}{character}"


def adapter_volume_name(character: str) -> str:
    return f"lora-{character}"


def adapter_mount_path(character: str) -> str:
    return f"{MODELS_ROOT}/lora_{character}"


def adapter_sub_path(character: str, version: str) -> str:
    # Contract §2: <root>/lora_<character>/<version>/ on the adapter volume.
    return f"lora_{character}/{version}"


def trainer_args(spec: FineTuneSpec, serving_version: str | None) -> list[str]:
    """The trainer's command-line flags (contract §4). The history token never appears here: it is an env var."""
    args = ["--character", spec.character]
    if spec.base_model:
        args += ["--base-model", spec.base_model]
    args += [
        "--history-url", spec.data.history_url,
        "--days", str(spec.data.window_days),
        "--min-examples", str(spec.data.min_examples),
    ]
    if spec.data.max_examples is not None:
        args += ["--max-examples", str(spec.data.max_examples)]
    args += [
        "--epochs", str(spec.training.epochs),
        "--batch-size", str(spec.training.batch_size),
        "--learning-rate", repr(spec.training.learning_rate),
        "--max-length", str(spec.training.max_length),
        "--lora-r", str(spec.lora.r),
        "--lora-alpha", str(spec.lora.alpha),
        "--lora-dropout", repr(spec.lora.dropout),
    ]
    if spec.lora.target_modules:
        args += ["--target-modules", ",".join(spec.lora.target_modules)]
    args += ["--output-root", ADAPTER_ROOT, "--keep-versions", str(spec.adapter_storage.keep_versions)]
    if serving_version:
        # The trainer evaluates against it and never prunes it.
        args += ["--serving-version", serving_version]
    args += ["--result-file", RESULT_FILE]
    return args


def trainer_resources(spec: FineTuneSpec) -> dict[str, dict[str, str]]:
    limits: dict[str, str] = {}
    if spec.resources.cpu:
        limits["cpu"] = spec.resources.cpu
    if spec.resources.memory:
        limits["memory"] = spec.resources.memory
    if spec.resources.gpus > 0:
        limits["nvidia.com/gpu"] = str(spec.resources.gpus)
    # Requests equal limits: a training run should neither be throttled nor evicted for memory half-way.
    return {"requests": dict(limits), "limits": dict(limits)} if limits else {}


def trainer_tolerations(spec: FineTuneSpec) -> list[dict[str, Any]]:
    tolerations = [dict(t) for t in spec.resources.tolerations]
    if spec.resources.gpus > 0 and not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
        # GPU nodes are tainted so that only pods asking for GPUs land there.
        tolerations.append({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"})
    return tolerations


def trainer_storage(spec: FineTuneSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The trainer's volume mounts and the pod's volumes: adapters (read-write), shared memory, /tmp, the models."""
    mounts: list[dict[str, Any]] = [
        {"name": "adapters", "mountPath": ADAPTER_ROOT},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "adapters", "persistentVolumeClaim": {"claimName": spec.adapter_storage.claim_name}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if spec.model_claim:
        mounts.append({"name": "models", "mountPath": MODELS_ROOT, "readOnly": True})
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": spec.model_claim,
                                                                    "readOnly": True}})
    return mounts, volumes


def trainer_container(spec: FineTuneSpec, serving_version: str | None, settings: Settings,
                      mounts: list[dict[str, Any]]) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "HISTORY_TOKEN", "valueFrom": {"secretKeyRef": {"name": spec.data.token.name,
                                                                  "key": spec.data.token.key}}},
        # The root filesystem is read-only: caches (HF, torch, triton) go to the /tmp emptyDir.
        {"name": "HOME", "value": "/tmp"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-m", "training.lora_tuning"],
        "args": trainer_args(spec, serving_version),
        "env": env,
        "volumeMounts": mounts,
        # The result JSON goes to /dev/termination-log; a crash before it is written leaves the log tail instead.
        "terminationMessagePath": RESULT_FILE,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    resources = trainer_resources(spec)
    if resources:
        container["resources"] = resources
    return container


def trainer_pod_spec(spec: FineTuneSpec, serving_version: str | None, settings: Settings) -> dict[str, Any]:
    mounts, volumes = trainer_storage(spec)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        # The trainer talks to the chat service, never to the Kubernetes API.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": settings.trainer_uid,
            "runAsGroup": settings.trainer_uid,
            "fsGroup": settings.trainer_uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [trainer_container(spec, serving_version, settings, mounts)],
        "volumes": volumes,
    }
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    tolerations = trainer_tolerations(spec)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    return pod_spec


def build_cronjob(
    *,
    name: str,
    namespace: str,
    spec: FineTuneSpec,
    serving_version: str | None,
    settings: Settings,
    owner: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The CronJob that runs this resource's trainer: a full apply configuration, owned by the resource."""
    labels = resource_labels(name, spec.character)
    cron_spec: dict[str, Any] = {
        "schedule": spec.schedule,
        "suspend": spec.suspend,
        # One training run per character at a time; a slow run makes the next schedule wait, not pile up.
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": settings.starting_deadline_seconds,
        "successfulJobsHistoryLimit": settings.successful_jobs_history,
        "failedJobsHistoryLimit": settings.failed_jobs_history,
        "jobTemplate": {
            "metadata": {"labels": dict(labels)},
            "spec": {
                "backoffLimit": spec.training.backoff_limit,
                "activeDeadlineSeconds": spec.training.active_deadline_seconds,
                "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
                "template": {"metadata": {"labels": dict(labels)},
                             "spec": trainer_pod_spec(spec, serving_version, settings)},
            },
        },
    }
    if spec.time_zone:
        cron_spec["timeZone"] = spec.time_zone
    cronjob: dict[str, Any] = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": cronjob_name(name), "namespace": namespace, "labels": dict(labels)},
        "spec": cron_spec,
    }
    if owner is not None:
        # Controller owner reference (+ the owner's labels): the CronJob, and through it its Jobs, go with the resource.
        # Our own labels are set first and are not overwritten (kopf.adopt does not force).
        kopf.adopt(cronjob, owner=owner)  # type: ignore[arg-type]
    return cronjob


def mount_apply_config(
    *, namespace: str, spec: FineTuneSpec, version: str
) -> dict[str, Any]:
    """This resource's share of the chat Deployment: one read-only adapter mount and a version annotation.

    Applied with the resource's own field manager: list entries are keyed (containers by name, volumeMounts by
    mountPath, volumes by name), so several characters' mounts coexist in one Deployment. The annotation makes
    every version change a pod-template change, hence a rollout.
    """
    character = spec.character
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": spec.target.deployment, "namespace": namespace},
        "spec": {
            "template": {
                "metadata": {"annotations": {adapter_annotation(character): version}},
                "spec": {
                    "containers": [
                        {
                            "name": spec.target.container,
                            "volumeMounts": [
                                {
                                    "name": adapter_volume_name(character),
                                    "mountPath": adapter_mount_path(character),
                                    "subPath": adapter_sub_path(character, version),
                                    "readOnly": True,
                                }
                            ],
                        }
                    ],
                    "volumes": [
                        {
                            "name": adapter_volume_name(character),
                            "persistentVolumeClaim": {"claimName": spec.adapter_storage.claim_name,
                                                      "readOnly": True},
                        }
                    ],
                },
            }
        },
    }


def unmount_apply_config(*, namespace: str, spec: FineTuneSpec) -> dict[str, Any]:
    """An empty apply configuration: applying it with the resource's field manager removes exactly its fields."""
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": spec.target.deployment, "namespace": namespace},
    }


def mounted_version(deployment: Mapping[str, Any], spec: FineTuneSpec) -> str | None:
    """The version the Deployment's pod template mounts for this character, read from the mount's subPath."""
    prefix = f"lora_{spec.character}/"
    for container in _containers(deployment):
        if container.get("name") != spec.target.container:
            continue
        for mount in container.get("volumeMounts") or ():
            if mount.get("mountPath") == adapter_mount_path(spec.character):
                sub_path = str(mount.get("subPath") or "")
                return sub_path[len(prefix):] if sub_path.startswith(prefix) else None
    return None


def target_engine(deployment: Mapping[str, Any] | None, container: str) -> str | None:
    """The serving engine a target declares: "vllm" when its chat container generates through an OpenAI-compatible
    engine (`CHAT_ENGINE=openai`, what deploy/vllm sets: vLLM), else None (in-process generation)."""
    for spec in _containers(deployment or {}):
        if spec.get("name") != container:
            continue
        for variable in spec.get("env") or ():
            if variable.get("name") == "CHAT_ENGINE" and variable.get("value") == "openai":
                return "vllm"
    return None


def has_container(deployment: Mapping[str, Any], container: str) -> bool:
    return any(c.get("name") == container for c in _containers(deployment))


def _containers(deployment: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(((deployment.get("spec") or {}).get("template") or {}).get("spec", {}).get("containers") or [])

