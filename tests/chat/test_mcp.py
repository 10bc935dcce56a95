"""The MCP server through the SDK's own client: streamable HTTP at /mcp in the service, and stdio
(`python -m chat_service.mcp --url ...`) against a running service. Includes the spec's integration test,
`chat_with_character("lumina", "こんにちは")` → a non-empty reply."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from chat_service.config import Settings
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

MCP_TOKEN = "test-mcp-token"
TOOLS = {"chat_with_character", "list_characters", "character_status"}


@pytest.fixture
def base_url(make_settings: Callable[..., Settings], adapters_root, adapter_template, kit) -> Iterator[str]:
    kit.mount_trained_adapter(adapter_template, adapters_root, "lumina")
    with kit.serve(make_settings(mcp_token=MCP_TOKEN, max_body_bytes=4096)) as base:
        yield base


def http_client(base_url: str, token: str = MCP_TOKEN) -> Client:
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120)
    return Client(streamable_http_client(f"{base_url}/mcp", http_client=http))


def stdio_client(base_url: str) -> Client:
    command = [sys.executable, "-m", "chat_service.mcp", "--url", base_url]
    return Client(StdioServerParameters(command=command[0], args=command[1:]))


async def call(client: Client, tool: str, **arguments: Any) -> dict[str, Any]:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    return result.structured_content


async def spec_conversation(client: Client) -> dict[str, Any]:
    """What both transports must do: list the tools, chat twice in one session, list the characters."""
    tools = await client.list_tools()
    assert {t.name for t in tools.tools} == TOOLS
    first = await call(client, "chat_with_character", character="lumina", message="こんにちは")
    assert first["reply"].strip(), first
    assert first["adapter_version"] == "20261126T030000Z"
    again = await call(client, "chat_with_character", character="lumina", message="元気？", session=first["session"])
    assert again["session"] == first["session"] and again["message_id"] > first["message_id"]
    listing = await call(client, "list_characters")
    assert [(c["name"], c["serving_version"]) for c in listing["characters"]] == [
        ("lumina", "20261126T030000Z"),
        ("sora", "base"),
    ]
    return first


def test_streamable_http_transport(base_url: str, kit) -> None:
    async def run() -> None:
        async with http_client(base_url) as client:
            first = await spec_conversation(client)
            vote = {"message_id": first["message_id"], "feedback": "down"}
            async with httpx.AsyncClient(base_url=base_url) as rest:
                assert (await rest.post("/v1/feedback", json=vote)).status_code == 200
            status = await call(client, "character_status", character="lumina")
            assert status["serving_version"] == "20261126T030000Z"
            assert status["adapter"]["state"] == "loaded"
            assert status["eval_metrics"] == kit.trained_metrics
            assert status["versions"] == [
                {"version": "20261126T030000Z", "feedback": {"version": "20261126T030000Z", "up": 0, "down": 1,
                                                             "rated": 1, "down_rate": 1.0}}
            ]  # fmt: skip
            unknown = await client.call_tool("chat_with_character", {"character": "nobody", "message": "hi"})
            assert unknown.is_error and "unknown character" in unknown.content[0].text

    anyio.run(run)


def test_stdio_transport_against_a_running_service(base_url: str) -> None:
    async def run() -> None:
        async with stdio_client(base_url) as client:
            await spec_conversation(client)
            status = await call(client, "character_status", character="sora")
            assert (status["serving_version"], status["eval_metrics"]) == ("base", None)

    anyio.run(run)


def test_http_transport_needs_the_token_and_keeps_the_body_limit(base_url: str) -> None:
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    headers = {"Accept": "application/json, text/event-stream"}
    with httpx.Client(base_url=base_url, timeout=30) as rest:
        missing = rest.post("/mcp", json=ping, headers=headers)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = rest.post("/mcp", json=ping, headers={**headers, "Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        auth = {**headers, "Authorization": f"Bearer {MCP_TOKEN}"}
        big = {**ping, "params": {"_meta": {"pad": "x" * 5000}}}
        assert rest.post("/mcp", json=big, headers=auth).status_code == 413
        assert "/mcp" not in rest.get("/openapi.json").json()["paths"]

    async def wrong_token() -> None:
        # The SDK client's task group reports the refused connection as an MCPError inside an exception group.
        with pytest.raises(ExceptionGroup) as refused:
            async with http_client(base_url, token="nope") as client:
                await client.list_tools()
        assert refused.group_contains(MCPError)

    anyio.run(wrong_token)
