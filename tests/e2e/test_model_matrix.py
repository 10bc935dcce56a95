"""The architecture matrix: for each family users fine-tune (devkit.model_families: tiny random-init checkpoints with
the embedded tokenizer and its chat template), the trainer CLI trains and publishes an adapter on the LoRA targets it
picks for that architecture, the chat service loads it and serves it (the reply reports its version), both sides
build the same prompt tokens, and the engine-rule check says whether vLLM could serve it.

Prints the table (run with -s to see it): family, target modules, train seconds, eval loss base → adapter, served,
vLLM-compatible and why not.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from devkit.conversations import generate_history, write_jsonl
from devkit.model_families import FAMILIES, ensure_family_model

pytestmark = pytest.mark.slow

# What the trainer's `auto` must pick per architecture (peft's table), and whether vLLM serves LoRA for it.
EXPECTED_TARGETS = {"llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
                    "gemma2": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt2": ["c_attn"]}
VLLM_SERVES = {"llama": True, "qwen2": True, "mistral": True, "gemma2": True, "gpt_neox": True, "gpt2": False}
PERSONA = "あなたはルミナ。好奇心旺盛で優しい光の精霊です。"
MESSAGE = "星について話しませんか？"


@dataclass
class Row:
    family: str
    targets: list[str]
    train_seconds: float
    eval_base: float
    eval_adapter: float
    served_version: str | None
    published_version: str
    same_prompt_tokens: bool
    compatible: bool
    reasons: list[str]

    def line(self) -> str:
        served = "OK" if self.served_version == self.published_version else f"no ({self.served_version})"
        why = "; ".join(self.reasons) or "-"
        return (f"| {self.family} | {', '.join(self.targets)} | {self.train_seconds:.0f} | "
                f"{self.eval_base:.3f} → {self.eval_adapter:.3f} | {served} | "
                f"{'yes' if self.compatible else 'no'}: {why} |")


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    end = datetime.now(UTC) - timedelta(minutes=5)
    messages = generate_history("lumina", sessions=40, seed=3, start=end - timedelta(days=20), end=end)
    return write_jsonl(tmp_path_factory.mktemp("matrix") / "lumina.jsonl", messages)


def train(base: Path, history: Path, root: Path) -> tuple[dict[str, Any], float]:
    """The trainer CLI as its pod runs it; returns its result and its wall time."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_") and k != "HISTORY_TOKEN"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "training.lora_tuning", "--character", "lumina", "--base-model", str(base),
               "--history-file", str(history), "--output-root", str(root), "--result-file", str(root / "result.json"),
               "--epochs", "1", "--batch-size", "8", "--learning-rate", "2e-3", "--min-examples", "20",
               "--eval-fraction", "0.2", "--max-length", "256", "--persona", PERSONA]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((root / "result.json").read_text(encoding="utf-8")), seconds


def serve(base: Path, adapter: Path, tmp_path: Path) -> tuple[str | None, list[int], Any]:
    """The chat service (in this process, over its HTTP API) with `adapter` mounted for lumina: the version its reply
    reports, and the prompt ids it builds for MESSAGE with the tokenizer it loaded."""
    from chat_service.app import create_app
    from chat_service.config import Settings
    from chat_service.prompting import build_prompt, prompt_ids, prompt_rules
    from fastapi.testclient import TestClient

    mounts = tmp_path / "models"
    shutil.copytree(adapter, mounts / "lora_lumina")
    settings = Settings(base_model=str(base), adapters_root=mounts, database_url=f"sqlite:///{tmp_path / 'chat.db'}",
                        device="cpu", torch_threads=1)
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 300
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, client.get("/readyz").json()
            time.sleep(0.5)
        reply = client.post("/v1/chat", json={"character": "lumina", "message": MESSAGE, "session_id": "m",
                                              "max_tokens": 8}).json()
        service = client.app.state.service
        models, character = service.models, service.characters["lumina"]
        adapter_status = models.adapter_for("lumina")
        assert adapter_status.state == "loaded", adapter_status.error
        rules = prompt_rules(settings, character, adapter_status, models.chat_template)
        ids = prompt_ids(build_prompt(rules, MESSAGE), models.tokenizer, settings.max_prompt_tokens)
        return reply.get("adapter_version"), ids, models.tokenizer


def trained_prompt_ids(manifest: dict[str, Any], tokenizer: Any) -> list[int]:
    """The prompt ids the trainer built for the same exchange, in the format its manifest records."""
    from training.collate import IGNORE_INDEX, tokenize_example
    from training.prompt import PromptFormat

    recorded = manifest["prompt"]
    fmt = (PromptFormat("chat_template", system=recorded["system"], template_sha256=recorded["template_sha256"])
           if recorded["format"] == "chat_template" else PromptFormat("alpaca", template=recorded["template"]))
    feature = tokenize_example({"instruction": MESSAGE, "input": "", "output": "はい"}, tokenizer, 512,
                               prompt_format=fmt)
    return [i for i, label in zip(feature["input_ids"], feature["labels"], strict=True) if label == IGNORE_INDEX]


def run_family(family: str, history: Path, tmp_path: Path) -> Row:
    base = ensure_family_model(family)
    result, seconds = train(base, history, tmp_path / "adapters")
    assert result["outcome"] == "trained", result
    published = tmp_path / "adapters" / result["path"]
    manifest = json.loads((published / "manifest.json").read_text(encoding="utf-8"))
    served, served_ids, tokenizer = serve(base, published, tmp_path)
    verdict = result["compatibility"]["vllm"]
    return Row(family, manifest["lora"]["target_modules"], seconds, result["metrics"]["eval_loss_base"],
               result["metrics"]["eval_loss_adapter"], served, result["version"],
               served_ids == trained_prompt_ids(manifest, tokenizer), verdict["compatible"], verdict["reasons"])


def test_every_family_trains_publishes_and_serves(
    history: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [run_family(family, history, tmp_path / family) for family in FAMILIES]
    table = "\n".join(["| family | target modules | train s | eval loss base → adapter | served | vLLM |",
                       "|---|---|---|---|---|---|", *(row.line() for row in rows)])
    with capsys.disabled():
        print(f"\n{table}\n")
    assert [row.family for row in rows] == list(EXPECTED_TARGETS)
    for row in rows:
        assert row.targets == EXPECTED_TARGETS[row.family], table
        assert row.served_version == row.published_version, table  # the reply reports the adapter's version
        assert row.same_prompt_tokens, f"{row.family}: chat service and trainer build different prompt tokens"
        assert row.eval_adapter < row.eval_base, table
        assert row.compatible is VLLM_SERVES[row.family], table
    gpt2 = rows[-1]
    assert any("GPT2LMHeadModel" in reason for reason in gpt2.reasons)
    assert any("c_attn (Conv1D)" in reason for reason in gpt2.reasons)
