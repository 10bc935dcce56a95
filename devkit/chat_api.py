"""The chat API as the dev kit's flows drive it: history imported in bounded batches, replies sampled, the serving
adapter version read. Plain HTTP, as any client of the service sees it."""

from __future__ import annotations

from typing import Any

import httpx

PROBES_PER_PROMPT = 3


def import_history(url: str, token: str, messages: list[dict[str, Any]]) -> int:
    """Send recorded conversations through the chat API's import endpoint, in bounded batches."""
    imported = 0
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        for start in range(0, len(messages), 200):
            batch = [{k: v for k, v in m.items() if k != "id"} for m in messages[start : start + 200]]
            response = client.post("/v1/history", json={"messages": batch})
            response.raise_for_status()
            imported += len(response.json()["ids"])
    return imported


def sample_replies(url: str, character: str, prompts: list[str]) -> list[str]:
    """:data:`PROBES_PER_PROMPT` replies to each prompt, each in a new session, sampled as the service serves them
    (the character's temperature): a style score over 8 replies moves in steps of 0.125, too coarse for a 0.1 bar."""
    replies = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for index, prompt in enumerate(prompts):
            for probe in range(PROBES_PER_PROMPT):
                body = {"character": character, "session_id": f"demo-probe-{index}-{probe}", "message": prompt}
                response = client.post("/v1/chat", json=body)
                response.raise_for_status()
                replies.append(response.json()["reply"])
    return replies


def serving_version(url: str, character: str) -> str | None:
    characters = httpx.get(f"{url}/v1/characters", timeout=10).json()["characters"]
    return next(c.get("adapter_version") for c in characters if c["name"] == character)
