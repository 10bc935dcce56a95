"""One APIRouter per resource; `app.create_app` includes them in this order (also the order of /docs)."""

from __future__ import annotations

from fastapi import APIRouter

from . import characters, chat, feedback, history, openai, ops

ROUTERS: tuple[APIRouter, ...] = (
    chat.router,
    openai.router,
    characters.router,
    feedback.router,
    history.router,
    ops.router,
)
