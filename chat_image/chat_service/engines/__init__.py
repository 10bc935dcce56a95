"""Who generates the replies: this process (`ModelManager`, transformers + PEFT, the default) or an OpenAI-compatible
engine such as vLLM (`UpstreamEngine`), chosen with CHAT_ENGINE. Both render the prompt here (`prompting.py`), so
what the engine sees is the token sequence the adapter was trained on; everything else (characters, sessions,
history, feedback) stays in the service.
"""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import JSONResponse

from ..characters import Character
from ..config import Settings
from ..generation import ModelManager


class EngineUnavailable(Exception):
    """The upstream engine did not answer, or refused; the request may be retried (HTTP 503)."""


def create_engine(settings: Settings, characters: dict[str, Character]) -> ModelManager:
    if settings.engine == "openai":
        from .upstream import UpstreamEngine

        return UpstreamEngine(settings, characters)
    return ModelManager(settings, characters)


def generation_gate(settings: Settings) -> asyncio.Lock | asyncio.Semaphore:
    """The in-process model generates one reply at a time; an engine batches many, up to CHAT_ENGINE_CONCURRENCY."""
    if settings.engine == "openai":
        return asyncio.Semaphore(settings.engine_concurrency)
    return asyncio.Lock()


async def engine_unavailable(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"generation engine unavailable: {exc}"}, status_code=503,
                        headers={"Retry-After": "5"})
