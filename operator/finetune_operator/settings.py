"""Operator settings, read once from the environment (every knob has a production default)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    #: Trainer image used when a resource does not name one.
    trainer_image: str = "llmmultichat/trainer:0.1.0"
    #: Namespaces to watch; empty means cluster-wide.
    namespaces: tuple[str, ...] = ()
    #: Port of the Prometheus `/metrics` endpoint; 0 disables it.
    metrics_port: int = 8080
    #: kopf liveness endpoint (served by kopf itself); empty disables it.
    liveness_endpoint: str = "http://0.0.0.0:8081/healthz"
    #: Name of the KopfPeering/ClusterKopfPeering object; replicas sharing it elect one active operator.
    peering_name: str = "finetune-operator"
    #: Peering priority; 0 means "pick a random one" so that two replicas never tie (a tie pauses both).
    peering_priority: int = 0
    #: Seconds between full resyncs of each resource (CronJob drift, Deployment mount drift, missed events).
    resync_seconds: float = 60.0
    #: Seconds between checks while a rollout is in progress.
    rollout_poll_seconds: float = 2.0
    #: Finished runs kept in status.history. Must exceed the CronJob's two Job history limits together, so that
    #: every Job still in the cluster is found there and never recorded twice.
    history_limit: int = 10
    #: CronJob / Job knobs that are policy rather than per-character choices.
    successful_jobs_history: int = 3
    failed_jobs_history: int = 3
    starting_deadline_seconds: int = 3600
    ttl_seconds_after_finished: int = 86400
    #: UID/GID the trainer runs as (the trainer image's non-root user).
    trainer_uid: int = 10001
    #: `json` (structured) or `plain` logs.
    log_format: str = "json"
    #: Fault injection for the restart-safety test only: the operator exits hard at this point ("after-run-recorded").
    crash_point: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        d = cls()

        def num(key: str, default: float) -> float:
            return float(env[key]) if env.get(key) else default

        def integer(key: str, default: int) -> int:
            return int(env[key]) if env.get(key) else default

        namespaces = tuple(n.strip() for n in env.get("FINETUNE_NAMESPACES", "").split(",") if n.strip())
        settings = cls(
            trainer_image=env.get("FINETUNE_TRAINER_IMAGE") or d.trainer_image,
            namespaces=namespaces,
            metrics_port=integer("FINETUNE_METRICS_PORT", d.metrics_port),
            liveness_endpoint=env.get("FINETUNE_LIVENESS_ENDPOINT", d.liveness_endpoint),
            peering_name=env.get("FINETUNE_PEERING_NAME") or d.peering_name,
            peering_priority=integer("FINETUNE_PEERING_PRIORITY", d.peering_priority),
            resync_seconds=num("FINETUNE_RESYNC_SECONDS", d.resync_seconds),
            rollout_poll_seconds=num("FINETUNE_ROLLOUT_POLL_SECONDS", d.rollout_poll_seconds),
            history_limit=integer("FINETUNE_HISTORY_LIMIT", d.history_limit),
            successful_jobs_history=integer("FINETUNE_SUCCESSFUL_JOBS_HISTORY", d.successful_jobs_history),
            failed_jobs_history=integer("FINETUNE_FAILED_JOBS_HISTORY", d.failed_jobs_history),
            starting_deadline_seconds=integer("FINETUNE_STARTING_DEADLINE_SECONDS", d.starting_deadline_seconds),
            ttl_seconds_after_finished=integer("FINETUNE_TTL_SECONDS_AFTER_FINISHED", d.ttl_seconds_after_finished),
            trainer_uid=integer("FINETUNE_TRAINER_UID", d.trainer_uid),
            log_format=env.get("FINETUNE_LOG_FORMAT") or d.log_format,
            crash_point=env.get("FINETUNE_CRASH_POINT", ""),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse settings that would break an invariant, at startup rather than at the first run."""
        if self.history_limit <= self.successful_jobs_history + self.failed_jobs_history:
            raise ValueError(
                "FINETUNE_HISTORY_LIMIT must exceed the CronJob's successful + failed Job history limits "
                f"({self.history_limit} <= {self.successful_jobs_history} + {self.failed_jobs_history})"
            )
        if self.history_limit > 20:
            raise ValueError("FINETUNE_HISTORY_LIMIT must be at most 20 (status.history's maxItems)")
        if self.resync_seconds <= 0 or self.rollout_poll_seconds <= 0:
            raise ValueError("resync and rollout poll intervals must be positive")
        if self.log_format not in ("json", "plain"):
            raise ValueError("FINETUNE_LOG_FORMAT must be json or plain")

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces
