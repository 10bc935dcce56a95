"""The chat service generating through a real vLLM engine (CHAT_ENGINE=openai): the trainer's token ids reach the
engine unchanged, replies name the adapter version that produced them, a restarted engine serves the current
version again, and an adapter the engine refuses is a clean 503. Opt-in: `pytest --run-vllm tests/vllm`."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from chat_service.app import create_app
from chat_service.characters import Character
from chat_service.config import Settings
from chat_service.engines.upstream import UpstreamEngine
from chat_service.generation import read_adapter
from chat_service.prompting import Turn, build_prompt, prompt_rules
from devkit.vllm_engine import VllmServer
from devkit.waiting import wait_until
from fastapi.testclient import TestClient

if TYPE_CHECKING:
    from .conftest import AdapterVolume

pytestmark = pytest.mark.vllm


def settings_for(engine: VllmServer, tiny_llama: Path, volume_root: Path, chat_mounts: Path, tmp: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp / 'chat.db'}",
        base_model=str(tiny_llama),
        adapters_root=chat_mounts,
        engine="openai",
        engine_url=engine.url,
        engine_adapters_root=str(volume_root),
        history_token="t",
    )


@pytest.fixture()
def settings(
    engine: VllmServer, tiny_llama: Path, adapter_volume: AdapterVolume, chat_mounts: Path, tmp_path: Path
) -> Settings:
    return settings_for(engine, tiny_llama, adapter_volume.root, chat_mounts, tmp_path)


@pytest.fixture()
def version(adapter_volume: AdapterVolume) -> str:
    return adapter_volume.version


@pytest.fixture()
def chat(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        wait_until("the chat service ready", lambda: client.get("/readyz").status_code == 200, timeout=60,
                   interval=0.5)
        yield client


def engine_models(engine: VllmServer) -> set[str]:
    return {m["id"] for m in httpx.get(f"{engine.url}/v1/models", timeout=30).json()["data"]}


def unload_everything(engine: VllmServer) -> None:
    for name in engine_models(engine) - {"base"}:
        httpx.post(f"{engine.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=30)


def test_served_prompt_ids_are_the_trained_ids(
    settings: Settings, engine: VllmServer, adapter_volume: AdapterVolume
) -> None:
    """The ids the trainer computes for an example's prompt are the ids the engine receives and reports back."""
    from training.collate import tokenize_example

    sent: list[dict[str, Any]] = []
    received: list[list[int]] = []

    def on_response(response: httpx.Response) -> None:
        if response.request.url.path == "/v1/completions" and response.status_code == 200:
            response.read()
            sent.append(json.loads(response.request.content))
            received.append(response.json()["choices"][0]["prompt_token_ids"])

    client = httpx.Client(base_url=engine.url, timeout=120, event_hooks={"response": [on_response]})
    upstream = UpstreamEngine(settings, {}, client=client)
    upstream.load()
    adapter = read_adapter(settings.adapters_root / "lora_lumina", "lumina", settings.base_model)
    lumina = Character(name="lumina", display_name="Lumina")
    earlier = [Turn("user", "good morning"), Turn("assistant", "sunny and warm"), Turn("user", "hello there")]
    prompt = build_prompt(prompt_rules(settings, lumina, adapter), "what is the weather like?", earlier)
    result = upstream.generate(adapter, prompt, max_tokens=8, temperature=0, top_p=1)

    # The trainer's record for the same exchange: the manifest's last context_turns turns as `input`, in its own format.
    context = "\n".join(f"{t.role}: {t.content}" for t in earlier[-adapter_volume.context_turns :])
    record = {"instruction": "what is the weather like?", "input": context, "output": "sunny"}
    example = tokenize_example(record, upstream.tokenizer, max_length=256)
    trained_prompt = [i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label == -100]
    assert sent[-1]["model"] == f"lumina-{adapter_volume.version}"
    assert sent[-1]["prompt"] == trained_prompt
    assert received[-1] == trained_prompt
    assert result.adapter_version == adapter_volume.version
    assert result.prompt_tokens == len(trained_prompt)


