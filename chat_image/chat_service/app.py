"""The FastAPI application: `create_app(settings)` builds a complete service (used by __main__, tests, benchmarks)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime
from starlette.concurrency import run_in_threadpool

from . import __version__
from .characters import Character, load_characters
from .config import Settings
from .generation import GenerationResult, ModelManager, Turn
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .schemas import (
    SESSION_PATTERN,
    AdapterInfo,
    CharacterInfo,
    CharacterList,
    ChatRequest,
    ChatResponse,
    CompletionRequest,
    FeedbackRequest,
    FeedbackResponse,
    HistoryPage,
    ImportRequest,
    ImportResponse,
)
from .store import FeedbackTargetError, InvalidCursor, NewMessage, Store, StoredMessage, decode_cursor, encode_cursor

log = logging.getLogger(__name__)


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
    generation_gate: asyncio.Lock = field(default_factory=asyncio.Lock)

    def character(self, name: str) -> Character:
        character = self.characters.get(name)
        if character is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                detail={"message": f"unknown character {name!r}", "known_characters": sorted(self.characters)},
            )
        return character

    def require_model(self) -> ModelManager:
        if not self.models.loaded:
            detail = f"model failed to load: {self.models.load_error}" if self.models.load_error else "model is loading"
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, detail=detail, headers={"Retry-After": "5"})
        return self.models

    def check_message(self, text: str, loc: tuple[str | int, ...]) -> None:
        limit = self.settings.max_message_chars
        if len(text) > limit:
            raise RequestValidationError(
                [
                    {
                        "type": "string_too_long",
                        "loc": loc,
                        "msg": f"String should have at most {limit} characters",
                        "input": text[:100] + "…",
                        "ctx": {"max_length": limit},
                    }
                ]
            )

    def context_for(self, character: Character, turns: list[Turn]) -> list[Turn]:
        """Earlier turns for the prompt's input, plus the persona when the character serves the base model.

        The number of turns is what the serving adapter was trained with (manifest `data.context_turns`), else
        CHAT_CONTEXT_MESSAGES (default 0, the trainer's default: empty input). Empty messages are skipped, as the
        trainer does. An adapter learned its character from history, which has no persona line, so the persona is
        added only for the base model, which knows nothing about the character otherwise.
        """
        count = self.models.context_turns(character.name)
        turns = [t for t in turns if t.content.strip()][-count:] if count else []
        if self.models.adapter_for(character.name).state != "loaded" and character.persona:
            return [Turn("system", character.persona), *turns]
        return turns

    def record(
        self, character: Character, session_id: str, user_text: str, result: GenerationResult
    ) -> tuple[StoredMessage, StoredMessage]:
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


bearer = HTTPBearer(auto_error=False, description="the HISTORY_TOKEN secret")


def require_history_token(
    service: ServiceDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers=challenge)
    expected = service.history_token
    # compare_digest: the time taken must not reveal how much of the token matched.
    if expected is None or not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid bearer token", headers=challenge)


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def create_app(settings: Settings | None = None, *, load_model: bool = True) -> FastAPI:
    """Build the service. The store schema is created on startup; the model loads in a background thread so that
    /healthz answers at once and /readyz turns ready when loading is done (`load_model=False` skips loading: tests
    of the store-only endpoints)."""
    settings = settings or Settings.from_env()
    characters = load_characters(settings.characters_file)
    history_token = settings.resolved_history_token()
    metrics = Metrics()
    models = ModelManager(settings, characters)

    def load_models(service: Service) -> None:
        try:
            models.load()
        except Exception as exc:
            models.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("base model %s failed to load", settings.base_model)
            return
        metrics.model_loaded.set(1)
        metrics.set_adapters(models.adapters)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings.database_url)
        await run_in_threadpool(store.create_schema)
        service = Service(settings, characters, store, models, metrics, history_token)
        app.state.service = service
        if history_token is None:
            log.warning("no HISTORY_TOKEN/HISTORY_TOKEN_FILE: GET /v1/history refuses every request")
        if load_model:
            threading.Thread(target=load_models, args=(service,), name="load-model", daemon=True).start()
        try:
            yield
        finally:
            store.close()

    app = FastAPI(
        title="LlmMultiChat chat service",
        version=__version__,
        description="Character chat with durable history, feedback and per-character LoRA adapters.",
        lifespan=lifespan,
    )
    # History import carries up to 1000 messages per request, so it gets its own (larger) limit.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        per_path={"/v1/history": settings.max_import_bytes},
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics, skip=lambda path: path == "/metrics")

    # ------------------------------------------------------------------ chat

    @app.post("/v1/chat", response_model=ChatResponse, tags=["chat"], summary="Send a message, get the reply")
    async def chat(body: ChatRequest, service: ServiceDep) -> ChatResponse:
        character = service.character(body.character)
        service.check_message(body.message, ("body", "message"))
        models = service.require_model()
        session_id = body.session_id or f"s-{uuid.uuid4().hex}"
        # Twice the turns needed: empty messages are skipped when the context is built.
        wanted = 2 * models.context_turns(character.name)
        earlier = await run_in_threadpool(service.store.recent_messages, character.name, session_id, wanted)
        defaults = character.generation
        async with service.generation_gate:
            result = await run_in_threadpool(
                models.generate,
                character.name,
                body.message,
                service.context_for(character, [Turn(m.role, m.content) for m in earlier]),
                max_tokens=min(body.max_tokens or defaults.max_tokens, service.settings.max_tokens_limit),
                temperature=defaults.temperature if body.temperature is None else body.temperature,
                top_p=defaults.top_p,
            )
        user, reply = await run_in_threadpool(service.record, character, session_id, body.message, result)
        return ChatResponse(
            reply=reply.content,
            message_id=reply.id,
            user_message_id=user.id,
            session_id=session_id,
            character=character.name,
            adapter_version=result.adapter_version,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )

    @app.post(
        "/v1/chat/completions",
        tags=["openai"],
        summary="OpenAI-compatible chat completion (model = character)",
        responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"}},
    )
    async def chat_completions(
        body: CompletionRequest,
        service: ServiceDep,
        x_session_id: Annotated[str | None, Header(pattern=SESSION_PATTERN)] = None,
    ) -> Any:
        character = service.character(body.model)
        last = body.messages[-1]
        if last.role != "user":
            raise RequestValidationError(
                [
                    {
                        "type": "value_error",
                        "loc": ("body", "messages", len(body.messages) - 1, "role"),
                        "msg": "the last message must be the user's",
                        "input": last.role,
                    }
                ]
            )
        instruction = last.text()
        service.check_message(instruction, ("body", "messages", len(body.messages) - 1, "content"))
        if body.user is not None and x_session_id is None and not re.fullmatch(SESSION_PATTERN, body.user):
            raise RequestValidationError(
                [
                    {
                        "type": "string_pattern_mismatch",
                        "loc": ("body", "user"),
                        "msg": f"String should match pattern '{SESSION_PATTERN}'",
                        "input": body.user,
                    }
                ]
            )
        models = service.require_model()
        session_id = x_session_id or body.user or f"oai-{uuid.uuid4().hex}"
        # The conversation so far comes with the request (OpenAI semantics), not from the store.
        turns = [Turn(m.role, m.text()) for m in body.messages[:-1] if m.role in ("user", "assistant")]
        defaults = character.generation
        requested = body.max_completion_tokens or body.max_tokens or defaults.max_tokens
        params: dict[str, Any] = {
            "max_tokens": min(requested, service.settings.max_tokens_limit),
            "temperature": defaults.temperature if body.temperature is None else body.temperature,
            "top_p": body.top_p or defaults.top_p,
        }
        context = service.context_for(character, turns)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        headers = {"X-Session-Id": session_id}

        if not body.stream:
            async with service.generation_gate:
                result = await run_in_threadpool(models.generate, character.name, instruction, context, **params)
            _, reply = await run_in_threadpool(service.record, character, session_id, instruction, result)
            return JSONResponse(
                {
                    "id": completion_id,
                    "object": "chat.completion",
                    "created": created,
                    "model": character.name,
                    "system_fingerprint": result.adapter_version,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": reply.content},
                            "finish_reason": result.finish_reason,
                        }
                    ],
                    "usage": {
                        "prompt_tokens": result.prompt_tokens,
                        "completion_tokens": result.completion_tokens,
                        "total_tokens": result.prompt_tokens + result.completion_tokens,
                    },
                    # Extensions (OpenAI clients ignore unknown fields):
                    "adapter_version": result.adapter_version,
                    "message_id": reply.id,
                    "session_id": session_id,
                },
                headers=headers,
            )

        adapter_version = models.adapter_for(character.name).serving_version

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
            payload = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": character.name,
                "system_fingerprint": adapter_version,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
                **extra,
            }
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def events() -> AsyncIterator[str]:
            finished = False
            handle = None
            # Held for the whole stream; released in `finally` also when the client leaves while waiting.
            await service.generation_gate.acquire()
            try:
                yield chunk({"role": "assistant", "content": ""})
                handle = models.stream(character.name, instruction, context, **params)
                # The stored reply is stripped, so the stream drops leading whitespace and holds back trailing
                # whitespace until more text follows: the streamed text is exactly the stored reply.
                started = False
                pending = ""
                done = object()
                while True:
                    piece = await run_in_threadpool(next, handle.pieces, done)
                    if piece is done:
                        break
                    text = pending + piece
                    if not started:
                        text = text.lstrip()
                        started = bool(text)
                    visible = text.rstrip()
                    pending = text[len(visible) :]
                    if visible:
                        yield chunk({"content": visible})
                try:
                    result = await run_in_threadpool(handle.finish)
                    _, reply = await run_in_threadpool(service.record, character, session_id, instruction, result)
                except Exception as exc:
                    service.metrics.errors.labels(route="/v1/chat/completions", kind="generation").inc()
                    log.exception("streamed completion failed")
                    error = {"error": {"message": f"generation failed: {type(exc).__name__}", "type": "server_error"}}
                    yield f"data: {json.dumps(error)}\n\n"
                    return
                yield chunk(
                    {},
                    result.finish_reason,
                    usage={
                        "prompt_tokens": result.prompt_tokens,
                        "completion_tokens": result.completion_tokens,
                        "total_tokens": result.prompt_tokens + result.completion_tokens,
                    },
                    adapter_version=result.adapter_version,
                    message_id=reply.id,
                    session_id=session_id,
                )
                yield "data: [DONE]\n\n"
                finished = True
            finally:
                if handle is not None and not finished:
                    # Client went away (or we failed): stop generating; nothing unfinished is stored.
                    handle.cancel.set()
                # No await here: in a cancelled scope it would raise again and the gate would never be released.
                # The next generation may start before this thread has noticed the cancel; the model lock inside
                # ModelManager.generate still keeps them apart.
                service.generation_gate.release()

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )

    @app.get("/v1/models", tags=["openai"], summary="OpenAI-compatible model list (one model per character)")
    def list_models(service: ServiceDep) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "llmmultichat"} for name in service.characters
            ],
        }

    @app.get("/v1/characters", response_model=CharacterList, tags=["chat"], summary="Characters and their adapters")
    def list_characters(service: ServiceDep) -> CharacterList:
        return CharacterList(characters=[character_info(service, c) for c in service.characters.values()])

    # ------------------------------------------------------------------ history and feedback

    @app.get(
        "/v1/history",
        response_model=HistoryPage,
        tags=["history"],
        summary="A character's messages in id order, paged (for the trainer)",
        dependencies=[Depends(require_history_token)],
        responses={401: {"description": "missing or wrong bearer token"}, 404: {"description": "unknown character"}},
    )
    def history(
        service: ServiceDep,
        character: Annotated[str, Query(description="character name")],
        since: Annotated[AwareDatetime | None, Query(description="RFC 3339; window start (inclusive)")] = None,
        until: Annotated[AwareDatetime | None, Query(description="RFC 3339; window end (exclusive)")] = None,
        limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 500,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    ) -> Response:
        service.character(character)
        if since is not None and until is not None and since >= until:
            raise RequestValidationError(
                [
                    {
                        "type": "value_error",
                        "loc": ("query", "until"),
                        "msg": "until must be after since",
                        "input": until.isoformat(),
                    }
                ]
            )
        try:
            after_id = decode_cursor(cursor) if cursor is not None else 0
        except InvalidCursor as exc:
            raise RequestValidationError(
                [{"type": "value_error", "loc": ("query", "cursor"), "msg": str(exc), "input": cursor}]
            ) from exc
        page, next_after = service.store.history_page(
            character, since=since, until=until, after_id=after_id, limit=limit
        )
        # Built by hand: up to 1000 rows per page, and validating them again through the response model costs
        # more than the database query. The shape is the HistoryPage schema shown in the docs.
        body = {
            "messages": [
                {
                    "id": m.id,
                    "session_id": m.session_id,
                    "character": m.character,
                    "role": m.role,
                    "content": m.content,
                    "created_at": rfc3339(m.created_at),
                    "feedback": m.feedback,
                }
                for m in page
            ],
            "next_cursor": encode_cursor(next_after) if next_after is not None else None,
        }
        return Response(json.dumps(body, ensure_ascii=False), media_type="application/json")

    @app.post(
        "/v1/history",
        response_model=ImportResponse,
        status_code=status.HTTP_201_CREATED,
        tags=["history"],
        summary="Import recorded conversations (all or nothing)",
        dependencies=[Depends(require_history_token)],
        responses={401: {"description": "missing or wrong bearer token"}},
    )
    def import_history(body: ImportRequest, service: ServiceDep) -> ImportResponse:
        errors: list[dict[str, Any]] = []
        for index, message in enumerate(body.messages):
            if message.character not in service.characters:
                errors.append(
                    {
                        "type": "value_error",
                        "loc": ("body", "messages", index, "character"),
                        "msg": f"unknown character; known: {', '.join(sorted(service.characters))}",
                        "input": message.character,
                    }
                )
            if message.feedback is not None and message.role != "assistant":
                errors.append(
                    {
                        "type": "value_error",
                        "loc": ("body", "messages", index, "feedback"),
                        "msg": "only assistant messages carry feedback",
                        "input": message.feedback,
                    }
                )
        if errors:
            raise RequestValidationError(errors)
        stored = service.store.add_messages(
            [
                NewMessage(m.character, m.session_id, m.role, m.content, created_at=m.created_at, feedback=m.feedback)
                for m in body.messages
            ]
        )
        return ImportResponse(ids=[m.id for m in stored])

    @app.post("/v1/feedback", response_model=FeedbackResponse, tags=["chat"], summary="Thumbs up/down on a reply")
    def feedback(body: FeedbackRequest, service: ServiceDep) -> FeedbackResponse:
        try:
            message = service.store.set_feedback(body.message_id, body.feedback)
        except FeedbackTargetError as exc:
            if "does not exist" in str(exc):
                raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
            raise RequestValidationError(
                [{"type": "value_error", "loc": ("body", "message_id"), "msg": str(exc), "input": body.message_id}]
            ) from exc
        return FeedbackResponse(
            message_id=message.id, feedback=body.feedback, character=message.character, session_id=message.session_id
        )

    # ------------------------------------------------------------------ operations

    @app.get("/healthz", tags=["operations"], summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"], summary="Readiness: model loaded and store reachable; per character")
    async def readyz(service: ServiceDep) -> JSONResponse:
        store_ok, store_error = True, None
        try:
            await run_in_threadpool(service.store.ping)
        except Exception as exc:
            store_ok, store_error = False, f"{type(exc).__name__}: {exc}"
        models = service.models
        ready = store_ok and models.loaded
        body: dict[str, Any] = {
            "ready": ready,
            "model": {
                "loaded": models.loaded,
                "base_model": service.settings.base_model,
                "device": models.device if models.loaded else None,
                "error": models.load_error,
            },
            "store": {"reachable": store_ok, "dialect": service.store.dialect, "error": store_error},
            "characters": {},
        }
        for name, character in service.characters.items():
            info = character_info(service, character)
            body["characters"][name] = {"serving": info.adapter_version, **info.adapter.model_dump()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics")
    async def prometheus_metrics(service: ServiceDep) -> Response:
        return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def character_info(service: Service, character: Character) -> CharacterInfo:
    models = service.models
    if not models.loaded:
        adapter = AdapterInfo(state="loading", version=None)
        serving = None
    else:
        status_ = models.adapter_for(character.name)
        adapter = AdapterInfo(
            state=status_.state,
            version=status_.version,
            reason=status_.reason,
            error=status_.error,
            warnings=status_.warnings,
        )
        serving = status_.serving_version
    return CharacterInfo(
        name=character.name,
        display_name=character.display_name,
        persona=character.persona,
        generation=character.generation.model_dump(),
        adapter_version=serving,
        adapter=adapter,
    )
