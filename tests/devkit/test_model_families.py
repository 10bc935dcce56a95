"""Tiny random-init checkpoints of several architectures, sharing the embedded tokenizer and chat template."""

from __future__ import annotations

import json
import time
from pathlib import Path

import devkit.model as model
import pytest
from devkit.model_families import FAMILIES, FAMILY_CONFIGS, TOKENIZER_FILES, ensure_family_model, main

# The class each family's checkpoint must load as, and one module name LoRA would target in it.
EXPECTED = {
    "llama": ("LlamaForCausalLM", "q_proj"),
    "qwen2": ("Qwen2ForCausalLM", "q_proj"),
    "mistral": ("MistralForCausalLM", "q_proj"),
    "gemma2": ("Gemma2ForCausalLM", "q_proj"),
    "gpt_neox": ("GPTNeoXForCausalLM", "query_key_value"),
    "gpt2": ("GPT2LMHeadModel", "c_attn"),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The embedded model's tokenizer alone (seconds), so these tests need no pretrained model.
    directory = tmp_path_factory.mktemp("tokenizer")
    model.save_tokenizer(model.train_tokenizer(model.training_documents()), directory)
    return directory


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


def test_every_family_is_covered() -> None:
    assert set(FAMILIES) == set(EXPECTED) == set(FAMILY_CONFIGS)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_loads_and_runs_a_forward_pass(family: str, tokenizer_dir: Path, cache_root: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    path = ensure_family_model(family, cache_root, tokenizer_dir=tokenizer_dir)
    assert time.monotonic() - started < 60, "a family checkpoint builds in seconds"
    assert path.parent == cache_root and path.name.startswith(f"family-{family}-")
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path)
    class_name, lora_target = EXPECTED[family]
    assert type(lm).__name__ == class_name and lm.config.model_type == family
    assert lora_target in {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
    # The embedded tokenizer and its chat template, with the end of turn as the model's end of sequence.
    assert tokenizer.chat_template == model.CHAT_TEMPLATE and lm.config.vocab_size == len(tokenizer)
    assert lm.config.eos_token_id == lm.generation_config.eos_token_id == tokenizer.eos_token_id
    messages = [{"role": "system", "content": "You are Kai."}, {"role": "user", "content": "星の話をして"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        logits = lm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    info = json.loads((path / "family.json").read_text(encoding="utf-8"))
    assert info["family"] == family and info["parameters"] < 2_000_000


def test_family_checkpoints_are_cached_by_config(
    tokenizer_dir: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = ensure_family_model("qwen2", cache_root, tokenizer_dir=tokenizer_dir)
    started = time.monotonic()
    assert ensure_family_model("qwen2", cache_root, tokenizer_dir=tokenizer_dir) == first
    assert time.monotonic() - started < 1, "a cached checkpoint is found, not rebuilt"
    changed = {**FAMILY_CONFIGS["qwen2"], "num_hidden_layers": 1}
    monkeypatch.setitem(FAMILY_CONFIGS, "qwen2", changed)
    second = ensure_family_model("qwen2", cache_root, tokenizer_dir=tokenizer_dir)
    assert second != first and first.is_dir(), "another config builds beside the old one"
    with pytest.raises(ValueError, match="unknown family"):
        ensure_family_model("bloom", cache_root, tokenizer_dir=tokenizer_dir)


def test_cli_prints_each_family_path(tokenizer_dir: Path, cache_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = ensure_family_model("gpt2", cache_root, tokenizer_dir=tokenizer_dir)
    assert main(["gpt2", "--cache-root", str(cache_root), "--tokenizer-dir", str(tokenizer_dir)]) == 0
    assert capsys.readouterr().out == f"gpt2\t{expected}\n"
    with pytest.raises(SystemExit):
        main(["bloom"])


@pytest.mark.slow
def test_default_tokenizer_is_the_embedded_models(embedded_model: Path) -> None:
    path = ensure_family_model("llama", embedded_model.parent)
    assert path.parent == embedded_model.parent
    for name in TOKENIZER_FILES:
        assert (path / name).read_bytes() == (embedded_model / name).read_bytes()
