"""Feedback: `POST /v1/feedback` (thumbs up/down on a reply) and `GET /v1/characters/{name}/feedback` (the thumbs
added up per adapter version, from the store's feedback index)."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from starlette.concurrency import run_in_threadpool

from ..apidoc import BODY_ERRORS, rules
from ..deps import Service, ServiceDep, adapter_status, find_character
from ..generation import BASE_VERSION
from ..schemas import CharacterFeedback, FeedbackRequest, FeedbackResponse, VersionFeedbackInfo
from ..store import FeedbackTargetError, StoredMessage, VersionFeedback
from ..validation import invalid

router = APIRouter(tags=["chat"])

OTHER_VERSION = "other"


def version_label(service: Service, reply: StoredMessage) -> str:
    """The metric's version label: the rated reply's version when this replica serves it (or it is base), else
    'other', so that votes on old or imported replies cannot grow the label set."""
    serving = adapter_status(service, reply.character)
    known = {BASE_VERSION, serving.serving_version} if serving is not None else {BASE_VERSION}
    return reply.adapter_version if reply.adapter_version in known else OTHER_VERSION


@router.post(
    "/v1/feedback",
    response_model=FeedbackResponse,
    summary="Thumbs up/down on a reply",
    responses={**BODY_ERRORS, 404: {"description": "no message with this id"}, **rules("the message is a reply")},
)
async def feedback(body: FeedbackRequest, service: ServiceDep) -> FeedbackResponse:
    try:
        message = await run_in_threadpool(service.store.set_feedback, body.message_id, body.feedback)
    except FeedbackTargetError as exc:
        if "does not exist" in str(exc):
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from exc
        raise invalid(("body", "message_id"), str(exc), body.message_id) from exc
    service.metrics.feedback_votes.labels(message.character, version_label(service, message), body.feedback).inc()
    return FeedbackResponse(
        message_id=message.id, feedback=body.feedback, character=message.character, session_id=message.session_id
    )


def version_info(counts: VersionFeedback) -> VersionFeedbackInfo:
    # The store lists only versions with at least one vote, so `rated` is never 0.
    rate = counts.down / counts.rated
    return VersionFeedbackInfo(
        version=counts.version, up=counts.up, down=counts.down, rated=counts.rated, down_rate=rate
    )


@router.get(
    "/v1/characters/{name}/feedback",
    response_model=CharacterFeedback,
    summary="Thumbs up/down per adapter version of a character's replies",
    responses={404: {"description": "unknown character"}},
)
async def character_feedback(name: str, service: ServiceDep) -> CharacterFeedback:
    character = find_character(service, name)
    counts = await run_in_threadpool(service.store.feedback_by_version, character.name)
    serving = adapter_status(service, character.name)
    return CharacterFeedback(
        character=character.name,
        serving_version=serving.serving_version if serving is not None else None,
        versions=[version_info(c) for c in counts],
    )
