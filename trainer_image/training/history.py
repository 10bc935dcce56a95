"""Collect a character's messages: the chat service's history API (contract §1) or a JSON Lines file."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from .data import DataError, parse_time

log = logging.getLogger(__name__)

PAGE_LIMIT = 500
# A page of 500 messages is a few hundred KB (chat messages are at most CHAT_MAX_MESSAGE_CHARS, replies a few hundred
# tokens); these bound what a broken or hostile server can make the trainer hold.
MAX_PAGE_BYTES = 32 * 1024 * 1024
PAGE_SECONDS = 300.0
MAX_MESSAGES = 5_000_000


class HistoryError(RuntimeError):
    """The history could not be collected; the message says why and what to check."""


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class HistoryClient:
    """Pages through ``GET /v1/history`` with a bearer token.

    5xx answers, timeouts and connection errors are retried with exponential backoff using the same cursor
    (the contract says this is safe); 401, 404 and 422 are not retried: they will not fix themselves, nor will a
    page that breaks the contract. Every page is checked against contract §1 before it is used — JSON in UTF-8,
    at most ``max_page_bytes`` read within ``page_seconds``, each message with the contract's fields and types,
    ids strictly ascending across pages — and a page that is not is a ``HistoryError`` that says what is wrong.
    """

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        page_limit: int = PAGE_LIMIT,
        max_page_bytes: int = MAX_PAGE_BYTES,
        page_seconds: float = PAGE_SECONDS,
        max_messages: int = MAX_MESSAGES,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.page_limit = page_limit
        self.max_page_bytes = max_page_bytes
        self.page_seconds = page_seconds
        self.max_messages = max_messages
        self._sleep = sleep

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _read_body(self, response: httpx.Response, url: str) -> bytes:
        """The body, refused past ``max_page_bytes`` or ``page_seconds`` (a page that never ends)."""
        started, body = time.monotonic(), bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > self.max_page_bytes:
                raise HistoryError(f"history API at {url} sent a page over {self.max_page_bytes} bytes; stopping")
            if time.monotonic() - started > self.page_seconds:
                raise HistoryError(f"history API at {url} took over {self.page_seconds:.0f}s to send one page")
        return bytes(body)

    def _refusal(self, status: int, text: str, url: str, params: dict[str, Any]) -> HistoryError:
        if status == 401:
            return HistoryError(f"history API at {url} refused the token (401): check the HISTORY_TOKEN secret"
                                + ("" if self.token else " (HISTORY_TOKEN is not set)"))
        if status == 404:
            return HistoryError(f"history API at {url} does not know character {params['character']!r} (404)")
        return HistoryError(f"history API at {url} rejected the request ({status}): {text[:300]}")

    def _get_page(self, client: httpx.Client, params: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/v1/history"
        for attempt in range(self.retries + 1):
            try:
                with client.stream("GET", url, params=params, headers=self._headers()) as response:
                    status = response.status_code
                    body = self._read_body(response, url)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if status == 200:
                    return parse_page(body, url)
                if status < 500:
                    raise self._refusal(status, body.decode("utf-8", "replace"), url, params)
                problem = f"HTTP {status}"
            if attempt == self.retries:
                raise HistoryError(f"history API at {url} kept failing after {self.retries + 1} attempts: {problem}")
            delay = min(self.max_backoff, self.backoff * 2**attempt)
            log.warning("history API: %s; retry %d/%d in %.1fs", problem, attempt + 1, self.retries, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

    def fetch(self, character: str, since: datetime | None, until: datetime | None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"character": character, "limit": self.page_limit}
        if since is not None:
            params["since"] = rfc3339(since)
        if until is not None:
            params["until"] = rfc3339(until)
        messages: list[dict[str, Any]] = []
        with httpx.Client(timeout=self.timeout) as client:
            for number in itertools.count(1):
                page = self._get_page(client, params)
                check_messages(page["messages"], after_id=messages[-1]["id"] if messages else 0, page=number)
                messages.extend(page["messages"])
                cursor = page["next_cursor"]
                if cursor is None:
                    break
                if not page["messages"]:
                    # Ids only go up, so each page must bring one: otherwise the cursors could go on forever.
                    raise HistoryError("history API returned an empty page with a next_cursor; stopping")
                if len(messages) >= self.max_messages:
                    raise HistoryError(f"history API sent more than {self.max_messages} messages; stopping")
                params["cursor"] = cursor
                log.info("history: %d messages so far", len(messages))
        return messages


def parse_page(body: bytes, url: str) -> dict[str, Any]:
    """A page's JSON: an object with a ``messages`` list and a ``next_cursor`` (a string, or null at the end)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HistoryError(f"history API at {url} returned a body that is not UTF-8 (byte {exc.start})") from exc
    try:
        page = json.loads(text)
    except ValueError as exc:
        raise HistoryError(f"history API at {url} returned a body that is not JSON") from exc
    if not isinstance(page, dict) or not isinstance(page.get("messages"), list):
        raise HistoryError(f"history API at {url} returned no 'messages' list")
    cursor = page.get("next_cursor")
    if cursor is not None and (not isinstance(cursor, str) or not cursor):
        raise HistoryError(f"history API at {url} returned a next_cursor that is not a string: {cursor!r:.100}")
    return {"messages": page["messages"], "next_cursor": cursor}


