"""The adapter manifest (contract §2), built from a run's facts without training anything."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from training import __version__
from training.config import TrainerConfig
from training.data import DROP_REASONS, Example, PreparedData
from training.manifest import build_manifest
from training.prompt import ALPACA, PromptFormat

STARTED = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)


def example(session: str, minute: int) -> Example:
    return Example("こんにちは", "", "ルミナだよ☆", session, STARTED - timedelta(days=3, minutes=minute))


COMPATIBILITY = {"vllm": {"compatible": False, "reasons": ["architecture GPT2LMHeadModel: ..."], "max_lora_rank": 16}}


def manifest_for(config: TrainerConfig, target_modules: object = frozenset({"c_proj", "c_attn"}),
                 prompt: PromptFormat = ALPACA) -> dict:
    data = PreparedData(
        messages=17,
        dropped=dict.fromkeys(DROP_REASONS, 0) | {"thumbs_down": 2},
        train=[example("a", 1), example("a", 2), example("b", 3)],
        held_out=[example("c", 4), example("d", 5)],
    )
    metrics = {"eval_loss_base": 5.1, "eval_loss_serving": None, "eval_loss_adapter": 3.9}
    samples = [{"instruction": "こんにちは", "reference": "ルミナだよ☆", "before": "…", "after": "ルミナ"}]
    return build_manifest(config, data, version="20261126T030000Z", started=STARTED, target_modules=target_modules,
                          steps=12, tokens=3456, metrics=metrics, samples=samples,
                          created_at=datetime(2026, 11, 26, 3, 9, 30, 123456, tzinfo=UTC),
                          prompt=prompt.manifest(), compatibility=COMPATIBILITY)


def test_manifest_records_the_run() -> None:
    config = TrainerConfig(character="lumina", base_model="/models/base", days=7, context_turns=2, lora_r=16,
                           lora_alpha=32, lora_dropout=0.0, epochs=2, batch_size=8, learning_rate=1e-3,
                           max_length=256, gradient_accumulation_steps=2, seed=7)
    manifest = manifest_for(config)
    assert json.loads(json.dumps(manifest, ensure_ascii=False)) == manifest  # JSON as written to manifest.json
    assert {k: manifest[k] for k in ("schema_version", "character", "version", "base_model", "trainer_version",
                                     "created_at")} == {
        "schema_version": 2, "character": "lumina", "version": "20261126T030000Z", "base_model": "/models/base",
        "trainer_version": __version__, "created_at": "2026-11-26T03:09:30Z"}
    assert manifest["data"] == {
        "window_start": "2026-11-19T03:00:00.000000Z", "window_end": "2026-11-26T03:00:00.000000Z", "messages": 17,
        "pairs": 5, "train_examples": 3, "eval_examples": 2, "eval_sessions": 2, "context_turns": 2,
        "context_chars": 1000, "dropped": dict.fromkeys(DROP_REASONS, 0) | {"thumbs_down": 2}}
    assert manifest["lora"] == {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["c_attn", "c_proj"]}
    assert manifest["training"] == {"epochs": 2, "batch_size": 8, "gradient_accumulation_steps": 2,
                                    "learning_rate": 1e-3, "max_length": 256, "seed": 7, "steps": 12, "tokens": 3456}
    assert manifest["metrics"]["eval_loss_adapter"] == 3.9 and len(manifest["samples"]) == 1
    assert manifest["compatibility"] == COMPATIBILITY


def test_manifest_records_the_prompt_format_it_was_trained_with() -> None:
    config = TrainerConfig(character="lumina")
    assert manifest_for(config)["prompt"] == {"format": "alpaca",
                                              "template": "Instruction: {instruction}\nInput: {input}\nOutput: "}
    chat = PromptFormat("chat_template", system="あなたはルミナ。", template_sha256="ab" * 32)
    assert manifest_for(config, prompt=chat)["prompt"] == {"format": "chat_template", "system": "あなたはルミナ。",
                                                           "template_sha256": "ab" * 32}
    assert "prompt_template" not in manifest_for(config)  # schema version 1's field


def test_target_modules_given_as_one_name_stay_as_given() -> None:
    # peft keeps a string (e.g. a regex or "all-linear") as a string.
    assert manifest_for(TrainerConfig(character="lumina"), "all-linear")["lora"]["target_modules"] == "all-linear"
