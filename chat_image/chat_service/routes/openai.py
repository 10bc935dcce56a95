"""OpenAI-compatible `POST /v1/chat/completions` (JSON, or SSE with `stream: true`) and `GET /v1/models`: the model
is the character; the conversation so far comes with the request (OpenAI semantics), not from the store."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..apidoc import BODY_ERRORS, MODEL_NOT_READY, UNKNOWN_CHARACTER, rules
from ..deps import Service, ServiceDep, Serving, find_character, serving_for
from ..generation import GenerationResult
from ..prompting import Prompt, Turn, build_prompt
from ..schemas import SESSION_PATTERN, CompletionRequest
from ..store import StoredMessage
from ..validation import check_message_length, invalid

log = logging.getLogger(__name__)

router = APIRouter(tags=["openai"])


@dataclass(frozen=True)
class Completion:
    """What every answer to one completion request carries."""

    id: str
    created: int
    model: str
    session_id: str

    def chunk(self, fingerprint: str, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        """One SSE event of the stream."""
        payload = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            **extra,
        }
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class StrippedText:
    """The stored reply is stripped, so the stream drops leading whitespace and holds back trailing whitespace until
    more text follows: the streamed text adds up to exactly the stored reply."""

    def __init__(self) -> None:
        self.started = False
        self.pending = ""

    def feed(self, piece: str) -> str:
        """The part of `piece` (after what was held back) that can be sent now; may be empty."""
        text = self.pending + piece
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        visible = text.rstrip()
        self.pending = text[len(visible) :]
        return visible


def usage(result: GenerationResult) -> dict[str, int]:
    total = result.prompt_tokens + result.completion_tokens
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens, "total_tokens": total}


def user_instruction(body: CompletionRequest, max_chars: int) -> str:
    """The last message, which must be the user's: the instruction the reply answers."""
    last = body.messages[-1]
    index = len(body.messages) - 1
    if last.role != "user":
        raise invalid(("body", "messages", index, "role"), "the last message must be the user's", last.role)
    instruction = last.text()
    check_message_length(instruction, max_chars, ("body", "messages", index, "content"))
    return instruction


def completion_answer(completion: Completion, result: GenerationResult, reply: StoredMessage) -> dict[str, Any]:
    """The JSON answer (no stream)."""
    return {
        "id": completion.id,
        "object": "chat.completion",
        "created": completion.created,
        "model": completion.model,
        "system_fingerprint": result.adapter_version,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content},
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result),
        # Extensions (OpenAI clients ignore unknown fields):
        "adapter_version": result.adapter_version,
        "message_id": reply.id,
        "session_id": completion.session_id,
    }


@router.post(
    "/v1/chat/completions",
    summary="OpenAI-compatible chat completion (model = character)",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream=true"},
        **BODY_ERRORS,
        **UNKNOWN_CHARACTER,
        **rules("the last message is the user's", "`user` matches the session id pattern when no X-Session-Id"),
        **MODEL_NOT_READY,
    },
)
async def chat_completions(
    body: CompletionRequest,
    service: ServiceDep,
    x_session_id: Annotated[str | None, Header(pattern=SESSION_PATTERN)] = None,
) -> Any:
    character = find_character(service, body.model)
    instruction = user_instruction(body, service.settings.max_message_chars)
    if body.user is not None and x_session_id is None and not re.fullmatch(SESSION_PATTERN, body.user):
        raise invalid(
            ("body", "user"),
            f"String should match pattern '{SESSION_PATTERN}'",
            body.user,
            kind="string_pattern_mismatch",
        )
    serving = serving_for(service, character)
    session_id = x_session_id or body.user or f"oai-{uuid.uuid4().hex}"
    turns = [Turn(m.role, m.text()) for m in body.messages[:-1] if m.role in ("user", "assistant")]
    prompt = build_prompt(serving.rules, instruction, turns)
    params = character.generation.for_request(
        body.max_completion_tokens or body.max_tokens, body.temperature, body.top_p
    )
    completion = Completion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), character.name, session_id)
    headers = {"X-Session-Id": session_id}
    if body.stream:
        events = completion_events(service, serving, prompt, params, completion)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )
    async with service.generation_gate:
        result = await run_in_threadpool(serving.models.generate, serving.adapter, prompt, **params)
    _, reply = await run_in_threadpool(service.record, character, session_id, instruction, result)
    return JSONResponse(completion_answer(completion, result, reply), headers=headers)


async def completion_events(
    service: Service, serving: Serving, prompt: Prompt, params: dict[str, Any], completion: Completion
) -> AsyncIterator[str]:
    """The SSE stream: a role chunk, the text as it is generated, a final chunk with usage and ids, `[DONE]`."""
    fingerprint = serving.adapter.serving_version
    finished = False
    handle = None
    # Held for the whole stream; released in `finally` also when the client leaves while waiting.
    await service.generation_gate.acquire()
    try:
        yield completion.chunk(fingerprint, {"role": "assistant", "content": ""})
        handle = serving.models.stream(serving.adapter, prompt, **params)
        text = StrippedText()
        done = object()
        while (piece := await run_in_threadpool(next, handle.pieces, done)) is not done:
            if visible := text.feed(piece):
                yield completion.chunk(fingerprint, {"content": visible})
        try:
            result = await run_in_threadpool(handle.finish)
            record = (serving.character, completion.session_id, prompt.instruction, result)
            _, reply = await run_in_threadpool(service.record, *record)
        except Exception as exc:
            service.metrics.errors.labels(route="/v1/chat/completions", kind="generation").inc()
            log.exception("streamed completion failed")
            error = {"error": {"message": f"generation failed: {type(exc).__name__}", "type": "server_error"}}
            yield f"data: {json.dumps(error)}\n\n"
            return
        ids = {"adapter_version": result.adapter_version, "message_id": reply.id, "session_id": completion.session_id}
        yield completion.chunk(fingerprint, {}, result.finish_reason, usage=usage(result), **ids)
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


@router.get("/v1/models", summary="OpenAI-compatible model list (one model per character)")
def list_models(service: ServiceDep) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "llmmultichat"} for name in service.characters
        ],
    }
