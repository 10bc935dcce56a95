"""FastAPI dependencies: the service's shared objects, the history API's bearer token check, and who serves a
character in one request (its adapter status is looked up once here and passed along)."""

from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .characters import Character
from .config import Settings
from .generation import AdapterStatus, GenerationResult, ModelManager
from .metrics import Metrics
from .prompting import PromptRules, prompt_rules
from .store import NewMessage, Store, StoredMessage


@dataclass
class Service:
    """Everything a request handler needs; one per app, stored on `app.state.service`."""

    settings: Settings
    characters: dict[str, Character]
    store: Store
    models: ModelManager
    metrics: Metrics
    history_token: str | None
    # Generations run one at a time (one model). Requests wait for their turn here, on the event loop, instead of
    # each blocking a threadpool thread on the model lock: with 40+ queued chats the pool would otherwise be full,
    # and /readyz or history requests (which need a thread) would stall behind them.
    # An upstream engine batches: there the gate is a semaphore of CHAT_ENGINE_CONCURRENCY (engines.generation_gate).
    generation_gate: asyncio.Lock | asyncio.Semaphore = field(default_factory=asyncio.Lock)

    def record(
        self, character: Character, session_id: str, user_text: str, result: GenerationResult
    ) -> tuple[StoredMessage, StoredMessage]:
        """Store the user's message and the reply in one transaction; count the reply's tokens and time."""
        user, reply = self.store.add_messages(
            [
                NewMessage(character.name, session_id, "user", user_text),
                NewMessage(character.name, session_id, "assistant", result.text, result.adapter_version),
            ]
        )
        self.metrics.tokens_generated.labels(character.name, result.adapter_version).inc(result.completion_tokens)
        self.metrics.generation_seconds.labels(character.name).observe(result.seconds)
        return user, reply


def get_service(request: Request) -> Service:
    return request.app.state.service


# Module level on purpose: with postponed annotations FastAPI resolves handler annotations from module globals.
ServiceDep = Annotated[Service, Depends(get_service)]


def get_store(service: ServiceDep) -> Store:
    return service.store


StoreDep = Annotated[Store, Depends(get_store)]


bearer = HTTPBearer(auto_error=False, description="the HISTORY_TOKEN secret")


def check_bearer(credentials: HTTPAuthorizationCredentials | None, expected: str | None) -> None:
    """401 unless the request's bearer token is `expected` (None: no token configured, so every request is refused)."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers=challenge)
    # compare_digest: the time taken must not reveal how much of the token matched.
    if expected is None or not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid bearer token", headers=challenge)


def require_history_token(
    service: ServiceDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    check_bearer(credentials, service.history_token)


def find_character(service: Service, name: str) -> Character:
    """The named character, else 404 listing the known ones."""
    character = service.characters.get(name)
    if character is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            detail={"message": f"unknown character {name!r}", "known_characters": sorted(service.characters)},
        )
    return character


@dataclass(frozen=True)
class Serving:
    """Who answers one request: the character, the adapter status it serves (looked up once, when the request
    starts generating) and the prompt rules that follow from it."""

    character: Character
    adapter: AdapterStatus
    rules: PromptRules
    models: ModelManager


def serving_for(service: Service, character: Character) -> Serving:
    """503 (Retry-After) until the model is loaded; then the request's one adapter status lookup."""
    models = service.models
    if not models.loaded:
        detail = f"model failed to load: {models.load_error}" if models.load_error else "model is loading"
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=detail, headers={"Retry-After": "5"})
    adapter = models.adapter_for(character.name)
    return Serving(character, adapter, prompt_rules(service.settings, character, adapter, models.chat_template), models)


def adapter_status(service: Service, name: str) -> AdapterStatus | None:
    """What a character serves now, for the status endpoints; None while the model is loading."""
    return service.models.adapter_for(name) if service.models.loaded else None
