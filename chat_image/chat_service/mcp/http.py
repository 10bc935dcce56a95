"""The streamable HTTP transport at `/mcp`, inside the chat service: bearer token (CHAT_MCP_TOKEN or the Secret file
CHAT_MCP_TOKEN_FILE), the service's body limit, and the tools' REST calls sent to this app in-process."""

from __future__ import annotations

import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import APIRouter, FastAPI
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import Receive, Scope, Send

from .tools import build_server

PATH = "/mcp"


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


async def refuse(send: Send, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
    await send({"type": "http.response.start", "status": 401, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class McpEndpoint:
    """ASGI app (a class, so that Starlette's Route passes it the raw scope): token check, then the SDK's transport."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        app = scope["app"]
        expected = app.state.mcp_token
        given = bearer_token(scope)
        if given is None:
            await refuse(send, "missing bearer token")
            return
        # compare_digest: the time taken must not reveal how much of the token matched.
        if expected is None or not hmac.compare_digest(given.encode(), expected.encode()):
            await refuse(send, "invalid bearer token")
            return
        await app.state.mcp_sessions.handle_request(scope, receive, send)


@asynccontextmanager
async def mcp_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One MCP server per app (the SDK's session manager runs once), its REST calls sent to `app` itself."""
    settings = app.state.service.settings
    app.state.mcp_token = settings.resolved_mcp_token()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://chat-service", timeout=None) as client:
        server = build_server(client)
        # Stateless with JSON answers: any replica can answer any request (no session affinity). The Host/Origin
        # check against DNS rebinding is off: a pod is reached under many host names, and a page that rebinds a
        # name still has no bearer token to send.
        server.streamable_http_app(
            stateless_http=True,
            json_response=True,
            max_request_body_size=settings.max_body_bytes,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        app.state.mcp_sessions = server.session_manager
        async with server.session_manager.run():
            yield


router = APIRouter(lifespan=mcp_lifespan)
router.add_route(PATH, McpEndpoint(), methods=["GET", "POST", "DELETE"], include_in_schema=False)
