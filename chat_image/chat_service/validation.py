"""422 answers for checks that the request models cannot express, in FastAPI's own `RequestValidationError` shape, so
that clients see one error format whichever check failed."""

from __future__ import annotations

from typing import Any

from fastapi.exceptions import RequestValidationError

Loc = tuple[str | int, ...]


def field_error(
    loc: Loc, msg: str, value: Any, *, kind: str = "value_error", ctx: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One entry of a 422's `detail` list: `loc` names the field, e.g. ("body", "messages", 2, "role")."""
    error: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": value}
    if ctx is not None:
        error["ctx"] = ctx
    return error


def invalid(
    loc: Loc, msg: str, value: Any, *, kind: str = "value_error", ctx: dict[str, Any] | None = None
) -> RequestValidationError:
    """A 422 for one field (raise it)."""
    return RequestValidationError([field_error(loc, msg, value, kind=kind, ctx=ctx)])


def check_message_length(text: str, limit: int, loc: Loc) -> None:
    """A user message over CHAT_MAX_MESSAGE_CHARS is refused, never cut silently."""
    if len(text) > limit:
        raise invalid(
            loc,
            f"String should have at most {limit} characters",
            text[:100] + "…",
            kind="string_too_long",
            ctx={"max_length": limit},
        )
