"""Options and markers shared by every test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from devkit.cluster import Cluster


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


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The local control plane (devkit/control-plane): the running one at .cluster/kubeconfig or $KUBECONFIG, else one
    started for this session and stopped at its end (unless another session still uses it)."""
    from devkit.cluster import using_cluster

    with using_cluster() as running:
        yield running
