"""Pure ASGI middleware (no BaseHTTPMiddleware, so streaming responses pass through untouched)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def _send_json(send: Send, status: int, body: dict[str, object], headers: list[tuple[bytes, bytes]]) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` (or the path's own limit in `per_path`) with 413 before the app
    sees them.

    The declared Content-Length is checked first; then the body is read and counted as it arrives, so a client that
    sends chunked data (no length) or more than it declared is stopped at the limit too. Bodies under the limit are
    buffered (they are small by definition) and replayed to the app unchanged.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, per_path: dict[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = per_path or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope["path"], self.max_bytes)
        too_large = {"detail": f"request body is larger than the limit of {limit} bytes", "limit_bytes": limit}
        # The connection cannot be reused with an unread body left on it.
        close = [(b"connection", b"close")]
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, {"detail": "invalid Content-Length header"}, close)
                    return
                if declared > limit:
                    await _send_json(send, 413, too_large, close)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_json(send, 413, too_large, close)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            # After the body, the app only ever waits for the disconnect (e.g. a streaming response).
            return await receive()

        await self.app(scope, replay, send)


class MetricsMiddleware:
    """Count requests, time them to the last byte, and count errors, labelled by route template (bounded set)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, skip: Callable[[str], bool] = lambda path: False) -> None:
        self.app = app
        self.metrics = metrics
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.skip(scope["path"]):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            # Unmatched paths share one label so that scanners cannot blow up the metric's cardinality.
            label = getattr(route, "path", None) or "unmatched"
            method = scope["method"]
            self.metrics.requests.labels(route=label, method=method, status=str(status)).inc()
            self.metrics.latency.labels(route=label, method=method).observe(time.perf_counter() - started)
            if status >= 400:
                self.metrics.errors.labels(route=label, kind="client" if status < 500 else "server").inc()
