"""`POST /v1/chat`: one message in, the reply out; the session's earlier turns come from the store."""

from __future__ import annotations

import uuid

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from ..apidoc import BODY_ERRORS, MODEL_NOT_READY, UNKNOWN_CHARACTER
from ..deps import ServiceDep, find_character, serving_for
from ..prompting import Turn, build_prompt
from ..schemas import ChatRequest, ChatResponse
from ..validation import check_message_length

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat",
    response_model=ChatResponse,
    summary="Send a message, get the reply",
    responses={**BODY_ERRORS, **UNKNOWN_CHARACTER, **MODEL_NOT_READY},
)
async def chat(body: ChatRequest, service: ServiceDep) -> ChatResponse:
    character = find_character(service, body.character)
    check_message_length(body.message, service.settings.max_message_chars, ("body", "message"))
    serving = serving_for(service, character)
    session_id = body.session_id or f"s-{uuid.uuid4().hex}"
    # Twice the turns needed: empty messages are skipped when the context is built.
    wanted = 2 * serving.rules.context_turns
    earlier = await run_in_threadpool(service.store.recent_messages, character.name, session_id, wanted)
    prompt = build_prompt(serving.rules, body.message, [Turn(m.role, m.content) for m in earlier])
    params = character.generation.for_request(body.max_tokens, body.temperature)
    async with service.generation_gate:
        result = await run_in_threadpool(serving.models.generate, serving.adapter, prompt, **params)
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
