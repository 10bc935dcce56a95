"""Per-character LoRA adapters: a mounted adapter changes the reply and the reported version; a broken one is
reported and its character falls back to the base model while everything else keeps working."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from chat_service.characters import load_characters
from chat_service.config import Settings
from chat_service.generation import ModelManager
from chat_service.prompting import (
    DEFAULT_PROMPT_TEMPLATE,
    Prompt,
    PromptRules,
    Turn,
    build_prompt,
    format_context,
    prompt_ids,
    prompt_rules,
)

VERSION = "20261126T030000Z"
GREEDY = {"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}


@pytest.fixture(scope="session")
def other_base_adapter(tmp_path_factory: pytest.TempPathFactory, kit) -> Path:
    """An adapter trained for a different base model of the same architecture (narrower layers): its module names
    match ours, its weights cannot fit them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path_factory.mktemp("other-base")
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=400, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(base)
    return kit.make_adapter(base, tmp_path_factory.mktemp("other-adapter"), "lumina", VERSION)


@pytest.fixture(scope="session")
def sora_adapter(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, kit) -> Path:
    return kit.make_adapter(base_model_dir, tmp_path_factory.mktemp("sora-adapter"), "sora", "20261201T030000Z", seed=7)


def manager(settings: Settings) -> ModelManager:
    models = ModelManager(settings, load_characters(settings.characters_file))
    models.load()
    return models


def plain_prompt(message: str) -> Prompt:
    """One prompt for every model (the contract's template, no context, no persona): replies differ by weights only."""
    return build_prompt(PromptRules(DEFAULT_PROMPT_TEMPLATE, 0, 0, ""), message)


def reply(models: ModelManager, character: str, message: str = "hello") -> str:
    return models.generate(models.adapter_for(character), plain_prompt(message), **GREEDY).text


def rules(models: ModelManager, character: str) -> PromptRules:
    return prompt_rules(models.settings, models.characters[character], models.adapter_for(character))


def prompt_tokens(models: ModelManager, rules: PromptRules, instruction: str, earlier: list[Turn]) -> list[int]:
    return prompt_ids(build_prompt(rules, instruction, earlier), models.tokenizer, models.settings.max_prompt_tokens)


def corrupt_config(d: Path) -> None:
    (d / "adapter_config.json").write_text("{not json", encoding="utf-8")


def missing_weights(d: Path) -> None:
    (d / "adapter_model.safetensors").unlink()


def truncated_weights(d: Path) -> None:
    weights = d / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])


def bad_manifest(d: Path) -> None:
    (d / "manifest.json").write_text("[1, 2", encoding="utf-8")


def missing_manifest(d: Path) -> None:
    (d / "manifest.json").unlink()


def wrong_character(d: Path) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(manifest | {"character": "sora"}))


def bad_template(d: Path) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(manifest | {"prompt_template": "Q: {question}\nA: "}))


def unknown_prompt_format(d: Path) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps(manifest | {"prompt": {"format": "chatml"}}))


def foreign_chat_template(d: Path) -> None:
    """Trained with a chat template the base tokenizer does not have (whether it has one or none)."""
    manifest = json.loads((d / "manifest.json").read_text())
    prompt = {"format": "chat_template", "template_sha256": "0" * 64, "system": "persona"}
    (d / "manifest.json").write_text(json.dumps(manifest | {"prompt": prompt}))


