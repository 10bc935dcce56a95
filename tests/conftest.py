"""Options and markers shared by every test."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-gpu", action="store_true", default=False, help="run tests that need a CUDA GPU")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-gpu"):
        return
    # GPU tests are opt-in: without a GPU they cannot run at all, so they are deselected, not skipped-as-passing.
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items:
        config.hook.pytest_deselected(items=gpu_items)
        items[:] = [item for item in items if "gpu" not in item.keywords]
