"""Prometheus metrics. Each app gets its own registry, so several apps in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .adapter_metrics import EVAL_LOSSES, manifest_metrics
from .generation import AdapterStatus

# Chat latency on CPU ranges from tens of ms (tiny model) to tens of seconds (real model, long replies).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "chat_http_requests",
            "HTTP requests by route template, method and status code.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "chat_http_request_duration_seconds",
            "HTTP request latency by route template (streams: until the last byte).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "chat_errors",
            "Requests that failed, by route and kind (client = 4xx, server = 5xx, generation = model failure).",
            ["route", "kind"],
            registry=self.registry,
        )
        self.tokens_generated = Counter(
            "chat_tokens_generated",
            "Tokens generated, by character and the adapter version that produced them.",
            ["character", "adapter_version"],
            registry=self.registry,
        )
        self.generation_seconds = Histogram(
            "chat_generation_duration_seconds",
            "Time inside model.generate per reply, by character.",
            ["character"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.adapter_info = Gauge(
            "chat_adapter_info",
            "1 for the adapter version each character serves ('base' when it serves the base model).",
            ["character", "version"],
            registry=self.registry,
        )
        self.adapter_state = Gauge(
            "chat_adapter_state",
            "1 for each character's adapter state (loaded, absent, failed) and, when failed, the reason.",
            ["character", "state", "reason"],
            registry=self.registry,
        )
        self.model_loaded = Gauge(
            "chat_model_loaded", "1 once the base model and adapters are loaded.", registry=self.registry
        )
        self._add_version_metrics()

    def _add_version_metrics(self) -> None:
        """The metrics labelled by adapter version: users' thumbs and the serving run's eval losses."""
        self.feedback_votes = Counter(
            "chat_feedback_votes",
            "Thumbs up/down votes received, by character, the version that wrote the rated reply ('other' when this "
            "replica does not serve that version: keeps the label set bounded) and rating (up, down).",
            ["character", "version", "rating"],
            registry=self.registry,
        )
        self.adapter_eval_loss = Gauge(
            "chat_adapter_eval_loss",
            "Held-out eval loss of the run that trained the serving adapter, from its manifest: kind base (the base "
            "model), replaced (the version it replaced) or adapter (itself).",
            ["character", "version", "kind"],
            registry=self.registry,
        )

    def set_adapters(self, statuses: dict[str, AdapterStatus]) -> None:
        self.adapter_info.clear()
        self.adapter_state.clear()
        self.adapter_eval_loss.clear()
        for name, status in statuses.items():
            self.adapter_info.labels(character=name, version=status.serving_version).set(1)
            self.adapter_state.labels(character=name, state=status.state, reason=status.reason or "").set(1)
            metrics = manifest_metrics(status) or {}
            for kind, key in EVAL_LOSSES.items():
                if metrics.get(key) is not None:
                    self.adapter_eval_loss.labels(name, status.serving_version, kind).set(metrics[key])
