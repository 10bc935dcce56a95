"""--base-model that cannot be loaded ends the run at once with a reason that says what to pass."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from training import model as model_module
from training.lora_tuning import main
from training.model import BaseModelUnavailable, source_options


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model_module._hub_reachable.cache_clear()
    yield
    model_module._hub_reachable.cache_clear()


def test_sources(no_hub: None, base_model_dir: Path, tmp_path: Path) -> None:
    assert source_options(str(base_model_dir)) == {}
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "c0ffee"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("c0ffee")
    assert source_options("org/tiny") == {"local_files_only": True}
    started = time.monotonic()
    with pytest.raises(BaseModelUnavailable, match="cannot be reached; give --base-model a directory"):
        source_options("gpt2")
    assert time.monotonic() - started < 2 * model_module.HUB_PROBE_SECONDS


def test_the_cli_fails_fast_with_the_reason(
    no_hub: None, tmp_path: Path, make_voice_history: Any, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for key in [k for k in os.environ if k.startswith("TRAINER_")]:
        monkeypatch.delenv(key)
    history = tmp_path / "lumina.jsonl"
    history.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in make_voice_history(sessions=40)))
    result_file = tmp_path / "result.json"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["--character", "lumina", "--history-file", str(history), "--base-model", "gpt2",
                 "--min-examples", "10", "--output-root", str(tmp_path / "out"), "--result-file", str(result_file)])
    result = json.loads(result_file.read_text(encoding="utf-8"))
    assert code == 1 and result["outcome"] == "failed"
    assert result["reason"].startswith("BaseModelUnavailable: base model 'gpt2' is not a local directory")
    assert "HF_HUB_OFFLINE" in result["reason"]
    capsys.readouterr()
