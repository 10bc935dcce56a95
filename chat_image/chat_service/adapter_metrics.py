"""The eval metrics a serving adapter was trained with, from its manifest (contract §2: `metrics`)."""

from __future__ import annotations

import json
import logging
from typing import Any

from .generation import AdapterStatus

log = logging.getLogger(__name__)

# Manifest keys of the three eval losses of a run, by what they measure.
EVAL_LOSSES = {"base": "eval_loss_base", "replaced": "eval_loss_serving", "adapter": "eval_loss_adapter"}


def manifest_metrics(adapter: AdapterStatus | None) -> dict[str, Any] | None:
    """The loaded adapter's manifest metrics (numbers and nulls only), None without a loaded adapter."""
    if adapter is None or adapter.state != "loaded":
        return None
    try:
        manifest = json.loads((adapter.path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        # It was readable when the adapter loaded; a volume that went away since must not break a page.
        log.warning("cannot read %s/manifest.json: %s", adapter.path, exc)
        return None
    metrics = manifest.get("metrics")
    if not isinstance(metrics, dict):
        return None
    return {key: value for key, value in metrics.items() if isinstance(value, int | float) or value is None}
