"""The chat service's side of the hot promotion (contract §6) against a real vLLM engine: the serving folder says what
serves at start, PUT /v1/admin/adapters/{name} (bearer CHAT_ADMIN_TOKEN) switches a character to another version on
the adapter volume from the next reply on, and a version that cannot be used is refused while the current one keeps
serving. Opt-in: `pytest --run-vllm tests/vllm`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from chat_service.app import create_app
from chat_service.config import Settings
from devkit.vllm_engine import VllmServer, build_adapter
from devkit.waiting import wait_until
from fastapi.testclient import TestClient

pytestmark = pytest.mark.vllm

V1, V2, WRONG = "20261101T030000Z", "20261102T030000Z", "20261103T030000Z"
TOKEN = "adm1n"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def manifest(directory: Path, version: str, base: Path) -> None:
    body = {"schema_version": 1, "character": "lumina", "version": version, "base_model": str(base),
            "prompt_template": "Instruction: {instruction}\nInput: {input}\nOutput: "}
    (directory / "manifest.json").write_text(json.dumps(body), encoding="utf-8")


@pytest.fixture(scope="module")
def volume(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """V1 and V2 of lumina; WRONG's manifest names another version (a copy gone wrong)."""
    root = tmp_path_factory.mktemp("switch-volume")
    for seed, version in ((21, V1), (22, V2)):
        manifest(build_adapter(tiny_llama, root / "lora_lumina" / version, seed=seed), version, tiny_llama)
    wrong = build_adapter(tiny_llama, root / "lora_lumina" / WRONG, seed=23)
    manifest(wrong, V1, tiny_llama)
    return root


@pytest.fixture()
def chat(engine: VllmServer, tiny_llama: Path, volume: Path, tmp_path: Path) -> Iterator[TestClient]:
    serving = tmp_path / "serving"  # the ConfigMap as mounted: lumina serves V1 at start, sora the base model
    serving.mkdir()
    (serving / "lumina").write_text(V1 + "\n")
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'chat.db'}", base_model=str(tiny_llama),
                        adapters_root=tmp_path / "no-mounts", engine="openai", engine_url=engine.url,
                        engine_adapters_root=str(volume), engine_serving_dir=serving, admin_token=TOKEN,
                        history_token="t")
    with TestClient(create_app(settings)) as client:
        wait_until("the chat service ready", lambda: client.get("/readyz").status_code == 200, timeout=120,
                   interval=0.5)
        yield client


def reply_version(chat: TestClient) -> str:
    answer = chat.post("/v1/chat", json={"character": "lumina", "message": "hi", "max_tokens": 2, "temperature": 0})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["adapter_version"])


def engine_models(engine: VllmServer) -> set[str]:
    return {m["id"] for m in httpx.get(f"{engine.url}/v1/models", timeout=30).json()["data"]}


def test_start_from_the_serving_folder_then_switch_without_a_restart(chat: TestClient, engine: VllmServer) -> None:
    assert chat.get("/readyz").json()["characters"]["lumina"]["serving"] == V1
    assert reply_version(chat) == V1
    answer = chat.put("/v1/admin/adapters/lumina", json={"version": V2}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"character": "lumina", "serving_version": V2}
    assert f"lumina-{V2}" in engine_models(engine)  # loaded before the switch
    assert reply_version(chat) == V2
    assert chat.get("/v1/characters/lumina/versions").json()["serving_version"] == V2
    assert chat.put("/v1/admin/adapters/lumina", json={"version": None}, headers=AUTH).json()["serving_version"] == \
        "base"
    assert reply_version(chat) == "base"


@pytest.mark.parametrize(("version", "reason"), [
    ("20991231T000000Z", "missing_version"), (WRONG, "version_mismatch"), ("../lora_sora", "invalid_version"),
])
def test_an_unusable_version_is_refused_and_the_current_one_keeps_serving(chat: TestClient, version: str,
                                                                           reason: str) -> None:
    answer = chat.put("/v1/admin/adapters/lumina", json={"version": version}, headers=AUTH)
    assert answer.status_code == 409, answer.text
    assert answer.json()["detail"]["reason"] == reason
    assert reply_version(chat) == V1


def test_the_admin_endpoint_wants_its_token(chat: TestClient) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer t"}):  # not the history token
        answer = chat.put("/v1/admin/adapters/lumina", json={"version": V2}, headers=headers)
        assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
    assert chat.put("/v1/admin/adapters/nobody", json={"version": V2}, headers=AUTH).status_code == 404
    assert reply_version(chat) == V1