def test_chat_replies_come_from_the_adapter_version_loaded_on_demand(
    chat: TestClient, engine: VllmServer, version: str
) -> None:
    unload_everything(engine)  # as after an engine restart: the engine knows only the base model
    reply = chat.post("/v1/chat", json={"character": "lumina", "message": "hello there", "temperature": 0})
    assert reply.status_code == 200, reply.text
    assert reply.json()["adapter_version"] == version
    assert f"lumina-{version}" in engine_models(engine)  # the service loaded its version under the version-unique name

    base = chat.post("/v1/chat", json={"character": "sora", "message": "hello there", "temperature": 0})
    assert base.status_code == 200, base.text
    assert base.json()["adapter_version"] == "base"
    history = chat.get("/v1/history", params={"character": "lumina"}, headers={"Authorization": "Bearer t"})
    assert [m["content"] for m in history.json()["messages"] if m["role"] == "assistant"] == [reply.json()["reply"]]


def test_streamed_reply_is_the_stored_reply(chat: TestClient, version: str) -> None:
    body = {"model": "lumina", "messages": [{"role": "user", "content": "hello there"}], "temperature": 0,
            "max_tokens": 12}
    plain = chat.post("/v1/chat/completions", json=body).json()
    with chat.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
    assert events[-1]["adapter_version"] == plain["adapter_version"] == version
    assert text == plain["choices"][0]["message"]["content"]  # greedy: the same reply, streamed or not


def test_an_adapter_the_engine_refuses_is_reported_and_its_character_serves_base(
    engine: VllmServer, tiny_llama: Path, adapter_volume: AdapterVolume, version: str, tmp_path: Path
) -> None:
    # Valid for PEFT (the chat pod accepts it), but rank 64 is above the engine's --max-lora-rank.
    broken = tmp_path / "volume" / "lora_lumina" / version
    broken.mkdir(parents=True)
    source = adapter_volume.root / "lora_lumina" / version
    for name in ("adapter_model.safetensors", "manifest.json"):
        (broken / name).write_bytes((source / name).read_bytes())
    config = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 64}), encoding="utf-8")
    mounts = tmp_path / "mounts"
    mounts.mkdir()
    (mounts / "lora_lumina").symlink_to(broken)
    unload_everything(engine)
    settings = settings_for(engine, tiny_llama, tmp_path / "volume", mounts, tmp_path)
    with TestClient(create_app(settings)) as client:
        while (ready := client.get("/readyz")).status_code != 200:
            time.sleep(0.5)
        lumina = ready.json()["characters"]["lumina"]
        assert (lumina["state"], lumina["reason"], lumina["serving"]) == ("failed", "engine_refused", "base")
        assert "rank" in lumina["error"].lower()  # vLLM's own reason
        reply = client.post("/v1/chat", json={"character": "lumina", "message": "hi", "temperature": 0})
        assert reply.status_code == 200
        assert reply.json()["adapter_version"] == "base"  # honest: the base model answered
    assert f"lumina-{version}" not in engine_models(engine)


def test_a_restarted_engine_serves_the_current_version_again(
    chat: TestClient, engine: VllmServer, version: str
) -> None:
    first = chat.post("/v1/chat", json={"character": "lumina", "message": "hello there", "temperature": 0}).json()
    engine.stop()
    down = chat.post("/v1/chat", json={"character": "lumina", "message": "hello there", "temperature": 0})
    assert down.status_code == 503  # said plainly while the engine is away
    engine.start()  # same port, a fresh process: no adapter loaded
    again = chat.post("/v1/chat", json={"character": "lumina", "message": "hello there", "temperature": 0})
    assert again.status_code == 200, again.text
    assert again.json()["adapter_version"] == version
    assert again.json()["reply"] == first["reply"]  # the same weights under the same name
