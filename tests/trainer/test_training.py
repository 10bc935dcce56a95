"""Real training on the CPU: the adapter learns the character's voice, saves and loads exactly, runs reproducibly."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from training.compat import vllm_compatibility
from training.lora_tuning import CharacterFineTuning
from training.pipeline import RunReport
from training.prompt import prompt_format_for
from training.publish import list_versions
from transformers import AutoTokenizer

pytestmark = pytest.mark.slow

STARTED = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)


def tuner(base: Path, history: Path, root: Path, **kwargs: Any) -> CharacterFineTuning:
    settings: dict[str, Any] = dict(history_file=history, output_root=root, learning_rate=2e-3, min_examples=50,
                                    eval_fraction=0.2, logging_steps=20)
    settings.update(kwargs)
    return CharacterFineTuning(str(base), **settings)


@pytest.fixture(scope="module")
def history_file(tmp_path_factory: pytest.TempPathFactory, make_voice_history: Any) -> Path:
    voice_history = make_voice_history
    path = tmp_path_factory.mktemp("history") / "lumina.jsonl"
    rows = voice_history(sessions=60, seed=1, end=STARTED - timedelta(hours=1))
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def first_run(base_model_dir: Path, history_file: Path, tmp_path_factory: pytest.TempPathFactory) -> RunReport:
    root = tmp_path_factory.mktemp("adapters")
    report = tuner(base_model_dir, history_file, root).run("lumina", 2, 8, started=STARTED)
    assert report is not None
    return report


def test_new_adapter_is_clearly_better_than_base_on_held_out_sessions(first_run: RunReport) -> None:
    m = first_run.metrics
    assert m["eval_loss_serving"] is None
    # "Clearly": at least 0.3 nats per reply token better, on sessions the adapter never saw.
    assert m["eval_loss_adapter"] < m["eval_loss_base"] - 0.3, m
    train = json.loads((first_run.path / "train_data.json").read_text(encoding="utf-8"))
    held_out = json.loads((first_run.path / "eval_data.json").read_text(encoding="utf-8"))
    assert len(train) == first_run.train_examples and len(held_out) == first_run.eval_examples >= 10
    assert m["tokens_per_second"] > 0 and m["train_loss"] > 0


def test_published_version_follows_the_contract(first_run: RunReport, base_model_dir: Path) -> None:
    assert first_run.version == "20261126T030000Z"
    assert first_run.path.name == first_run.version and first_run.path.parent.name == "lora_lumina"
    assert sorted(p.name for p in first_run.path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "eval_data.json", "manifest.json", "train_data.json"]
    manifest = json.loads((first_run.path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["schema_version"] == 2 and manifest["character"] == "lumina"
    assert manifest["version"] == first_run.version
    # The base model's own format; a history file gives no persona.
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    assert manifest["prompt"] == prompt_format_for(tokenizer).manifest()
    assert manifest["compatibility"] == first_run.compatibility
    assert set(first_run.compatibility["vllm"]) == set(vllm_compatibility({"r": 8}, None, {}))
    assert manifest["lora"] == {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]}
    assert manifest["data"]["window_start"] == "2026-10-27T03:00:00.000000Z"
    assert manifest["data"]["window_end"] == "2026-11-26T03:00:00.000000Z"
    assert manifest["data"]["pairs"] == manifest["data"]["train_examples"] + manifest["data"]["eval_examples"]
    assert set(manifest["data"]["dropped"]) >= {"thumbs_down", "empty", "duplicate"}
    assert set(manifest["metrics"]) == {"eval_loss_base", "eval_loss_serving", "eval_loss_adapter", "train_loss",
                                        "tokens_per_second", "duration_seconds"}
    assert len(manifest["samples"]) == 3 and all(set(s) == {"instruction", "reference", "before", "after"}
                                                  for s in manifest["samples"])
    config = json.loads((first_run.path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["task_type"] == "CAUSAL_LM" and config["bias"] == "none"
    # Japanese text is stored as text, not as \\u escapes, and equals the history's content.
    raw = (first_run.path / "train_data.json").read_text(encoding="utf-8")
    assert "\\u" not in raw and any("\u3040" <= ch <= "\u30ff" for ch in raw)


def test_save_and_load_lora_model_give_identical_logits(first_run: RunReport, base_model_dir: Path) -> None:
    loaded = CharacterFineTuning(str(base_model_dir), output_root=first_run.path.parent.parent).load_lora_model(
        "lumina")
    trained = first_run.model
    trained.eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 1000]])
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        with trained.disable_adapter():
            base = trained(input_ids=ids).logits
    assert torch.equal(expected, got)
    assert not torch.equal(expected, base)  # the comparison would be empty if the adapter did nothing
    with pytest.raises(FileNotFoundError, match="no LoRA adapter for 'sol'"):
        CharacterFineTuning(str(base_model_dir), output_root=first_run.path.parent.parent).load_lora_model("sol")


def test_rerun_is_reproducible_evaluates_the_serving_adapter_and_prunes_around_it(
    first_run: RunReport, base_model_dir: Path, history_file: Path
) -> None:
    root = first_run.path.parent.parent
    # A version between the two, to be pruned; the first one serves and must survive keep_versions=1.
    second = tuner(base_model_dir, history_file, root, serving_version=first_run.version, keep_versions=1).run(
        "lumina", 2, 8, started=STARTED + timedelta(seconds=1))
    assert second is not None
    # Same data and seed: the same weights, bit for bit.
    assert all(torch.equal(a, b) for a, b in zip(
        load_file(first_run.path / "adapter_model.safetensors").values(),
        load_file(second.path / "adapter_model.safetensors").values(), strict=True))
    # The serving adapter is scored on the same held-out records: its loss is the first run's own.
    assert second.metrics["eval_loss_serving"] == pytest.approx(first_run.metrics["eval_loss_adapter"], abs=1e-5)
    assert list_versions(root, "lumina") == [first_run.version, second.version]
    # The spec's entry point; its version is the current time, newer than the others.
    third = Path(tuner(base_model_dir, history_file, root, serving_version=first_run.version, keep_versions=1)
                 .fine_tune_character("lumina", num_epochs=1, batch_size=8))
    assert third.parent == root / "lora_lumina"
    assert list_versions(root, "lumina") == [first_run.version, third.name]
    assert [p.name for p in (root / "lora_lumina").iterdir() if p.name.startswith(".")] == []


def test_too_little_data_raises_before_loading_any_model(tmp_path: Path, history_file: Path) -> None:
    from training.pipeline import InsufficientDataError

    with pytest.raises(InsufficientDataError, match=r"too little data: \d+ < 100000 examples"):
        # A base model that does not exist proves nothing was loaded.
        tuner(tmp_path / "no-model", history_file, tmp_path / "out", min_examples=100000).run(
            "lumina", started=STARTED)
    assert not (tmp_path / "out").exists()


def test_gradient_accumulation_and_token_count(base_model_dir: Path, first_run: RunReport, tmp_path: Path) -> None:
    from peft import get_peft_model
    from training.collate import tokenize_example
    from training.train import train_lora

    tuner = CharacterFineTuning(str(base_model_dir))
    records = json.loads((first_run.path / "train_data.json").read_text(encoding="utf-8"))[:24]
    tokenizer = tuner._load_tokenizer()
    model = get_peft_model(tuner._load_base(), tuner.lora_config)
    _, stats = train_lora(model, tokenizer, records, work_dir=str(tmp_path), epochs=1, batch_size=4,
                          gradient_accumulation_steps=2)
    assert stats.steps == 3  # 24 examples / (4 per batch x 2 batches per optimizer step)
    # tokens/s counts real tokens only: exactly the examples' lengths, whatever the padding.
    assert stats.tokens == sum(len(tokenize_example(r, tokenizer, 512)["input_ids"]) for r in records)
