"""One APIRouter per resource; `app.create_app` includes them in this order (also the order of /docs)."""

from __future__ import annotations

from fastapi import APIRouter

from ..mcp import http as mcp_http
from . import admin, characters, chat, feedback, history, openai, ops, versions, web

ROUTERS: tuple[APIRouter, ...] = (
    chat.router,
    openai.router,
    characters.router,
    feedback.router,
    versions.router,
    history.router,
    ops.router,
    admin.router,
    mcp_http.router,
    web.router,
)
