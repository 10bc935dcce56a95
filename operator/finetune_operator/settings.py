"""Operator settings: `FINETUNE_*` environment variables, read when the operator starts (never at import).

Every knob has a production default. `Settings()` reads the environment; `Settings(history_limit=12)` overrides it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Set to "" these mean something ("no liveness endpoint", "no fault"); any other knob set to "" keeps its default,
# as a `- name: FINETUNE_X` line with an empty value in a manifest always did.
EMPTY_IS_A_VALUE = frozenset({"namespaces", "liveness_endpoint", "crash_point"})
# The operator's fault-injection points, in the order of its flow (controller.Controller._crash): CronJob applied →
# Job seen running → result read and gated → run written to status → its Event → Job marked recorded → mount applied
# → rollout (or rollback) started in status → rollout observed complete → CronJob's --serving-version updated;
# and on deletion, the mount removed before the finalizer goes.
FAULT_POINTS = ("after-cronjob-applied", "after-job-seen", "after-result-read", "after-run-status-written",
                "after-run-event", "after-run-recorded", "after-deployment-patched", "after-rollout-started",
                "after-rollback-started", "after-rollout-observed", "after-serving-cronjob", "after-unmount")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FINETUNE_", frozen=True)

    #: Trainer image used when a resource does not name one (tests/test_images.py keeps it at the release's tag).
    trainer_image: str = "llmmultichat/trainer:4.0.0"
    #: Namespaces to watch, comma-separated in the environment; empty means cluster-wide.
    namespaces: Annotated[tuple[str, ...], NoDecode] = ()
    #: Port of the Prometheus `/metrics` endpoint; 0 disables it.
    metrics_port: int = Field(8080, ge=0, le=65535)
    #: kopf liveness endpoint (served by kopf itself); empty disables it.
    liveness_endpoint: str = "http://0.0.0.0:8081/healthz"
    #: Name of the KopfPeering/ClusterKopfPeering object; replicas sharing it elect one active operator.
    peering_name: str = "finetune-operator"
    #: Peering priority; 0 means "pick a random one" so that two replicas never tie (a tie pauses both).
    peering_priority: int = 0
    #: Seconds between full resyncs of each resource (CronJob drift, Deployment mount drift, missed events).
    resync_seconds: float = Field(60.0, gt=0)
    #: Seconds between checks while a rollout is in progress.
    rollout_poll_seconds: float = Field(2.0, gt=0)
    #: Seconds between the feedback guard's reads of the chat service (resources with promotion.feedbackGuard).
    feedback_poll_seconds: float = Field(60.0, gt=0)
    #: Finished runs kept in status.history (at most status.history's maxItems). Must exceed the CronJob's two Job
    #: history limits together, so that every Job still in the cluster is found there and never recorded twice.
    history_limit: int = Field(10, le=20)
    #: CronJob / Job knobs that are policy rather than per-character choices.
    successful_jobs_history: int = Field(3, ge=0)
    failed_jobs_history: int = Field(3, ge=0)
    starting_deadline_seconds: int = Field(3600, ge=0)
    ttl_seconds_after_finished: int = Field(86400, ge=0)
    #: UID/GID the trainer runs as (the trainer image's non-root user).
    trainer_uid: int = 10001
    #: `json` (structured) or `plain` logs.
    log_format: Literal["json", "plain"] = "json"
    #: Bearer token of the chat pods' PUT /v1/admin/adapters (engine targets; the Secret chat-admin-token).
    chat_admin_token: str | None = None
    #: Seconds between the checks that every ready engine and chat pod of an engine target serves its version (an
    #: engine pod that restarted or scaled up gets it again at the next one).
    engine_sync_seconds: float = Field(10.0, gt=0)
    #: Seconds one request to an engine or chat pod may take (a load reads the adapter from the volume).
    engine_timeout_seconds: float = Field(60.0, gt=0)
    #: Fault injection for the restart-safety tests only: the operator exits hard at this point (one of FAULT_POINTS).
    crash_point: str = ""

    @field_validator("*", mode="before")
    @classmethod
    def _empty_keeps_default(cls, value: Any, info: ValidationInfo) -> Any:
        if value == "" and info.field_name not in EMPTY_IS_A_VALUE:
            return cls.model_fields[info.field_name].default
        return value

    @field_validator("crash_point")
    @classmethod
    def _known_fault_point(cls, value: str) -> str:
        if value and value not in FAULT_POINTS:
            raise ValueError(f"unknown fault point {value!r}; one of {', '.join(FAULT_POINTS)}")
        return value

    @field_validator("namespaces", mode="before")
    @classmethod
    def _split_namespaces(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(n.strip() for n in value.split(",") if n.strip())
        return value

    @model_validator(mode="after")
    def _history_outlives_jobs(self) -> Settings:
        # Refused at startup rather than at the first run that would record a Job twice.
        if self.history_limit <= self.successful_jobs_history + self.failed_jobs_history:
            raise ValueError(
                "FINETUNE_HISTORY_LIMIT must exceed the CronJob's successful + failed Job history limits "
                f"({self.history_limit} <= {self.successful_jobs_history} + {self.failed_jobs_history})"
            )
        return self

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces
