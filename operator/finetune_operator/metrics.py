"""Prometheus metrics of the operator, served on FINETUNE_METRICS_PORT at /metrics."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

RUNS = Counter(
    "finetune_runs_total", "Finished training runs by outcome (trained, rejected, skipped, failed).",
    ["namespace", "name", "outcome"], registry=REGISTRY,
)
PROMOTIONS = Counter(
    "finetune_promotions_total", "Adapter versions rolled out successfully.", ["namespace", "name"],
    registry=REGISTRY,
)
ROLLBACKS = Counter(
    "finetune_rollbacks_total", "Rollbacks: failed rollouts, and versions the feedback guard rolled back.",
    ["namespace", "name"],
    registry=REGISTRY,
)
FEEDBACK_REGRESSIONS = Counter(
    "finetune_feedback_regressions_total",
    "Promoted versions the feedback guard rolled back: users' thumbs-down rate clearly worse than the previous one's.",
    ["namespace", "name"], registry=REGISTRY,
)
RECONCILE_ERRORS = Counter(
    "finetune_reconcile_errors_total", "Reconcile attempts that failed (they are retried).", ["handler"],
    registry=REGISTRY,
)
LAST_SUCCESS = Gauge(
    "finetune_last_success_timestamp_seconds", "Unix time of the last run that trained an adapter.",
    ["namespace", "name"], registry=REGISTRY,
)
PATCH_LATENCY = Histogram(
    "finetune_job_to_patch_seconds",
    "From seeing a finished Job to the Deployment patched with its adapter (Auto promotion).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=REGISTRY,
)


def serve(port: int) -> None:
    """Start the /metrics HTTP server in a daemon thread (port 0: disabled)."""
    if port:
        start_http_server(port, registry=REGISTRY)


def forget(namespace: str, name: str) -> None:
    """Drop a deleted resource's series so dashboards do not show ghosts."""
    for metric in (PROMOTIONS, ROLLBACKS, FEEDBACK_REGRESSIONS, LAST_SUCCESS):
        with contextlib.suppress(KeyError):
            metric.remove(namespace, name)
    for outcome in ("trained", "rejected", "skipped", "failed"):
        with contextlib.suppress(KeyError):
            RUNS.remove(namespace, name, outcome)
