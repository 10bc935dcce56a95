"""The upstream engine's own decisions, against a scripted OpenAI-compatible server (httpx.MockTransport): which name
it asks for, loading an unknown adapter once, and errors that say what the engine said. No vLLM needed: these run in
every `make test`; tests marked `vllm` check the same against the real engine."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from chat_service.characters import Character
from chat_service.config import Settings
from chat_service.engines import EngineUnavailable, create_engine, generation_gate
from chat_service.engines.upstream import UpstreamEngine, sse_events
from chat_service.generation import ModelManager, read_adapter
from chat_service.prompting import build_prompt, prompt_rules
from pydantic import ValidationError

Handler = Callable[[httpx.Request], httpx.Response]


class FakeEngine:
    """Answers like vLLM: a model list, completions for the names it has loaded, load and unload."""

    def __init__(self, *, load_error: str | None = None) -> None:
        self.loaded: set[str] = {"base"}
        self.load_error = load_error
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.calls.append((request.url.path, body))
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": n, "max_model_len": 64} for n in sorted(self.loaded)]})
        if request.url.path == "/v1/load_lora_adapter":
            if self.load_error:
                return httpx.Response(500, json={"error": {"message": self.load_error}})
            self.loaded.add(body["lora_name"])
            return httpx.Response(200, text="Success")
        if body["model"] not in self.loaded:
            return httpx.Response(404, json={"error": {"message": f"The model `{body['model']}` does not exist."}})
        choice = {"text": "hi", "token_ids": [5, 6], "finish_reason": "length", "prompt_token_ids": body["prompt"]}
        return httpx.Response(200, json={"model": body["model"], "choices": [choice]})


def engine_for(settings: Settings, fake: Handler, characters: dict[str, Character] | None = None) -> UpstreamEngine:
    client = httpx.Client(base_url="http://engine", transport=httpx.MockTransport(fake))
    engine = UpstreamEngine(settings, characters or {}, client=client)
    engine.load()
    return engine


@pytest.fixture()
def settings(tiny_llama: Path, adapter_volume: Any, chat_mounts: Path) -> Settings:
    return Settings(
        base_model=str(tiny_llama),
        adapters_root=chat_mounts,
        engine="openai",
        engine_url="http://engine/",
        engine_adapters_root="/adapters",
    )


def ask(engine: UpstreamEngine, settings: Settings, character: str) -> Any:
    adapter = read_adapter(settings.adapters_root / f"lora_{character}", character, settings.base_model)
    rules = prompt_rules(settings, Character(name=character, display_name=character), adapter)
    return engine.generate(adapter, build_prompt(rules, "hello"), max_tokens=4, temperature=0, top_p=1)


def test_an_unknown_adapter_is_loaded_from_the_engine_mount_once(settings: Settings, adapter_volume: Any) -> None:
    fake = FakeEngine()
    engine = engine_for(settings, fake)
    assert engine.max_positions == 64  # the engine's max_model_len bounds the prompt window
    result = ask(engine, settings, "lumina")
    name = f"lumina-{adapter_volume.version}"
    assert result.adapter_version == adapter_volume.version
    loads = [body for path, body in fake.calls if path == "/v1/load_lora_adapter"]
    assert loads == [{"lora_name": name, "lora_path": f"/adapters/lora_lumina/{adapter_volume.version}"}]
    ask(engine, settings, "lumina")
    assert len([p for p, _ in fake.calls if p == "/v1/load_lora_adapter"]) == 1  # loaded now: no second load
    completions = [body for path, body in fake.calls if path == "/v1/completions"]
    assert {body["model"] for body in completions} == {name}


def test_a_character_without_adapter_asks_for_the_base_model(settings: Settings) -> None:
    fake = FakeEngine()
    engine = engine_for(settings, fake)
    result = ask(engine, settings, "sora")
    assert result.adapter_version == "base"
    assert [body["model"] for path, body in fake.calls if path == "/v1/completions"] == ["base"]
    # Decoded here from the token ids, as the in-process engine decodes (not the engine's own text).
    assert result.text == engine.tokenizer.decode([5, 6], skip_special_tokens=True).strip()
    assert (result.completion_tokens, result.finish_reason) == (2, "length")


def test_a_refused_load_raises_with_the_engine_message(settings: Settings) -> None:
    engine = engine_for(settings, FakeEngine(load_error="LoRA rank 64 is greater than max_lora_rank 16"))
    with pytest.raises(EngineUnavailable, match="max_lora_rank 16"):
        ask(engine, settings, "lumina")


def test_mounted_versions_are_loaded_at_start_and_a_refusal_is_reported(
    settings: Settings, adapter_volume: Any
) -> None:
    characters = {n: Character(name=n, display_name=n) for n in ("lumina", "sora")}
    fake = FakeEngine()
    engine = engine_for(settings, fake, characters)
    assert f"lumina-{adapter_volume.version}" in fake.loaded
    assert engine.adapter_for("lumina").state == "loaded"
    assert engine.adapter_for("sora").state == "absent"

    engine = engine_for(settings, FakeEngine(load_error="LoRA rank 64 is greater than max_lora_rank 16"), characters)
    lumina = engine.adapter_for("lumina")
    assert (lumina.state, lumina.reason, lumina.serving_version) == ("failed", "engine_refused", "base")
    assert "max_lora_rank 16" in (lumina.error or "")
    assert engine.model_name(lumina) == "base"


def test_an_unreachable_engine_is_unavailable_not_a_crash(settings: Settings) -> None:
    fake = FakeEngine()
    engine = engine_for(settings, fake)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    engine.client = httpx.Client(base_url="http://engine", transport=httpx.MockTransport(refuse))
    with pytest.raises(EngineUnavailable, match="ConnectError"):
        ask(engine, settings, "sora")


def test_an_engine_without_the_base_name_fails_loading(settings: Settings) -> None:
    fake = FakeEngine()
    fake.loaded = {"other"}
    with pytest.raises(RuntimeError, match="does not serve 'base'"):
        engine_for(settings, fake)


def test_sse_events_stop_at_done() -> None:
    lines = ["data: {\"a\": 1}", "", ": comment", "data: [DONE]", "data: {\"b\": 2}"]
    assert list(sse_events(iter(lines))) == [{"a": 1}]


def test_settings_choose_the_engine_and_its_gate(settings: Settings) -> None:
    assert isinstance(create_engine(settings, {}), UpstreamEngine)
    inprocess = Settings(base_model=settings.base_model)
    assert type(create_engine(inprocess, {})) is ModelManager
    assert isinstance(asyncio.run(_gate(settings)), asyncio.Semaphore)
    assert isinstance(asyncio.run(_gate(inprocess)), asyncio.Lock)
    with pytest.raises(ValidationError, match="CHAT_ENGINE=openai"):
        Settings(engine="openai")


async def _gate(settings: Settings) -> asyncio.Lock | asyncio.Semaphore:
    return generation_gate(settings)


def test_a_chat_template_adapter_is_served_when_the_base_tokenizer_renders_it(
    settings: Settings, tiny_llama: Path, adapter_volume: Any, tmp_path: Path
) -> None:
    """Prompt formats are checked against the base tokenizer's chat template, as the in-process engine does."""
    from chat_service.prompting import template_sha256

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base)
    config_path = base / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text("utf-8")), "chat_template": template}),
                           encoding="utf-8")
    mounted = tmp_path / "models" / "lora_lumina"
    shutil.copytree(adapter_volume.root / "lora_lumina" / adapter_volume.version, mounted)
    manifest = json.loads((mounted / "manifest.json").read_text("utf-8"))
    manifest.pop("prompt_template")
    manifest.update(schema_version=2, prompt={"format": "chat_template", "template_sha256": template_sha256(template),
                                              "system": "You are Lumina."})
    (mounted / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    chat_settings = settings.model_copy(update={"base_model": str(base), "adapters_root": mounted.parent})
    engine = engine_for(chat_settings, FakeEngine(), {"lumina": Character(name="lumina", display_name="Lumina")})
    lumina = engine.adapter_for("lumina")
    assert (lumina.state, lumina.prompt_format, lumina.system) == ("loaded", "chat_template", "You are Lumina.")
    assert engine.model_name(lumina) == f"lumina-{adapter_volume.version}"
