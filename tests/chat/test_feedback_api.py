"""Feedback per adapter version over HTTP: the aggregate endpoint, its OpenAPI entry and the Prometheus counter."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest
from chat_service.config import Settings


@pytest.fixture
def client(make_settings: Callable[..., Settings], adapters_root, adapter_template, kit) -> Iterator[httpx.Client]:
    kit.mount_adapter(adapter_template, adapters_root, "lumina")
    with kit.serve(make_settings()) as base, httpx.Client(base_url=base, timeout=60) as client:
        yield client


def reply_id(client: httpx.Client, character: str = "lumina") -> int:
    body = {"character": character, "message": "こんにちは", "max_tokens": 2, "temperature": 0}
    response = client.post("/v1/chat", json=body)
    assert response.status_code == 200, response.text
    return response.json()["message_id"]


def rate(client: httpx.Client, message_id: int, rating: str) -> None:
    response = client.post("/v1/feedback", json={"message_id": message_id, "feedback": rating})
    assert response.status_code == 200, response.text


def test_feedback_per_version_and_metrics(client: httpx.Client, kit) -> None:
    lumina = [reply_id(client) for _ in range(3)]
    sora = reply_id(client, "sora")
    for message_id, rating in zip(lumina, ["up", "down", "down"], strict=True):
        rate(client, message_id, rating)
    rate(client, lumina[0], "down")  # changed vote: the latest counts in the store
    rate(client, sora, "up")
    imported = {"session_id": "old", "character": "lumina", "role": "assistant", "content": "昔の返事",
                "created_at": "2026-09-30T15:00:00Z"}  # fmt: skip
    (old_id,) = client.post("/v1/history", json={"messages": [imported]}, headers=kit.auth).json()["ids"]
    rate(client, old_id, "up")

    body = client.get("/v1/characters/lumina/feedback").json()
    assert body == {
        "character": "lumina",
        "serving_version": "20261126T030000Z",
        "versions": [
            {"version": "20261126T030000Z", "up": 0, "down": 3, "rated": 3, "down_rate": 1.0},
            {"version": None, "up": 1, "down": 0, "rated": 1, "down_rate": 0.0},
        ],
    }
    assert client.get("/v1/characters/sora/feedback").json()["versions"] == [
        {"version": "base", "up": 1, "down": 0, "rated": 1, "down_rate": 0.0}
    ]

    metrics = client.get("/metrics").text
    # Votes received (a changed vote is a second vote); a version this replica does not serve is 'other'.
    assert 'chat_feedback_votes_total{character="lumina",rating="down",version="20261126T030000Z"} 3.0' in metrics
    assert 'chat_feedback_votes_total{character="lumina",rating="up",version="20261126T030000Z"} 1.0' in metrics
    assert 'chat_feedback_votes_total{character="lumina",rating="up",version="other"} 1.0' in metrics
    assert 'chat_feedback_votes_total{character="sora",rating="up",version="base"} 1.0' in metrics


def test_unknown_character_is_404_and_documented(client: httpx.Client) -> None:
    response = client.get("/v1/characters/nobody/feedback")
    assert response.status_code == 404
    assert response.json()["detail"]["known_characters"] == ["lumina", "sora"]
    assert client.get("/v1/characters/sora/feedback").json()["versions"] == []

    operation = client.get("/openapi.json").json()["paths"]["/v1/characters/{name}/feedback"]["get"]
    assert set(operation["responses"]) >= {"200", "404", "422"}
    assert operation["responses"]["404"]["description"] == "unknown character"
    schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["$ref"].endswith("/CharacterFeedback")

    assert client.get("/v1/characters/nobody/versions").status_code == 404
    versions = client.get("/openapi.json").json()["paths"]["/v1/characters/{name}/versions"]["get"]["responses"]
    assert versions["404"]["description"] == "unknown character"


def test_versions_list_the_serving_one_with_its_metrics(client: httpx.Client) -> None:
    # The fixture's adapter has no metrics in its manifest: the serving version is listed with none.
    rate(client, reply_id(client), "up")
    assert client.get("/v1/characters/lumina/versions").json() == {
        "character": "lumina",
        "serving_version": "20261126T030000Z",
        "versions": [
            {"version": "20261126T030000Z", "serving": True, "metrics": None,
             "feedback": {"version": "20261126T030000Z", "up": 1, "down": 0, "rated": 1, "down_rate": 0.0}},
        ],
    }  # fmt: skip
    sora = client.get("/v1/characters/sora/versions").json()["versions"]
    assert sora == [{"version": "base", "serving": True, "metrics": None, "feedback": None}]


def test_the_serving_runs_eval_losses_are_metrics(make_settings, adapters_root, adapter_template, kit) -> None:
    kit.mount_trained_adapter(adapter_template, adapters_root, "lumina")
    with kit.serve(make_settings()) as base:
        text = httpx.get(f"{base}/metrics").text
    losses = {"base": "eval_loss_base", "replaced": "eval_loss_serving", "adapter": "eval_loss_adapter"}
    for kind, key in losses.items():
        line = f'chat_adapter_eval_loss{{character="lumina",kind="{kind}",version="20261126T030000Z"}}'
        assert f"{line} {kit.trained_metrics[key]}" in text
    assert 'chat_adapter_eval_loss{character="sora"' not in text  # base serves: no run, no losses
