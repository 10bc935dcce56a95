"""The Grafana dashboard (deploy/monitoring/) queries only series that the operator or the chat service exports."""

from __future__ import annotations

import json
import re

import yaml
from chat_service.metrics import Metrics
from devkit.paths import DEPLOY
from finetune_operator.metrics import REGISTRY
from prometheus_client import CollectorRegistry

DASHBOARD = DEPLOY / "monitoring" / "dashboard.json"
# The series a metric family is queried by, per type.
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def exported_series(registry: CollectorRegistry) -> set[str]:
    return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


def queried_series(expr: str) -> set[str]:
    # Our metric names carry one of two prefixes; no label, function or keyword in PromQL does.
    return set(re.findall(r"\b(?:finetune|chat)_[a-z_]+\b", expr))


def test_every_queried_metric_exists() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exported = exported_series(REGISTRY) | exported_series(Metrics().registry)
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    queried = set().union(*(queried_series(q) for q in queries))
    assert queried - exported == set()
    assert all(queried_series(t["expr"]) for panel in dashboard["panels"] for t in panel["targets"])
    # What the issue asks the dashboard to show, each from its source.
    for series in ("finetune_runs_total", "finetune_promotions_total", "finetune_rollbacks_total",
                   "chat_adapter_eval_loss", "chat_http_request_duration_seconds_bucket",
                   "chat_tokens_generated_total", "chat_feedback_votes_total"):  # fmt: skip
        assert series in queried, series


def test_the_kustomization_ships_the_dashboard() -> None:
    kustomization = yaml.safe_load((DEPLOY / "monitoring" / "kustomization.yaml").read_text(encoding="utf-8"))
    (generator,) = kustomization["configMapGenerator"]
    assert generator["files"] == ["dashboard.json"] and generator["options"]["labels"] == {"grafana_dashboard": "1"}