def only_config(d: Path) -> None:
    for path in d.iterdir():
        if path.name != "adapter_config.json":
            path.unlink()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (corrupt_config, "invalid_config"),
        (missing_weights, "missing_weights"),
        (truncated_weights, "incompatible"),
        (bad_manifest, "invalid_manifest"),
        (missing_manifest, "missing_manifest"),
        (wrong_character, "wrong_character"),
        (bad_template, "invalid_manifest"),
        (unknown_prompt_format, "invalid_manifest"),
        (foreign_chat_template, "prompt_mismatch"),
        (only_config, "missing_manifest"),
    ],
)
def test_broken_adapter_serves_base_and_says_why(
    damage: Callable[[Path], None],
    reason: str,
    make_settings: Callable[..., Settings],
    adapters_root: Path,
    adapter_template: Path,
    sora_adapter: Path,
    kit,
) -> None:
    base = manager(make_settings())
    lumina_dir = kit.mount_adapter(adapter_template, adapters_root, "lumina")
    kit.mount_adapter(sora_adapter, adapters_root, "sora")
    healthy = manager(make_settings())
    damage(lumina_dir)
    models = manager(make_settings())

    status = models.adapters["lumina"]
    assert (status.state, status.reason, status.serving_version) == ("failed", reason, "base")
    assert status.error
    assert reply(models, "lumina") == reply(base, "lumina")
    # The other character's adapter is untouched by lumina's failure (lumina is loaded first).
    assert models.adapters["sora"].state == "loaded"
    assert reply(models, "sora") == reply(healthy, "sora") != reply(base, "sora")


def test_adapter_for_another_base_is_refused(
    make_settings: Callable[..., Settings], adapters_root: Path, other_base_adapter: Path, sora_adapter: Path, kit
) -> None:
    base = manager(make_settings())
    kit.mount_adapter(other_base_adapter, adapters_root, "lumina")
    kit.mount_adapter(sora_adapter, adapters_root, "sora")
    models = manager(make_settings())
    assert models.adapters["lumina"].reason == "incompatible"
    assert "size mismatch" in (models.adapters["lumina"].error or "")
    # The recorded base differs from ours: kept as a warning, it explains the failure to whoever reads /readyz.
    assert any(w.startswith("manifest base_model is") for w in models.adapters["lumina"].warnings)
    assert reply(models, "lumina") == reply(base, "lumina")
    assert models.adapters["sora"].state == "loaded"


def test_second_adapter_broken_first_keeps_working(
    make_settings: Callable[..., Settings], adapters_root: Path, adapter_template: Path, other_base_adapter: Path, kit
) -> None:
    """sora fails after lumina loaded (load_adapter on an existing PeftModel): the half-loaded adapter is removed."""
    kit.mount_adapter(adapter_template, adapters_root, "lumina")
    healthy = manager(make_settings())
    sora_dir = adapters_root / "lora_sora"
    shutil.copytree(other_base_adapter, sora_dir)
    wrong_character_fix = json.loads((sora_dir / "manifest.json").read_text()) | {"character": "sora"}
    (sora_dir / "manifest.json").write_text(json.dumps(wrong_character_fix))
    base = manager(make_settings(adapters_root=adapters_root.parent / "empty"))
    models = manager(make_settings())
    assert models.adapters["sora"].reason == "incompatible"
    assert "sora" not in models.model.peft_config
    assert reply(models, "sora") == reply(base, "sora")
    assert reply(models, "lumina") == reply(healthy, "lumina") != reply(base, "lumina")


def test_empty_mount_is_absent_not_failed(make_settings: Callable[..., Settings], adapters_root: Path) -> None:
    (adapters_root / "lora_lumina").mkdir()
    (adapters_root / "lora_lumina" / ".tmp-partial").mkdir()  # readers ignore dot names
    models = manager(make_settings())
    assert models.adapters["lumina"].state == "absent"
    assert models.adapters["lumina"].reason is None


def test_base_model_name_difference_is_a_warning(
    make_settings: Callable[..., Settings], adapters_root: Path, base_model_dir: Path, tmp_path: Path, kit
) -> None:
    kit.make_adapter(base_model_dir, adapters_root, "lumina", VERSION, base_name="/models/base")
    models = manager(make_settings())
    assert models.adapters["lumina"].state == "loaded"
    assert models.adapters["lumina"].warnings == [
        f"manifest base_model is '/models/base', serving base is '{base_model_dir}'"
    ]


