"""Collect a character's messages: the chat service's history API (contract §1) or a JSON Lines file."""

from __future__ import annotations

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


class HistoryError(RuntimeError):
    """The history could not be collected; the message says why and what to check."""


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class HistoryClient:
    """Pages through ``GET /v1/history`` with a bearer token.

    5xx answers, timeouts and connection errors are retried with exponential backoff using the same cursor
    (the contract says this is safe); 401, 404 and 422 are not retried: they will not fix themselves.
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
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.page_limit = page_limit
        self._sleep = sleep

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _get_page(self, client: httpx.Client, params: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}/v1/history"
        for attempt in range(self.retries + 1):
            problem: str
            try:
                response = client.get(url, params=params, headers=self._headers())
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    try:
                        page = response.json()
                    except ValueError as exc:
                        raise HistoryError(f"history API at {url} returned a body that is not JSON") from exc
                    if not isinstance(page, dict) or not isinstance(page.get("messages"), list):
                        raise HistoryError(f"history API at {url} returned no 'messages' list")
                    return page
                if response.status_code == 401:
                    raise HistoryError(
                        f"history API at {url} refused the token (401): check the HISTORY_TOKEN secret"
                        + ("" if self.token else " (HISTORY_TOKEN is not set)")
                    )
                if response.status_code == 404:
                    raise HistoryError(
                        f"history API at {url} does not know character {params['character']!r} (404)"
                    )
                if response.status_code < 500:
                    raise HistoryError(
                        f"history API at {url} rejected the request ({response.status_code}): {response.text[:300]}"
                    )
                problem = f"HTTP {response.status_code}"
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
        seen_cursors: set[str] = set()
        with httpx.Client(timeout=self.timeout) as client:
            while True:
                page = self._get_page(client, params)
                messages.extend(page["messages"])
                cursor = page.get("next_cursor")
                if not cursor:
                    break
                if cursor in seen_cursors:
                    # A server bug would otherwise make us loop forever.
                    raise HistoryError(f"history API returned cursor {cursor!r} twice; stopping")
                seen_cursors.add(cursor)
                params["cursor"] = cursor
                log.info("history: %d messages so far", len(messages))
        return messages


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
