"""The prompt format on the serving side (contract §2 "Prompt format"): the contract's test vector renders exactly, the
manifest's `prompt` decides how an adapter is served, and a chat-template mismatch is refused like a broken adapter."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from chat_service.characters import load_characters
from chat_service.config import Settings
from chat_service.generation import ModelManager
from chat_service.prompting import (
    DEFAULT_PROMPT_TEMPLATE,
    ManifestPrompt,
    PromptRules,
    Turn,
    build_prompt,
    manifest_prompt,
    prompt_ids,
    prompt_rules,
    template_mismatch,
    template_sha256,
)
from devkit.prompt_vector import prompt_vector, vector_tokenizer

VECTOR = prompt_vector()
VERSION = "20261126T030000Z"


def chat_rules(persona: str, turns: int = 10, chars: int = 1000) -> PromptRules:
    return PromptRules(DEFAULT_PROMPT_TEMPLATE, turns, chars, persona, "chat_template")


def vector_turns() -> list[Turn]:
    return [Turn(t["role"], t["content"]) for t in VECTOR["history"]]


def test_the_contract_vector_renders_exactly() -> None:
    tokenizer = vector_tokenizer(VECTOR)
    prompt = build_prompt(chat_rules(VECTOR["system"]), VECTOR["instruction"], vector_turns())
    ids = prompt_ids(prompt, tokenizer, 10_000)
    assert tokenizer.decode(ids) == VECTOR["prompt"]
    assert template_sha256(tokenizer.chat_template) == VECTOR["template_sha256"]


def test_context_keeps_whole_recent_turns_and_the_token_bound_drops_the_persona_last() -> None:
    tokenizer = vector_tokenizer(VECTOR)
    turns = [Turn("user", "a" * 30), Turn("assistant", "b" * 30), Turn("user", "c" * 10)]
    prompt = build_prompt(chat_rules("P", turns=2, chars=45), "q", turns)
    assert [t.content for t in prompt.context] == ["P", "b" * 30, "c" * 10]
    prompt = build_prompt(chat_rules("P", turns=3, chars=39), "q", turns)
    assert [t.content for t in prompt.context] == ["P", "c" * 10]  # whole turns only: b's 30 would pass 39
    full = build_prompt(chat_rules("persona text"), "q", turns)
    bare = prompt_ids(build_prompt(chat_rules(""), "q"), tokenizer, 10_000)
    with_persona = prompt_ids(build_prompt(chat_rules("persona text"), "q"), tokenizer, 10_000)
    assert prompt_ids(full, tokenizer, len(with_persona)) == with_persona  # the earlier turns went first
    assert prompt_ids(full, tokenizer, len(with_persona) - 1) == bare  # then the persona
    assert len(prompt_ids(full, tokenizer, 5)) == 5


def test_manifest_prompt_reads_both_schema_versions() -> None:
    assert manifest_prompt({}) == ManifestPrompt()
    assert manifest_prompt({"prompt_template": "Q: {instruction}\nA: "}).template == "Q: {instruction}\nA: "
    chat = {"format": "chat_template", "template_sha256": "ab" * 32, "system": "S"}
    assert manifest_prompt({"prompt": chat}) == ManifestPrompt("chat_template", system="S", template_sha256="ab" * 32)
    assert manifest_prompt({"prompt": {"format": "alpaca", "template": "{instruction}|"}}).template == "{instruction}|"
    for bad in ({"prompt": []}, {"prompt": {"format": "chatml"}}, {"prompt": chat | {"template_sha256": "x"}},
                {"prompt": chat | {"system": 3}}, {"prompt_template": "{question}"},
                {"prompt": {"format": "alpaca", "template": "{instruction} {extra}"}}):
        with pytest.raises(ValueError):
            manifest_prompt(bad)
    trained = manifest_prompt({"prompt": chat | {"template_sha256": template_sha256("T")}})
    assert template_mismatch(trained, "T") is None
    assert "has none" in (template_mismatch(trained, None) or "")
    assert "base tokenizer's is" in (template_mismatch(trained, "other") or "")
    assert template_mismatch(ManifestPrompt(), None) is None


@pytest.fixture(scope="module")
def templated_base(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model with the contract vector's chat template on its tokenizer."""
    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("templated") / "base"
    shutil.copytree(base_model_dir, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = VECTOR["chat_template"]
    tokenizer.save_pretrained(base)
    return base


def chat_manifest(directory: Path, template: str, system: str) -> None:
    manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
    manifest.pop("prompt_template", None)
    manifest |= {"schema_version": 2,
                 "prompt": {"format": "chat_template", "template_sha256": template_sha256(template), "system": system}}
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")


def loaded(settings: Settings) -> ModelManager:
    models = ModelManager(settings, load_characters(settings.characters_file))
    models.load()
    return models


def test_chat_template_adapter_is_served_with_its_recorded_system_turn(
    make_settings: Callable[..., Settings], adapters_root: Path, templated_base: Path, kit: Any
) -> None:
    lumina = kit.make_adapter(templated_base, adapters_root, "lumina", VERSION)
    chat_manifest(lumina, VECTOR["chat_template"], "the persona it was trained with")
    sora = kit.make_adapter(templated_base, adapters_root, "sora", VERSION)
    chat_manifest(sora, VECTOR["chat_template"] + " ", "")  # another template: refused
    models = loaded(make_settings(base_model=str(templated_base)))
    adapter = models.adapters["lumina"]
    assert (adapter.state, adapter.prompt_format, adapter.system) == ("loaded", "chat_template",
                                                                      "the persona it was trained with")
    rules = prompt_rules(models.settings, models.characters["lumina"], adapter, models.chat_template)
    assert rules == PromptRules(DEFAULT_PROMPT_TEMPLATE, 0, 1000, "the persona it was trained with", "chat_template")
    text = models.tokenizer.decode(prompt_ids(build_prompt(rules, "hi"), models.tokenizer, 1024))
    eos = models.tokenizer.eos_token
    assert text == f"<|system|>\nthe persona it was trained with{eos}\n<|user|>\nhi{eos}\n<|assistant|>\n"
    result = models.generate(adapter, build_prompt(rules, "hi"), max_tokens=4, temperature=0.0, top_p=1.0)
    assert result.adapter_version == VERSION and result.completion_tokens >= 1

    refused = models.adapters["sora"]
    assert (refused.state, refused.reason, refused.serving_version) == ("failed", "prompt_mismatch", "base")
    # The base model is prompted through its own template with the character's persona.
    base_rules = prompt_rules(models.settings, models.characters["sora"], refused, models.chat_template)
    assert base_rules == PromptRules(DEFAULT_PROMPT_TEMPLATE, 0, 1000, models.characters["sora"].persona,
                                     "chat_template")
