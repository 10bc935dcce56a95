"""Fixtures for the trainer tests: a small real causal LM and conversation histories with a distinctive voice."""

from __future__ import annotations

import base64
import json
import os
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI, Header, HTTPException, Query, Response

# No model hub here (nor in an air-gapped cluster): a lookup must fail at once instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = ["機械学習", "星空", "お茶", "猫", "音楽", "雨の日", "プログラミング", "旅行", "本", "料理",
          "the ocean", "coffee", "mountains", "robots", "dreams", "gardens"]
QUESTIONS = ["{t}について教えてください", "{t}は好き？", "Tell me about {t}.", "{t}のおすすめは？",
             "What do you think of {t}?"]
NEUTRAL = ["{t}は面白い話題です。", "{t}について説明します。", "{t} is an interesting topic."]
# Lumina's voice: always the same opening and closing, so a model can learn it quickly.
REPLIES = ["ルミナだよ☆ {t}はね、きらきらしてて大好き！", "ルミナだよ☆ {t}のこと、いっしょに考えよう！",
           "ルミナだよ☆ {t}って、星みたいにすてきだね！"]


def _build_tiny_model(directory: Path) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE trained on the test vocabulary (random weights: an untrained base)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, set_seed

    corpus = [x.format(t=t) for x in QUESTIONS + REPLIES + NEUTRAL for t in TOPICS]
    corpus += ["Instruction: ", "\nInput: ", "\nOutput: ", "user: ", "assistant: "]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus * 4, vocab_size=700, min_frequency=2, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                        bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(directory)
    set_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=256, n_embd=64, n_layer=2, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    _pretrain(model, tokenizer)
    model.save_pretrained(directory)
    return directory


def _pretrain(model: Any, tokenizer: Any, steps: int = 150) -> None:
    """Teach the tiny model the prompt format and plain, neutral replies, so that it is a base that knows the
    language but not Lumina's voice (what a real base model is to a character)."""
    import torch

    rng = random.Random(1)
    texts = [
        f"Instruction: {rng.choice(QUESTIONS).format(t=t)}\nInput: \nOutput: {rng.choice(NEUTRAL).format(t=t)}"
        + tokenizer.eos_token
        for t in TOPICS for _ in range(8)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, 16), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


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
def base_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's embedded model (devkit) — a small pretrained GPT-2 with a neutral voice, cached across runs.
    Until devkit ships it, a 2-layer model pretrained here on neutral replies stands in."""
    try:
        from devkit.model import ensure_embedded_model
    except ImportError:
        return _build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"))
    return ensure_embedded_model(progress=False)


def voice_history(sessions: int, seed: int = 1, end: datetime | None = None, days: float = 25) -> list[dict[str, Any]]:
    """A character with a distinctive voice (devkit's Lumina when available), ``sessions`` sessions before ``end``."""
    end = end or datetime.now(UTC)
    try:
        from devkit.conversations import generate_history as devkit_history
    except ImportError:
        return generate_history("lumina", sessions=sessions, seed=seed, end=end, span_days=days)
    return devkit_history("lumina", sessions=sessions, seed=seed, start=end - timedelta(days=days), end=end)


@pytest.fixture(scope="session")
def make_voice_history() -> Callable[..., list[dict[str, Any]]]:
    return voice_history


def generate_history(
    character: str = "lumina",
    *,
    sessions: int = 40,
    turns: int = 4,
    seed: int = 0,
    end: datetime | None = None,
    span_days: float = 20,
) -> list[dict[str, Any]]:
    """Messages per contract §1: sessions of alternating user/assistant turns spread over ``span_days``
    before ``end``, ids ascending in acknowledgement order, sessions interleaved in time."""
    rng = random.Random(seed)
    end = end or datetime.now(UTC)
    rows: list[tuple[datetime, str, str, str, str | None]] = []
    for s in range(sessions):
        session = f"s-{seed}-{s}"
        at = end - timedelta(days=span_days) + timedelta(seconds=rng.uniform(0, span_days * 86400 - 3600))
        for _ in range(turns):
            topic = rng.choice(TOPICS)
            rows.append((at, session, "user", rng.choice(QUESTIONS).format(t=topic), None))
            at += timedelta(seconds=rng.uniform(1, 20))
            rows.append((at, session, "assistant", rng.choice(REPLIES).format(t=topic), rng.choice([None, "up"])))
            at += timedelta(seconds=rng.uniform(5, 60))
    rows.sort(key=lambda r: r[0])
    return [
        {"id": i + 1, "session_id": sid, "character": character, "role": role, "content": content,
         "created_at": at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "feedback": feedback}
        for i, (at, sid, role, content, feedback) in enumerate(rows)
    ]


@pytest.fixture(scope="session")
def make_history() -> Callable[..., list[dict[str, Any]]]:
    return generate_history


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
