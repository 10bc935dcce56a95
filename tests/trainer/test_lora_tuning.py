"""The spec's tests for `training/lora_tuning.py` (tests/test_lora_tuning.py there), and the class surface."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType
from training.lora_tuning import CharacterFineTuning
from training.model import detect_target_modules
from transformers import LlamaConfig


def test_training_data_creation() -> None:
    fine_tuner = CharacterFineTuning()
    conversations = [
        {"role": "user", "content": "こんにちは", "timestamp": "2025-11-20T10:00:00Z"},
        {"role": "assistant", "content": "こんにちは！", "timestamp": "2025-11-20T10:00:01Z"},
    ]
    training_data = fine_tuner._create_training_data(conversations)
    assert len(training_data) == 1
    assert training_data[0]["instruction"] == "こんにちは"
    assert training_data[0]["output"] == "こんにちは！"
    assert training_data[0]["input"] == ""


def test_lora_config() -> None:
    fine_tuner = CharacterFineTuning(lora_r=8, lora_alpha=16)
    assert isinstance(fine_tuner.lora_config, LoraConfig)
    assert fine_tuner.lora_config.r == 8
    assert fine_tuner.lora_config.lora_alpha == 16
    assert fine_tuner.lora_config.lora_dropout == 0.1
    assert fine_tuner.lora_config.bias == "none"
    assert fine_tuner.lora_config.task_type == TaskType.CAUSAL_LM
    assert set(fine_tuner.lora_config.target_modules) == {"c_attn"}  # GPT-2, the spec's default base
    assert fine_tuner.lora_config.fan_in_fan_out  # GPT-2's Conv1D layers


def test_target_modules_follow_the_architecture(tmp_path: Path, base_model_dir: Path) -> None:
    llama = tmp_path / "llama"
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4)
    config.save_pretrained(llama)
    assert detect_target_modules(str(llama)) == ["q_proj", "v_proj"]
    assert set(CharacterFineTuning(str(llama)).lora_config.target_modules) == {"q_proj", "v_proj"}
    assert not CharacterFineTuning(str(llama)).lora_config.fan_in_fan_out
    assert detect_target_modules(str(base_model_dir)) == ["q_proj", "v_proj"]  # the embedded model is a Llama
    chosen = CharacterFineTuning(str(llama), target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]).lora_config
    assert set(chosen.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    assert detect_target_modules(str(unknown)) is None  # peft then decides once the model is loaded


def test_load_lora_model_without_adapter_is_file_not_found(tmp_path: Path, base_model_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no LoRA adapter for 'lumina'"):
        CharacterFineTuning(str(base_model_dir), output_root=tmp_path).load_lora_model("lumina")


@pytest.mark.gpu
@pytest.mark.slow
def test_model_save_load(tmp_path: Path, base_model_dir: Path, make_voice_history) -> None:
    """The spec's GPU test: train on CUDA (bf16 where supported), publish, load back, same logits."""
    assert torch.cuda.is_available(), "--run-gpu needs a CUDA GPU"
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in make_voice_history(sessions=60)),
                       encoding="utf-8")
    tuner = CharacterFineTuning(str(base_model_dir), history_file=history, output_root=tmp_path / "adapters",
                                learning_rate=2e-3, min_examples=50, eval_fraction=0.2)
    report = tuner.run("lumina", num_epochs=2, batch_size=8)
    assert report is not None and (report.path / "adapter_model.safetensors").is_file()
    assert report.metrics["eval_loss_adapter"] < report.metrics["eval_loss_base"] - 0.3
    trained = report.model.eval()
    assert next(trained.parameters()).is_cuda
    loaded = tuner.load_lora_model("lumina").to("cuda")
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 1000]], device="cuda")
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, loaded(input_ids=ids).logits
        with loaded.disable_adapter():
            base = loaded(input_ids=ids).logits
    # Same weights, same GPU; the tolerance only admits cuBLAS picking another kernel for another module instance.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)


def test_prepare_data_counts_caps_to_the_newest_and_skips_below_the_minimum(tmp_path: Path,
                                                                          make_voice_history) -> None:
    from datetime import UTC, datetime

    from training.pipeline import InsufficientDataError

    until = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
    messages = make_voice_history(sessions=40, end=until)
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in messages), encoding="utf-8")
    tuner = CharacterFineTuning(history_file=history, min_examples=10)
    count, dropped, train, held_out = tuner.prepare_data("lumina", 30, until)
    assert count == len(messages)
    assert dropped["thumbs_down"] == sum(1 for m in messages if m["feedback"] == "down") > 0
    everything = sorted(train + held_out, key=lambda e: e.created_at)

    capped = CharacterFineTuning(history_file=history, min_examples=10, max_examples=30)
    _, _, train30, eval30 = capped.prepare_data("lumina", 30, until)
    assert sorted(train30 + eval30, key=lambda e: e.created_at) == everything[-30:]

    with pytest.raises(InsufficientDataError, match=rf"too little data: {len(everything)} < 1000 examples"):
        CharacterFineTuning(history_file=history, min_examples=1000).prepare_data("lumina", 30, until)