def test_prompt_template_and_context_come_from_the_manifest(
    make_settings: Callable[..., Settings], adapters_root: Path, adapter_template: Path, kit
) -> None:
    lumina_dir = kit.mount_adapter(adapter_template, adapters_root, "lumina")
    manifest = json.loads((lumina_dir / "manifest.json").read_text())
    template = "### Q\n{instruction}\n### Context\n{input}\n### A\n"
    manifest |= {"prompt_template": template, "data": {"context_turns": 2, "context_chars": 40}}
    (lumina_dir / "manifest.json").write_text(json.dumps(manifest))
    models = manager(make_settings(context_chars=5))  # the manifest's 40 wins for lumina
    lumina, sora = rules(models, "lumina"), rules(models, "sora")
    assert lumina == PromptRules(template, context_turns=2, context_chars=40, persona="")  # an adapter: no persona
    # No adapter: the contract's template, CHAT_CONTEXT_MESSAGES (default 0: empty input), CHAT_CONTEXT_CHARS, and
    # the persona, since the base model knows nothing else about the character.
    persona = models.characters["sora"].persona
    assert sora == PromptRules(DEFAULT_PROMPT_TEMPLATE, context_turns=0, context_chars=5, persona=persona)
    earlier = [Turn("user", "old"), Turn("assistant", "first\nline"), Turn("user", " "), Turn("user", "x" * 10)]
    ids = prompt_tokens(models, lumina, "hi", earlier)  # the last 2 non-empty turns
    assert models.tokenizer.decode(ids) == f"### Q\nhi\n### Context\nassistant: first\nline\nuser: {'x' * 10}\n### A\n"
    # Over the character budget: the trainer's rule keeps the last context_chars characters.
    assert (
        format_context([Turn("user", "a" * 30), Turn("assistant", "b" * 30)], 50)
        == "a" * 8 + "\nassistant: " + "b" * 30
    )
    # The persona (base only) stays in front and is never cut.
    assert format_context([Turn("system", "persona"), Turn("user", "c" * 50)], 10) == "system: persona\n" + "c" * 10
    ids = prompt_tokens(models, sora, "hi", earlier)
    assert models.tokenizer.decode(ids) == f"Instruction: hi\nInput: system: {persona}\nOutput: "
    one_turn = PromptRules(DEFAULT_PROMPT_TEMPLATE, context_turns=1, context_chars=5, persona=persona)
    ids = prompt_tokens(models, one_turn, "hi", [Turn("user", "abcdefgh")])
    assert models.tokenizer.decode(ids) == f"Instruction: hi\nInput: system: {persona}\ndefgh\nOutput: "


def test_long_prompts_are_cut_by_the_rule(make_settings: Callable[..., Settings]) -> None:
    models = manager(make_settings(max_prompt_tokens=32))
    six_turns = PromptRules(DEFAULT_PROMPT_TEMPLATE, context_turns=6, context_chars=1000, persona="a long persona " * 5)
    context = [Turn("user", f"turn {i} " * 5) for i in range(6)]
    ids = prompt_tokens(models, six_turns, "short question", context)
    text = models.tokenizer.decode(ids)
    assert len(ids) <= 32
    # Context dropped oldest first, the persona (in front) first of all.
    assert text.startswith("Instruction: short question") and text.endswith("Output: ")
    assert "persona" not in text
    ids = prompt_tokens(models, six_turns, "long " * 200, [])
    assert len(ids) == 32 and models.tokenizer.decode(ids).endswith("Output: ")  # kept the end of the prompt


