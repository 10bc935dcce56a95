"""Fixtures for the tests against a real vLLM engine: a tiny random-init Llama, real PEFT adapters for it, and the
engine process itself (devkit.vllm_engine, started as deploy/vllm/engine.yaml starts the pod)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from devkit.vllm_engine import VllmServer, build_adapter, build_tiny_llama

os.environ.setdefault("HF_HUB_OFFLINE", "1")

@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_adapter(tiny_llama, root / name, seed=seed) for name, seed in (("one", 1), ("two", 2))}


@pytest.fixture(scope="session")
def engine(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """One engine for the whole session: a start costs one to two minutes on two cores."""
    server = VllmServer(tiny_llama, log_path=tmp_path_factory.mktemp("vllm") / "vllm.log")
    with server:
        print(f"\nvLLM ready in {server.startup_seconds:.0f}s at {server.url}")
        yield server


@pytest.fixture()
def client(engine: VllmServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engine.url, timeout=120) as http:
        yield http


@dataclass(frozen=True)
class AdapterVolume:
    root: Path  # holds lora_lumina/<version>/
    version: str
    context_turns: int  # the manifest's data.context_turns


@pytest.fixture(scope="session")
def adapter_volume(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterVolume:
    """The adapter volume in the contract's layout (docs/contracts.md §2): lora_lumina/<version>/ with a manifest
    that asks for two turns of context."""
    root = tmp_path_factory.mktemp("adapter-volume")
    volume = AdapterVolume(root, "20261201T030000Z", 2)
    directory = build_adapter(tiny_llama, root / "lora_lumina" / volume.version, seed=3)
    manifest = {
        "schema_version": 1,
        "character": "lumina",
        "version": volume.version,
        "base_model": str(tiny_llama),
        "prompt_template": "Instruction: {instruction}\nInput: {input}\nOutput: ",
        "data": {"context_turns": volume.context_turns, "context_chars": 1000},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return volume


@pytest.fixture(scope="session")
def chat_mounts(adapter_volume: AdapterVolume, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the chat pod sees: /models/lora_lumina is the version's directory (the operator's subPath mount)."""
    root = tmp_path_factory.mktemp("chat-models")
    (root / "lora_lumina").symlink_to(adapter_volume.root / "lora_lumina" / adapter_volume.version)
    return root
