"""A base model that cannot be loaded is one clear error at startup, in seconds (no minutes of hub retries)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from chat_service import model_source
from chat_service.model_source import BaseModelUnavailable, load_options


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A hub endpoint that refuses connections and an empty hub cache; returns the cache."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model_source.hub_reachable.cache_clear()
    yield tmp_path / "hub"
    model_source.hub_reachable.cache_clear()


def cache_model(cache: Path, repo: str) -> None:
    """The hub cache's layout for one snapshot holding a config.json."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    (folder / "snapshots" / "abc123").mkdir(parents=True)
    (folder / "snapshots" / "abc123" / "config.json").write_text("{}")


def test_local_directory_and_cached_models_load_without_the_hub(no_hub: Path, base_model_dir: Path) -> None:
    assert load_options(str(base_model_dir)) == {}
    cache_model(no_hub, "org/tiny")
    assert load_options("org/tiny") == {"local_files_only": True}  # the hub is away: the cache, without retries


def test_what_cannot_be_loaded_is_refused_at_once_with_the_fix(no_hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.monotonic()
    with pytest.raises(BaseModelUnavailable, match="cannot be reached; set BASE_MODEL to a directory"):
        load_options("gpt2")
    with pytest.raises(BaseModelUnavailable, match="no such directory"):
        load_options("/models/missing")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BaseModelUnavailable, match=r"the hub is off \(HF_HUB_OFFLINE\)"):
        load_options("gpt2")
    assert time.monotonic() - started < 2 * model_source.HUB_PROBE_SECONDS


def test_python_m_chat_service_says_so_and_exits(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_")}
    env.update(BASE_MODEL=str(tmp_path / "no-model"), DATABASE_URL=f"sqlite:///{tmp_path / 'chat.db'}")
    done = subprocess.run([sys.executable, "-m", "chat_service", "--port", "0"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert f"base model '{tmp_path / 'no-model'}': no such directory" in done.stderr


def test_the_readme_way_to_run_it_works_offline(tmp_path: Path, base_model_dir: Path) -> None:
    """README: `BASE_MODEL="$(python -m devkit.model)" python -m chat_service ...` — no hub, no retries."""
    import re

    from devkit.harness import ChatProcess
    from devkit.paths import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    line = re.search(r'^BASE_MODEL="\$\((python -m devkit\.model)\)" (python -m chat_service) (.*?)\s+#', readme, re.M)
    assert line is not None, "README no longer shows how to run the chat service locally"
    printed = subprocess.run([sys.executable, *line.group(1).split()[1:]], capture_output=True, text=True,
                             timeout=600, check=True).stdout.strip()
    assert Path(printed) == base_model_dir
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHAT_") and k != "HF_HUB_OFFLINE"}
    env.update(BASE_MODEL=printed, DATABASE_URL=f"sqlite:///{tmp_path / 'chat.db'}", CHAT_TORCH_THREADS="1")
    chat = ChatProcess([], env, tmp_path / "chat.log").start()  # the README's --host/--port, on a free local port
    try:
        ready = chat.wait_ready(timeout=240)
    finally:
        chat.stop()
    assert ready["model"]["loaded"] and ready["model"]["base_model"] == printed
