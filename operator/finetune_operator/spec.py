"""Typed, defaulted view of a CharacterFineTune's spec.

The API server applies the CRD's defaults before the operator sees an object; the same defaults are repeated here so
that the pure functions are total (unit tests and objects stored before a default existed still work). A unit test
checks that these defaults and the CRD's agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GROUP = "llmmultichat.io"
VERSION = "v1alpha1"
PLURAL = "characterfinetunes"
KIND = "CharacterFineTune"

DEFAULT_SCHEDULE = "0 3 1 * *"


@dataclass(frozen=True)
class SecretKeyRef:
    name: str
    key: str = "token"


@dataclass(frozen=True)
class DataSpec:
    history_url: str
    token: SecretKeyRef
    window_days: int = 30
    min_examples: int = 100
    max_examples: int | None = None


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.1
    target_modules: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrainingSpec:
    epochs: int = 3
    batch_size: int = 4
    learning_rate: float = 0.0003
    max_length: int = 512
    active_deadline_seconds: int = 21600
    backoff_limit: int = 1


@dataclass(frozen=True)
class ResourcesSpec:
    gpus: int = 1
    cpu: str | None = None
    memory: str | None = None
    shm_size: str = "1Gi"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class AdapterStorage:
    claim_name: str
    keep_versions: int = 5


@dataclass(frozen=True)
class EngineSpec:
    """target.engine: the chat Deployment generates through these vLLM pods, and a version is hot-loaded into them
    (engine.py) instead of mounted into the chat pods."""

    pod_selector: Mapping[str, str]
    kind: str = "vLLM"
    port: int = 8000
    adapters_path: str = "/adapters"
    max_loras: int = 4


@dataclass(frozen=True)
class TargetSpec:
    deployment: str
    container: str = "chat"
    engine: EngineSpec | None = None


@dataclass(frozen=True)
class FeedbackGuardSpec:
    """promotion.feedbackGuard: roll back a promoted version whose users' thumbs-down rate is worse than the previous
    version's by more than `max_down_rate_increase`, by a one-sided two-proportion z-test at `confidence`."""

    min_rated_replies: int = 50
    max_down_rate_increase: float = 0.05
    confidence: float = 0.95


@dataclass(frozen=True)
class PromotionSpec:
    mode: str = "Auto"
    min_improvement: float = 0.01
    feedback_guard: FeedbackGuardSpec | None = None  # absent: no guard (opt-in)

    @property
    def manual(self) -> bool:
        return self.mode == "Manual"


@dataclass(frozen=True)
class FineTuneSpec:
    character: str
    data: DataSpec
    adapter_storage: AdapterStorage
    target: TargetSpec
    schedule: str = DEFAULT_SCHEDULE
    time_zone: str | None = None
    suspend: bool = False
    base_model: str | None = None
    image: str | None = None
    model_claim: str | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    promotion: PromotionSpec = field(default_factory=PromotionSpec)
    pinned_version: str | None = None

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> FineTuneSpec:
        """Build from the resource's `spec` (camelCase as stored); missing optional parts take their defaults."""
        data = spec["data"]
        token = data.get("tokenSecretRef") or {}
        lora = spec.get("lora") or {}
        training = spec.get("training") or {}
        resources = spec.get("resources") or {}
        storage = spec["adapterStorage"]
        target = spec["target"]
        promotion = spec.get("promotion") or {}
        model_storage = spec.get("modelStorage") or {}
        return cls(
            character=spec["character"],
            schedule=spec.get("schedule", DEFAULT_SCHEDULE),
            time_zone=spec.get("timeZone") or None,
            suspend=bool(spec.get("suspend", False)),
            base_model=spec.get("baseModel") or None,
            image=spec.get("image") or None,
            model_claim=model_storage.get("claimName") or None,
            data=DataSpec(
                history_url=data["historyURL"],
                token=SecretKeyRef(name=token.get("name", ""), key=token.get("key", "token")),
                window_days=int(data.get("windowDays", 30)),
                min_examples=int(data.get("minExamples", 100)),
                max_examples=_opt_int(data.get("maxExamples")),
            ),
            lora=LoraSpec(
                r=int(lora.get("r", 8)),
                alpha=int(lora.get("alpha", 16)),
                dropout=float(lora.get("dropout", 0.1)),
                target_modules=tuple(lora.get("targetModules") or ()),
            ),
            training=TrainingSpec(
                epochs=int(training.get("epochs", 3)),
                batch_size=int(training.get("batchSize", 4)),
                learning_rate=float(training.get("learningRate", 0.0003)),
                max_length=int(training.get("maxLength", 512)),
                active_deadline_seconds=int(training.get("activeDeadlineSeconds", 21600)),
                backoff_limit=int(training.get("backoffLimit", 1)),
            ),
            resources=ResourcesSpec(
                gpus=int(resources.get("gpus", 1)),
                cpu=_opt_str(resources.get("cpu")),
                memory=_opt_str(resources.get("memory")),
                shm_size=str(resources.get("shmSize", "1Gi")),
                node_selector=dict(resources.get("nodeSelector") or {}),
                tolerations=tuple(dict(t) for t in resources.get("tolerations") or ()),
            ),
            adapter_storage=AdapterStorage(
                claim_name=storage["claimName"],
                keep_versions=int(storage.get("keepVersions", 5)),
            ),
            target=_target(target),
            promotion=PromotionSpec(
                mode=promotion.get("mode", "Auto"),
                min_improvement=float(promotion.get("minImprovement", 0.01)),
                feedback_guard=_feedback_guard(promotion.get("feedbackGuard")),
            ),
            pinned_version=spec.get("pinnedVersion") or None,
        )


def _feedback_guard(guard: Mapping[str, Any] | None) -> FeedbackGuardSpec | None:
    if guard is None:
        return None
    return FeedbackGuardSpec(
        min_rated_replies=int(guard.get("minRatedReplies", 50)),
        max_down_rate_increase=float(guard.get("maxDownRateIncrease", 0.05)),
        confidence=float(guard.get("confidence", 0.95)),
    )


def _target(target: Mapping[str, Any]) -> TargetSpec:
    return TargetSpec(deployment=target["deployment"], container=target.get("container", "chat"),
                      engine=_engine(target.get("engine")))


def _engine(engine: Mapping[str, Any] | None) -> EngineSpec | None:
    if engine is None:
        return None
    return EngineSpec(
        kind=str(engine.get("kind", "vLLM")),
        pod_selector={str(k): str(v) for k, v in (engine.get("podSelector") or {}).items()},
        port=int(engine.get("port", 8000)),
        adapters_path=str(engine.get("adaptersPath", "/adapters")),
        max_loras=int(engine.get("maxLoras", 4)),
    )


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_str(value: Any) -> str | None:
    # Quantities may arrive as int (x-kubernetes-int-or-string); Kubernetes wants them as strings in pod specs.
    return None if value is None else str(value)
