"""The trainer's history API (bearer token): `GET /v1/history` pages a character's messages in id order,
`POST /v1/history` imports recorded conversations, all or nothing."""

from __future__ import annotations

import json
from collections.abc import Collection
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import AwareDatetime

from ..apidoc import BODY_ERRORS, UNKNOWN_CHARACTER, rules
from ..deps import ServiceDep, StoreDep, find_character, require_history_token
from ..schemas import HistoryPage, ImportMessage, ImportRequest, ImportResponse
from ..store import InvalidCursor, NewMessage, StoredMessage, decode_cursor, encode_cursor
from ..validation import field_error, invalid

router = APIRouter(tags=["history"], dependencies=[Depends(require_history_token)])

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {401: {"description": "missing or wrong bearer token"}}


def rfc3339(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def history_message(m: StoredMessage) -> dict[str, Any]:
    """One message as the HistoryPage schema shows it."""
    return {
        "id": m.id,
        "session_id": m.session_id,
        "character": m.character,
        "role": m.role,
        "content": m.content,
        "created_at": rfc3339(m.created_at),
        "feedback": m.feedback,
    }


@router.get(
    "/v1/history",
    response_model=HistoryPage,
    summary="A character's messages in id order, paged (for the trainer)",
    responses={
        **UNAUTHORIZED,
        **UNKNOWN_CHARACTER,
        **rules("`until` after `since`", "a `cursor` this service returned"),
    },
)
def history(
    service: ServiceDep,
    store: StoreDep,
    character: Annotated[str, Query(description="character name")],
    since: Annotated[AwareDatetime | None, Query(description="RFC 3339; window start (inclusive)")] = None,
    until: Annotated[AwareDatetime | None, Query(description="RFC 3339; window end (exclusive)")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="page size")] = 500,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> Response:
    find_character(service, character)
    if since is not None and until is not None and since >= until:
        raise invalid(("query", "until"), "until must be after since", until.isoformat())
    try:
        after_id = decode_cursor(cursor) if cursor is not None else 0
    except InvalidCursor as exc:
        raise invalid(("query", "cursor"), str(exc), cursor) from exc
    page, next_after = store.history_page(character, since=since, until=until, after_id=after_id, limit=limit)
    # Built by hand: up to 1000 rows per page, and validating them again through the response model costs
    # more than the database query. The shape is the HistoryPage schema shown in the docs.
    body = {
        "messages": [history_message(m) for m in page],
        "next_cursor": encode_cursor(next_after) if next_after is not None else None,
    }
    return Response(json.dumps(body, ensure_ascii=False), media_type="application/json")


def import_errors(messages: list[ImportMessage], known: Collection[str]) -> list[dict[str, Any]]:
    """Every reason to refuse the import, each naming its message."""
    errors: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if message.character not in known:
            msg = f"unknown character; known: {', '.join(sorted(known))}"
            errors.append(field_error(("body", "messages", index, "character"), msg, message.character))
        if message.feedback is not None and message.role != "assistant":
            msg = "only assistant messages carry feedback"
            errors.append(field_error(("body", "messages", index, "feedback"), msg, message.feedback))
    return errors


@router.post(
    "/v1/history",
    response_model=ImportResponse,
    status_code=status.HTTP_201_CREATED,
    summary="Import recorded conversations (all or nothing)",
    responses={
        **UNAUTHORIZED,
        **BODY_ERRORS,
        **rules("each message's character is a known one", "only assistant messages carry feedback"),
    },
)
def import_history(body: ImportRequest, service: ServiceDep, store: StoreDep) -> ImportResponse:
    errors = import_errors(body.messages, service.characters)
    if errors:
        raise RequestValidationError(errors)
    stored = store.add_messages(
        [
            NewMessage(m.character, m.session_id, m.role, m.content, created_at=m.created_at, feedback=m.feedback)
            for m in body.messages
        ]
    )
    return ImportResponse(ids=[m.id for m in stored])
