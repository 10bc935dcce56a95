"""Fixtures of the operator's tests: sample resources for the unit tests (cluster fixtures live in
test modules marked `cluster`, built on the session `cluster` fixture of tests/conftest.py)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
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
