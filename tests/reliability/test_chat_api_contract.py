"""The eight places where the chat service's OpenAPI document did not tell the truth (found by schemathesis), each
pinned by a direct check: strict JSON types, the 404s and 503s declared, the rules the schema cannot express stated
in the documented 422, /metrics as text, and `Allow` listing every method of a path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from chat_service.app import create_app
from chat_service.config import Settings
from fastapi.testclient import TestClient

TOKEN = "contract-token"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'chat.db'}", base_model=str(tmp_path / "no-model"),
                        history_token=TOKEN, adapters_root=tmp_path)
    with TestClient(create_app(settings, load_model=False)) as c:
        yield c


@pytest.fixture
def document(client: TestClient) -> dict[str, Any]:
    return dict(client.get("/openapi.json").json())


@pytest.mark.parametrize(("body", "field"), [
    ({"temperature": False}, "temperature"),
    ({"temperature": "0.5"}, "temperature"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
])
def test_numbers_are_json_numbers(client: TestClient, body: dict[str, Any], field: str) -> None:
    response = client.post("/v1/chat", json={"character": "lumina", "message": "hi", **body})
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [["body", field]]


def test_an_integral_float_is_an_integer_as_in_json_schema(client: TestClient) -> None:
    # Valid: it gets as far as the model (still loading here).
    assert client.post("/v1/chat", json={"character": "lumina", "message": "hi", "max_tokens": 5.0}).status_code == 503


def test_stream_is_a_json_boolean(client: TestClient) -> None:
    body = {"model": "lumina", "messages": [{"role": "user", "content": "hi"}], "stream": "true"}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "stream"]


def test_import_times_are_rfc3339_strings(client: TestClient) -> None:
    message = {"session_id": "s", "character": "lumina", "role": "user", "content": "x", "created_at": 0}
    response = client.post("/v1/history", json={"messages": [message]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "messages", 0, "created_at"]


@pytest.mark.parametrize(("path", "method", "statuses"), [
    ("/v1/chat", "post", {"200", "400", "404", "413", "422", "503"}),
    ("/v1/chat/completions", "post", {"200", "400", "404", "413", "422", "503"}),
    ("/v1/feedback", "post", {"200", "400", "404", "413", "422"}),
    ("/v1/history", "get", {"200", "401", "404", "422"}),
    ("/v1/history", "post", {"201", "400", "401", "413", "422"}),
])
def test_every_answer_is_declared(document: dict[str, Any], path: str, method: str, statuses: set[str]) -> None:
    assert set(document["paths"][path][method]["responses"]) == statuses


@pytest.mark.parametrize(("path", "method", "rules"), [
    ("/v1/history", "get", ["`until` after `since`", "a `cursor` this service returned"]),
    ("/v1/history", "post", ["character is a known one", "only assistant messages carry feedback"]),
    ("/v1/feedback", "post", ["the message is a reply"]),
    ("/v1/chat/completions", "post", ["the last message is the user's"]),
])
def test_rules_beyond_the_schema_are_stated(document: dict[str, Any], path: str, method: str,
                                            rules: list[str]) -> None:
    description = document["paths"][path][method]["responses"]["422"]["description"]
    assert all(rule in description for rule in rules), description


def test_metrics_are_documented_as_text(client: TestClient, document: dict[str, Any]) -> None:
    assert list(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    assert client.get("/metrics").headers["content-type"].startswith("text/plain")


def test_allow_lists_every_method_of_the_path(client: TestClient) -> None:
    assert client.options("/v1/history").headers["allow"] == "GET, POST"
    assert client.delete("/v1/chat").headers["allow"] == "POST"
    assert client.put("/v1/characters/lumina/feedback").headers["allow"] == "GET"


def test_bounds_are_json_schema_keywords(document: dict[str, Any]) -> None:
    """pydantic writes a bound it cannot translate under its own name (`ge`), which JSON Schema ignores."""
    def keys(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield key
                yield from keys(value)
        elif isinstance(node, list):
            for item in node:
                yield from keys(item)

    assert {"ge", "gt", "le", "lt"} & set(keys(document["components"]["schemas"])) == set()
    chat = document["components"]["schemas"]["ChatRequest"]["properties"]
    assert chat["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1}
