"""What the OpenAPI document declares beyond the request and response models, so that it tells the truth about every
answer (tests/reliability/test_chat_api_fuzz.py holds the service to it): the error answers several routes share, and
a 405's `Allow` header that lists every documented method of the path."""

from __future__ import annotations

import re
from typing import Any

from fastapi import Request
from fastapi.exception_handlers import http_exception_handler
from starlette.exceptions import HTTPException
from starlette.responses import Response

Responses = dict[int | str, dict[str, Any]]

# Every route that reads a JSON body (the body limit is BodyLimitMiddleware's).
BODY_ERRORS: Responses = {
    400: {"description": "the body cannot be read: not UTF-8, or an invalid Content-Length"},
    413: {"description": "the body is over CHAT_MAX_BODY_BYTES (CHAT_MAX_IMPORT_BYTES for /v1/history)"},
}
UNKNOWN_CHARACTER: Responses = {404: {"description": "unknown character; the answer lists the known ones"}}
MODEL_NOT_READY: Responses = {503: {"description": "the model is still loading, or failed to load (Retry-After)"}}


def rules(*statements: str) -> Responses:
    """A 422 that also states the rules JSON Schema cannot express (across fields, or about stored data)."""
    listed = "; ".join(statements)
    return {422: {"description": f"Validation Error: a field breaks its schema, or one of these rules: {listed}. "
                                 "`detail[].loc` names the field."}}


HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def documented_methods(document: dict[str, Any], path: str) -> list[str]:
    """The methods the OpenAPI document lists for the path template `path` matches."""
    for template, operations in document.get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)), path):
            return sorted(method.upper() for method in operations if method in HTTP_METHODS)
    return []


async def method_not_allowed(request: Request, exc: HTTPException) -> Response:
    """FastAPI's HTTP error answer; a 405 names in `Allow` every documented method of the path (Starlette names
    only those of the first route matching it: GET for /v1/history, which has POST too)."""
    if exc.status_code == 405 and (methods := documented_methods(request.app.openapi(), request.url.path)):
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(methods)}
    return await http_exception_handler(request, exc)
