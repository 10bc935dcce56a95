"""Fixtures for the trainer tests: the embedded model, Lumina's conversations, a real history API server."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from devkit.conversations import generate_history
from devkit.model import ensure_embedded_model
from fastapi import FastAPI, Header, HTTPException, Query, Response

# No model hub here (nor in an air-gapped cluster): a lookup must fail at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> Any:
    """Tiny models run several times faster on one thread than on cores shared with other work
    (thread contention dominates); subprocesses get OMP_NUM_THREADS=1 from ``subprocess_env``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The project's embedded model: a small pretrained Llama with a neutral voice, built once and cached."""
    return ensure_embedded_model(progress=False)


def voice_history(sessions: int, seed: int = 1, end: datetime | None = None, days: float = 25) -> list[dict[str, Any]]:
    """Lumina's conversations (devkit: a distinctive voice, interleaved sessions, some thumbs-down replies),
    ``sessions`` sessions in ``[end - days, end)``, as the history API returns them."""
    end = end or datetime.now(UTC)
    return generate_history("lumina", sessions=sessions, seed=seed, start=end - timedelta(days=days), end=end)


@pytest.fixture(scope="session")
def make_voice_history() -> Callable[..., list[dict[str, Any]]]:
    return voice_history


def _cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"id": last_id}).encode()).decode()


class HistoryServer:
    """A real HTTP server speaking contract §1 (FastAPI + uvicorn on 127.0.0.1, a free port, in a thread).

    ``fail_next`` makes the next N requests answer 503 (a transient outage the client must ride out), only those
    with a cursor when ``fail_only_later_pages``;
    ``requests`` records each request's query parameters and the answer's status, for assertions."""

    def __init__(
        self, messages: list[dict[str, Any]], token: str = "s3cret", characters: tuple[str, ...] = ("lumina",)
    ) -> None:
        self.messages = sorted(messages, key=lambda m: m["id"])
        self.token = token
        self.fail_next = 0
        self.fail_only_later_pages = False
        self.requests: list[tuple[dict[str, str], int]] = []
        app = FastAPI()

        @app.get("/v1/history")
        def history(
            response: Response,
            character: str,
            since: str | None = None,
            until: str | None = None,
            limit: int = Query(500, ge=1, le=1000),
            cursor: str | None = None,
            authorization: str | None = Header(None),
        ) -> dict[str, Any]:
            params = {k: v for k, v in {"character": character, "since": since, "until": until, "limit": str(limit),
                                         "cursor": cursor}.items() if v is not None}
            if self.fail_next > 0 and (cursor or not self.fail_only_later_pages):
                self.fail_next -= 1
                self.requests.append((params, 503))
                raise HTTPException(503, "try again")
            if authorization != f"Bearer {self.token}":
                self.requests.append((params, 401))
                raise HTTPException(401, "bad token", headers={"WWW-Authenticate": "Bearer"})
            if character not in characters:
                self.requests.append((params, 404))
                raise HTTPException(404, f"unknown character {character}")
            after = json.loads(base64.urlsafe_b64decode(cursor))["id"] if cursor else 0
            lo = datetime.fromisoformat(since) if since else None
            hi = datetime.fromisoformat(until) if until else None
            page = []
            for m in self.messages:
                if m["id"] <= after or m["character"] != character:
                    continue
                at = datetime.fromisoformat(m["created_at"])
                if (lo and at < lo) or (hi and at >= hi):
                    continue
                page.append(m)
                if len(page) == limit:
                    break
            more = bool(page) and any(m["id"] > page[-1]["id"] for m in self.messages)
            next_cursor = _cursor(page[-1]["id"]) if more else None
            self.requests.append((params, 200))
            return {"messages": page, "next_cursor": next_cursor}

        self.app = app

    def __enter__(self) -> HistoryServer:
        import socket
        import threading
        import time

        import uvicorn

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("history test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture
def history_server() -> Callable[..., HistoryServer]:
    return HistoryServer


@pytest.fixture
def subprocess_env(base_model_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    for key in [k for k in env if k.startswith("TRAINER_") or k == "HISTORY_TOKEN"]:
        del env[key]
    return env
