"""The adapter's ``manifest.json`` (contract §2): what was trained, on what, how, and how well."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from . import __version__
from .config import TrainerConfig
from .data import CONTEXT_CHARS, PreparedData
from .history import rfc3339

# 2: `prompt` (format, template hash, system turn) replaced version 1's `prompt_template`; `compatibility` added.
SCHEMA_VERSION = 2


def build_manifest(
    config: TrainerConfig,
    data: PreparedData,
    *,
    version: str,
    started: datetime,
    target_modules: str | Sequence[str],
    steps: int,
    tokens: int,
    metrics: dict[str, float | None],
    samples: list[dict[str, str]],
    created_at: datetime,
    prompt: Mapping[str, Any],
    compatibility: Mapping[str, Any],
) -> dict[str, Any]:
    """The manifest of one published version; ``started`` is the end of the data window (and the version's time),
    ``target_modules`` what peft resolved, ``steps``/``tokens`` what training did, ``prompt`` how prompts were
    rendered (``PromptFormat.manifest()``: the chat service renders them the same way) and ``compatibility`` which
    serving engines can load the adapter (training.compat)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "character": config.character,
        "version": version,
        "base_model": config.base_model,
        "prompt": dict(prompt),
        "trainer_version": __version__,
        "created_at": created_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "data": {
            "window_start": rfc3339(started - timedelta(days=config.days)),
            "window_end": rfc3339(started),
            "messages": data.messages,
            "pairs": len(data.train) + len(data.held_out),
            "train_examples": len(data.train),
            "eval_examples": len(data.held_out),
            "eval_sessions": len({e.session_id for e in data.held_out}),
            "context_turns": config.context_turns,
            "context_chars": CONTEXT_CHARS,
            "dropped": data.dropped,
        },
        "lora": {
            "r": config.lora_r,
            "alpha": config.lora_alpha,
            "dropout": config.lora_dropout,
            "target_modules": target_modules if isinstance(target_modules, str) else sorted(target_modules),
        },
        "training": {
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "learning_rate": config.learning_rate,
            "max_length": config.max_length,
            "seed": config.seed,
            "steps": steps,
            "tokens": tokens,
        },
        "metrics": metrics,
        "compatibility": dict(compatibility),
        "samples": samples,
    }
