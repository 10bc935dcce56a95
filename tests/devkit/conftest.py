"""The embedded model, built once per test session (or found in the cache) and shared by the slow tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded_model() -> Path:
    from devkit.model import ensure_embedded_model

    # The normal cache ($LLMMC_MODEL_CACHE or ~/.cache/llmmultichat/models): a warm run reuses the demo's model.
    return ensure_embedded_model()