def test_mounted_adapter_changes_reply_and_version_over_http(
    make_settings: Callable[..., Settings], adapters_root: Path, adapter_template: Path, kit, tmp_path: Path
) -> None:
    request = {"character": "lumina", "message": "こんにちは", "max_tokens": 8, "temperature": 0, "session_id": "s"}
    sora_request = request | {"character": "sora"}
    with kit.serve(make_settings(database_url=f"sqlite:///{tmp_path / 'a.db'}")) as base_url:
        before = httpx.post(f"{base_url}/v1/chat", json=request, timeout=60).json()
        sora_before = httpx.post(f"{base_url}/v1/chat", json=sora_request, timeout=60).json()
    kit.mount_adapter(adapter_template, adapters_root, "lumina")
    with kit.serve(make_settings(database_url=f"sqlite:///{tmp_path / 'b.db'}")) as base_url:
        after = httpx.post(f"{base_url}/v1/chat", json=request, timeout=60).json()
        sora_after = httpx.post(f"{base_url}/v1/chat", json=sora_request, timeout=60).json()
        characters = {c["name"]: c for c in httpx.get(f"{base_url}/v1/characters").json()["characters"]}
        metrics = httpx.get(f"{base_url}/metrics").text
        ready = httpx.get(f"{base_url}/readyz").json()
    assert before["adapter_version"] == "base"
    assert after["adapter_version"] == VERSION
    assert after["reply"] != before["reply"]
    assert sora_after == sora_before | {
        "message_id": sora_after["message_id"],
        "user_message_id": sora_after["user_message_id"],
    }
    assert characters["lumina"]["adapter_version"] == VERSION
    assert characters["lumina"]["adapter"]["state"] == "loaded"
    assert characters["sora"]["adapter_version"] == "base"
    assert f'chat_adapter_info{{character="lumina",version="{VERSION}"}} 1.0' in metrics
    assert f'chat_tokens_generated_total{{adapter_version="{VERSION}",character="lumina"}}' in metrics
    assert ready["characters"]["lumina"]["serving"] == VERSION


def test_corrupted_adapter_over_http_still_answers_and_reports(
    make_settings: Callable[..., Settings], adapters_root: Path, adapter_template: Path, kit
) -> None:
    truncated_weights(kit.mount_adapter(adapter_template, adapters_root, "lumina"))
    with kit.serve(make_settings()) as base_url:
        answer = httpx.post(
            f"{base_url}/v1/chat", json={"character": "lumina", "message": "hi", "max_tokens": 4}, timeout=60
        )
        ready = httpx.get(f"{base_url}/readyz")
        metrics = httpx.get(f"{base_url}/metrics").text
        characters = httpx.get(f"{base_url}/v1/characters").json()["characters"]
    assert answer.status_code == 200 and answer.json()["adapter_version"] == "base"
    assert ready.status_code == 200  # serving base for one character is degraded, not unready
    detail = ready.json()["characters"]["lumina"]
    assert (detail["state"], detail["reason"], detail["serving"]) == ("failed", "incompatible", "base")
    assert "cannot load adapter" in detail["error"]
    assert 'chat_adapter_state{character="lumina",reason="incompatible",state="failed"} 1.0' in metrics
    assert 'chat_adapter_info{character="lumina",version="base"} 1.0' in metrics
    assert characters[0]["adapter"]["reason"] == "incompatible"


def test_stream_cancel_stops_generation(make_settings: Callable[..., Settings], endless_base: Path) -> None:
    """Setting the cancel event (what the SSE endpoint does when the client leaves) ends generation early."""
    models = manager(make_settings(base_model=str(endless_base)))
    adapter = models.adapter_for("lumina")
    params = {"max_tokens": 64, "temperature": 0.0, "top_p": 1.0}
    full = models.stream(adapter, plain_prompt("こんにちは"), **params)
    streamed = "".join(full.pieces)
    result = full.finish()
    # Precondition, by construction (EOS suppressed): left alone, the reply runs to the limit.
    assert (result.finish_reason, result.completion_tokens) == ("length", 64)
    assert streamed.strip() == result.text

    cancelled = models.stream(adapter, plain_prompt("こんにちは"), **params)
    # Cancelled while it generates, as soon as it started; the stream still ends.
    cancelled.cancel.set()
    for _ in cancelled.pieces:
        pass
    stopped = cancelled.finish()
    assert stopped.completion_tokens < 64
    assert stopped.finish_reason == "stop"