# Contract §1: each message's fields and their JSON types (feedback may also be null).
MESSAGE_FIELDS: dict[str, type] = {"id": int, "session_id": str, "character": str, "role": str, "content": str,
                                   "created_at": str}


def check_messages(messages: list[Any], *, after_id: int, page: int) -> None:
    """Each message is an object with the contract's fields, and ids go strictly up from ``after_id``."""
    for index, message in enumerate(messages):
        where = f"history page {page}, message #{index}"
        if not isinstance(message, dict):
            raise HistoryError(f"{where} is not an object: {message!r:.100}")
        for name, kind in MESSAGE_FIELDS.items():
            value = message.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise HistoryError(f"{where}: {name!r} should be {kind.__name__}, got {value!r:.100}")
        if message["role"] not in ("user", "assistant") or message.get("feedback") not in (None, "up", "down"):
            raise HistoryError(f"{where} (id {message['id']}): role {message['role']!r:.30} / feedback "
                               f"{message.get('feedback')!r:.30} outside the contract")
        if message["id"] <= after_id:
            raise HistoryError(f"{where}: id {message['id']} after id {after_id}; ids must go up (a duplicate or "
                               "out-of-order message)")
        after_id = message["id"]


def fetch_persona(base_url: str, character: str, *, timeout: float = 30.0) -> str:
    """The character's persona from the chat service's ``GET /v1/characters`` (contract §1): the system turn the
    trainer renders chat-template prompts with. A service without that endpoint (404) or without the character in it
    gives no persona; any other failure is a ``HistoryError``."""
    url = f"{base_url.rstrip('/')}/v1/characters"
    try:
        response = httpx.get(url, timeout=timeout, headers={"Accept": "application/json"})
    except (httpx.TimeoutException, httpx.TransportError) as exc:
        raise HistoryError(f"characters API at {url}: {type(exc).__name__}: {exc}") from exc
    if response.status_code == 404:
        log.warning("%s answers 404; training without a persona", url)
        return ""
    if response.status_code != 200:
        raise HistoryError(f"characters API at {url} answered {response.status_code}: {response.text[:300]}")
    try:
        listed = {c["name"]: c.get("persona") or "" for c in response.json()["characters"]}
    except (ValueError, KeyError, TypeError) as exc:
        raise HistoryError(f"characters API at {url} returned no 'characters' list of objects with names") from exc
    if character not in listed:
        log.warning("%s does not list %r; training without a persona", url, character)
    return str(listed.get(character, ""))


def read_history_file(
    path: str | Path, character: str, since: datetime | None, until: datetime | None
) -> list[dict[str, Any]]:
    """Read the offline JSONL form: one message per line; other characters and rows outside the window are left out."""
    path = Path(path)
    if not path.is_file():
        raise HistoryError(f"history file {path} does not exist")
    messages: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HistoryError(f"{path}:{number}: not valid JSON: {exc.msg}") from exc
            if not isinstance(row, dict):
                raise HistoryError(f"{path}:{number}: expected a JSON object per line")
            if row.get("character", character) != character:
                continue
            stamp = row.get("created_at", row.get("timestamp"))
            try:
                created = parse_time(stamp)
            except DataError as exc:
                raise HistoryError(f"{path}:{number}: {exc}") from exc
            if (since is not None and created < since) or (until is not None and created >= until):
                continue
            messages.append(row)
    return messages
