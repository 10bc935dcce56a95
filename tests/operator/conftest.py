"""Fixtures of the operator's tests: sample resources for the unit tests, and for the modules marked `cluster` a
namespace with the operator running in it (devkit.harness), built on the session `cluster` fixture of
tests/conftest.py."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devkit import harness
from finetune_operator.spec import FineTuneSpec

SAMPLE_SPEC: dict[str, Any] = {
    "character": "lumina",
    "schedule": "0 3 1 * *",
    "data": {"historyURL": "http://chat.llmmultichat:8000", "tokenSecretRef": {"name": "history-token"}},
    "adapterStorage": {"claimName": "adapters"},
    "target": {"deployment": "chat"},
}


@pytest.fixture
def spec_dict() -> dict[str, Any]:
    return copy.deepcopy(SAMPLE_SPEC)


@pytest.fixture
def spec(spec_dict: dict[str, Any]) -> FineTuneSpec:
    return FineTuneSpec.from_dict(spec_dict)


@pytest.fixture
def owner() -> dict[str, Any]:
    return {"apiVersion": "llmmultichat.io/v1alpha1", "kind": "CharacterFineTune",
            "metadata": {"name": "lumina", "namespace": "chat", "uid": "0000-1111"}}


# --- cluster fixtures ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def crd_installed(cluster: Any) -> Any:
    harness.install_crd(cluster)
    return cluster


@pytest.fixture
def env(crd_installed: Any, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A namespace with a chat Deployment and the operator running in it (as its ServiceAccount).
    `@pytest.mark.env(progress_deadline=5)` tunes the Deployment."""
    marker = request.node.get_closest_marker("env")
    kwargs = dict(marker.kwargs) if marker else {}
    with harness.environment(crd_installed, tmp_path, **kwargs) as e:
        yield e


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "env(**kwargs): options of the operator test environment (tests/operator)")
