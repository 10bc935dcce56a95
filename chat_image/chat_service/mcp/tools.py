"""The three tools, each one or two calls of the chat service's REST API (`client` points at it)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import httpx
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

from .. import __version__

INSTRUCTIONS = (
    "Chat with the LlmMultiChat characters and see how their monthly LoRA fine-tuning went. list_characters names "
    "them; chat_with_character talks to one (pass the returned session back to continue a conversation); "
    "character_status shows the adapter version that answers, its eval metrics and users' thumbs per version."
)


CharacterName = Annotated[str, Field(description="character name, as list_characters shows it", examples=["lumina"])]


class ChatReply(BaseModel):
    reply: str = Field(description="the character's answer")
    session: str = Field(description="pass it back as `session` to continue this conversation")
    adapter_version: str = Field(description="the LoRA adapter version that answered, or 'base'")
    message_id: int = Field(description="the stored reply's id (for POST /v1/feedback)")


class CharacterSummary(BaseModel):
    name: str
    display_name: str
    serving_version: str | None = Field(description="adapter version that answers, 'base', or null while loading")
    adapter_state: str = Field(description="loaded, absent, failed or loading")


class CharacterList(BaseModel):
    characters: list[CharacterSummary]


class CharacterStatus(BaseModel):
    character: str
    serving_version: str | None
    adapter: dict[str, Any] = Field(description="state, version, reason and error of the mounted adapter")
    eval_metrics: dict[str, float | None] | None = Field(
        description="the serving adapter's manifest metrics (eval loss of base, of the version it replaced, its own)"
    )
    versions: list[dict[str, Any]] = Field(description="every known version with its thumbs up/down")


async def call(client: httpx.AsyncClient, method: str, path: str, **kwargs: Any) -> Any:
    """One REST call; an error answer becomes a tool error that says what the service said."""
    try:
        response = await client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise ToolError(f"chat service at {client.base_url} cannot be reached: {exc}") from exc
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise ToolError(f"chat service answered {response.status_code}: {detail}")
    return response.json()


def build_server(client: httpx.AsyncClient) -> MCPServer:
    """The MCP server with the three tools, calling the chat service through `client`."""
    server = MCPServer("llmmultichat", instructions=INSTRUCTIONS, version=__version__)

    @server.tool()
    async def chat_with_character(
        character: CharacterName,
        message: Annotated[str, Field(description="what you say to the character")],
        session: Annotated[str | None, Field(description="session from an earlier reply, to continue it")] = None,
    ) -> ChatReply:
        """Send a message to a character and get its reply. Omit `session` to start a new conversation."""
        body = {"character": character, "message": message, "session_id": session}
        answer = await call(client, "POST", "/v1/chat", json={k: v for k, v in body.items() if v is not None})
        return ChatReply(
            reply=answer["reply"],
            session=answer["session_id"],
            adapter_version=answer["adapter_version"],
            message_id=answer["message_id"],
        )

    @server.tool()
    async def list_characters() -> CharacterList:
        """The characters you can chat with and the adapter version each one serves."""
        listing = await call(client, "GET", "/v1/characters")
        return CharacterList(
            characters=[
                CharacterSummary(
                    name=c["name"],
                    display_name=c["display_name"],
                    serving_version=c["adapter_version"],
                    adapter_state=c["adapter"]["state"],
                )
                for c in listing["characters"]
            ]
        )

    @server.tool()
    async def character_status(character: CharacterName) -> CharacterStatus:
        """How a character's fine-tuning went: serving version, its eval metrics, users' thumbs per version."""
        history = await call(client, "GET", f"/v1/characters/{quote(character, safe='')}/versions")
        listing = await call(client, "GET", "/v1/characters")
        (info,) = [c for c in listing["characters"] if c["name"] == character]
        serving = next((v for v in history["versions"] if v["serving"]), None)
        return CharacterStatus(
            character=character,
            serving_version=history["serving_version"],
            adapter=info["adapter"],
            eval_metrics=serving["metrics"] if serving is not None else None,
            versions=[{"version": v["version"], "feedback": v["feedback"]} for v in history["versions"]],
        )

    return server
