"""The HTTP API over a real socket (uvicorn in a thread), with the small model and a SQLite file."""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from chat_service.config import Settings, env_var
from chat_service.routes.openai import StrippedText
from chat_service.store import encode_cursor
from devkit.paths import DEPLOY, DOCS


@pytest.fixture
def base_url(make_settings: Callable[..., Settings], kit) -> Iterator[str]:
    settings = make_settings(max_body_bytes=4096, max_import_bytes=256 * 1024, max_message_chars=200)
    with kit.serve(settings) as base:
        yield base


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


def chat(client: httpx.Client, message: str, session_id: str | None = None, character: str = "lumina") -> dict:
    body = {"character": character, "message": message, "max_tokens": 4, "temperature": 0}
    if session_id is not None:
        body["session_id"] = session_id
    response = client.post("/v1/chat", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def history(client: httpx.Client, kit, **params: object) -> httpx.Response:
    return client.get("/v1/history", params=params, headers=kit.auth)


def test_chat_round_trip_and_sessions(client: httpx.Client, kit) -> None:
    first = chat(client, "こんにちは")
    assert first["session_id"].startswith("s-")
    assert first["character"] == "lumina"
    assert first["adapter_version"] == "base"
    assert first["message_id"] == first["user_message_id"] + 1
    assert isinstance(first["reply"], str)
    second = chat(client, "元気？", session_id=first["session_id"])
    assert second["session_id"] == first["session_id"]
    other = chat(client, "hello", session_id="my-session.1")
    assert other["session_id"] == "my-session.1"

    messages = history(client, kit, character="lumina").json()["messages"]
    assert [(m["role"], m["session_id"]) for m in messages] == [
        ("user", first["session_id"]),
        ("assistant", first["session_id"]),
        ("user", first["session_id"]),
        ("assistant", first["session_id"]),
        ("user", "my-session.1"),
        ("assistant", "my-session.1"),
    ]
    assert messages[2]["content"] == "元気？"
    assert messages[3]["content"] == second["reply"]
    assert messages[3]["id"] == second["message_id"]
    assert set(messages[0]) == {"id", "session_id", "character", "role", "content", "created_at", "feedback"}
    assert messages[0]["created_at"].endswith("Z") and len(messages[0]["created_at"]) == 27


def test_session_turns_reach_the_prompt(make_settings: Callable[..., Settings], kit) -> None:
    """With CHAT_CONTEXT_MESSAGES=2 the session's earlier turns are in the prompt; other sessions' are not."""
    with kit.serve(make_settings(context_messages=2)) as base, httpx.Client(base_url=base, timeout=60) as client:
        fresh = client.post("/v1/chat", json={"character": "sora", "message": "again", "max_tokens": 2}).json()
        chat(client, "a first message", session_id="ctx", character="sora")
        second = client.post(
            "/v1/chat", json={"character": "sora", "message": "again", "max_tokens": 2, "session_id": "ctx"}
        ).json()
        other = client.post(
            "/v1/chat", json={"character": "sora", "message": "again", "max_tokens": 2, "session_id": "other"}
        ).json()
    assert second["prompt_tokens"] > fresh["prompt_tokens"]
    assert other["prompt_tokens"] == fresh["prompt_tokens"]


def test_unknown_character_is_404_with_the_known_ones(client: httpx.Client) -> None:
    response = client.post("/v1/chat", json={"character": "nobody", "message": "hi"})
    assert response.status_code == 404
    assert response.json()["detail"] == {
        "message": "unknown character 'nobody'",
        "known_characters": ["lumina", "sora"],
    }


def test_feedback(client: httpx.Client, kit) -> None:
    turn = chat(client, "hi")
    response = client.post("/v1/feedback", json={"message_id": turn["message_id"], "feedback": "up"})
    assert response.status_code == 200
    assert response.json() == {
        "message_id": turn["message_id"],
        "feedback": "up",
        "character": "lumina",
        "session_id": turn["session_id"],
    }
    messages = history(client, kit, character="lumina").json()["messages"]
    assert [m["feedback"] for m in messages] == [None, "up"]

    on_user = client.post("/v1/feedback", json={"message_id": turn["user_message_id"], "feedback": "down"})
    assert on_user.status_code == 422
    assert on_user.json()["detail"][0]["loc"] == ["body", "message_id"]
    assert client.post("/v1/feedback", json={"message_id": 999, "feedback": "up"}).status_code == 404
    bad_value = client.post("/v1/feedback", json={"message_id": turn["message_id"], "feedback": "meh"})
    assert bad_value.status_code == 422
    assert bad_value.json()["detail"][0]["loc"] == ["body", "feedback"]


def test_history_token_checks(client: httpx.Client, kit) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic dXNlcjpwYXNz"}):
        response = client.get("/v1/history", params={"character": "lumina"}, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["www-authenticate"] == "Bearer"
    # The token is checked before anything else: no information about characters without it.
    assert client.get("/v1/history", params={"character": "nobody"}).status_code == 401
    assert history(client, kit, character="nobody").status_code == 404
    assert history(client, kit, character="lumina").status_code == 200


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 1001}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"since": "2026-11-20T10:00:00"}, "since"),  # no offset: not RFC 3339
        ({"until": "yesterday"}, "until"),
        ({"since": "2026-11-20T10:00:00Z", "until": "2026-11-20T10:00:00Z"}, "until"),
        ({}, "character"),
    ],
)
def test_history_bad_parameters_are_422_naming_the_field(client: httpx.Client, kit, params: dict, field: str) -> None:
    query = {"character": "lumina", **params} if field != "character" else params
    response = history(client, kit, **query)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", field]


def test_history_paging_with_concurrent_writers_over_http(client: httpx.Client, base_url: str, kit) -> None:
    """Writers chat through the API while the reader pages with a small limit; every message arrives exactly once."""
    stop = threading.Event()
    errors: list[str] = []

    def writer(n: int) -> None:
        with httpx.Client(base_url=base_url, timeout=60) as own:
            for i in range(6):
                response = own.post(
                    "/v1/chat",
                    json={"character": "lumina", "message": f"w{n}-{i}", "max_tokens": 1, "session_id": f"w{n}"},
                )
                if response.status_code != 200:
                    errors.append(response.text)

    seen: list[int] = []
    cursor = None
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    watcher = threading.Thread(target=lambda: ([t.join() for t in threads], stop.set()))
    watcher.start()
    while True:
        done = stop.is_set()
        params = {"character": "lumina", "limit": 3} | ({"cursor": cursor} if cursor else {})
        page = history(client, kit, **params).json()
        seen += [m["id"] for m in page["messages"]]
        if page["next_cursor"] is not None:
            cursor = page["next_cursor"]
        else:
            if page["messages"]:
                # Last page: resume after its last message, the way a trainer's next run would with a later window.
                cursor = encode_cursor(page["messages"][-1]["id"])
            if done:
                break
    watcher.join()
    assert not errors
    assert len(seen) == 4 * 6 * 2
    assert len(set(seen)) == len(seen)
    everything = [m["id"] for m in history(client, kit, character="lumina", limit=1000).json()["messages"]]
    assert seen == everything


def test_history_import(client: httpx.Client, kit) -> None:
    body = {
        "messages": [
            {"session_id": "old", "character": "lumina", "role": "user", "content": "むかし",
             "created_at": "2026-10-01T00:00:00+09:00"},
            {"session_id": "old", "character": "lumina", "role": "assistant", "content": "はい",
             "created_at": "2026-09-30T15:00:01Z", "feedback": "up"},
        ]
    }  # fmt: skip
    assert client.post("/v1/history", json=body).status_code == 401
    response = client.post("/v1/history", json=body, headers=kit.auth)
    assert response.status_code == 201, response.text
    ids = response.json()["ids"]
    assert len(ids) == 2 and ids[1] > ids[0]
    page = history(client, kit, character="lumina", until="2026-09-30T15:00:01Z").json()
    assert page["messages"] == [
        {"id": ids[0], "session_id": "old", "character": "lumina", "role": "user", "content": "むかし",
         "created_at": "2026-09-30T15:00:00.000000Z", "feedback": None}
    ]  # fmt: skip
    bad = {"messages": [body["messages"][0] | {"character": "nobody", "feedback": "up"}]}
    response = client.post("/v1/history", json=bad, headers=kit.auth)
    assert response.status_code == 422
    assert [e["loc"] for e in response.json()["detail"]] == [
        ["body", "messages", 0, "character"],
        ["body", "messages", 0, "feedback"],
    ]
    assert len(history(client, kit, character="lumina").json()["messages"]) == 2  # nothing half-imported

    # Import has its own body limit (CHAT_MAX_IMPORT_BYTES), larger than the chat limit of this server (4096).
    many = {"messages": [body["messages"][0] | {"content": "x" * 100}] * 60}
    response = client.post("/v1/history", json=many, headers=kit.auth)
    assert response.status_code == 201, response.text
    assert len(response.json()["ids"]) == 60
    too_many = {"messages": many["messages"] * 17}
    response = client.post("/v1/history", json=too_many, headers=kit.auth)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "messages"]
    oversize = {"messages": [body["messages"][0] | {"content": "x" * 300}] * 1000}
    assert client.post("/v1/history", json=oversize, headers=kit.auth).status_code == 413


def test_bad_bodies_are_422_naming_the_field(client: httpx.Client) -> None:
    missing = client.post("/v1/chat", json={"character": "lumina"})
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["loc"] == ["body", "message"]
    broken = client.post(
        "/v1/chat", content=b'{"character": "lumina", "message": ', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422
    assert broken.json()["detail"][0]["type"] == "json_invalid"
    too_long = client.post("/v1/chat", json={"character": "lumina", "message": "x" * 201})
    assert too_long.status_code == 422
    assert too_long.json()["detail"][0]["loc"] == ["body", "message"]
    assert client.post("/v1/chat", json={"character": "lumina", "message": "hi", "max_tokens": 0}).status_code == 422
    bad_session = client.post("/v1/chat", json={"character": "lumina", "message": "hi", "session_id": "a b"})
    assert bad_session.status_code == 422
    assert bad_session.json()["detail"][0]["loc"] == ["body", "session_id"]
    extra = client.post("/v1/chat", json={"character": "lumina", "message": "hi", "sesion_id": "typo"})
    assert extra.status_code == 422
    assert extra.json()["detail"][0]["loc"] == ["body", "sesion_id"]


def _raw_request(base_url: str, head: bytes, body_chunks: list[bytes]) -> bytes:
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in body_chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading everything: that is the point
        data = b""
        while b"\r\n\r\n" not in data:
            more = sock.recv(65536)
            if not more:
                break
            data += more
        return data


def test_oversize_bodies_are_413(client: httpx.Client, base_url: str) -> None:
    big = json.dumps({"character": "lumina", "message": "x" * 5000}).encode()
    declared = client.post("/v1/chat", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413
    assert declared.json()["limit_bytes"] == 4096

    # Chunked, no Content-Length: counted as it arrives.
    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    chunked = client.post("/v1/chat", content=chunks(), headers={"content-type": "application/json"})
    assert chunked.status_code == 413

    # Raw chunked encoding on a socket, to be sure no client library added a length.
    pieces = [
        f"{len(big[i : i + 1000]):x}\r\n".encode() + big[i : i + 1000] + b"\r\n" for i in range(0, len(big), 1000)
    ]
    head = b"POST /v1/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    raw = _raw_request(base_url, head, [*pieces, b"0\r\n\r\n"])
    assert raw.startswith(b"HTTP/1.1 413"), raw[:200]

    # A body under the limit still works after all that.
    assert client.post("/v1/chat", json={"character": "lumina", "message": "ok", "max_tokens": 1}).status_code == 200


def test_characters_models_health_docs_and_metrics(client: httpx.Client) -> None:
    characters = client.get("/v1/characters").json()["characters"]
    assert [c["name"] for c in characters] == ["lumina", "sora"]
    assert characters[0]["adapter_version"] == "base"
    assert characters[0]["adapter"]["state"] == "absent"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["lumina", "sora"]
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["store"]["reachable"] and ready["model"]["loaded"]
    assert ready["characters"]["sora"]["serving"] == "base"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ["/v1/chat", "/v1/chat/completions", "/v1/characters", "/v1/history", "/v1/feedback", "/healthz",
                 "/readyz", "/metrics"]:  # fmt: skip
        assert path in paths

    chat(client, "hi")
    client.post("/v1/chat", json={"character": "nobody", "message": "hi"})
    text = client.get("/metrics").text
    assert 'chat_http_requests_total{method="POST",route="/v1/chat",status="200"} 1.0' in text
    assert 'chat_http_requests_total{method="POST",route="/v1/chat",status="404"} 1.0' in text
    assert 'chat_http_request_duration_seconds_count{method="POST",route="/v1/chat"} 2.0' in text
    assert 'chat_errors_total{kind="client",route="/v1/chat"} 1.0' in text
    assert 'chat_tokens_generated_total{adapter_version="base",character="lumina"}' in text
    assert 'chat_adapter_info{character="lumina",version="base"} 1.0' in text
    assert 'chat_adapter_state{character="lumina",reason="",state="absent"} 1.0' in text


def test_openai_completions(client: httpx.Client) -> None:
    request = {
        "model": "lumina",
        "messages": [
            {"role": "system", "content": "ignored"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": [{"type": "text", "text": "how are you?"}]},
        ],
        "max_tokens": 4,
        "temperature": 0,
        "presence_penalty": 0.5,  # unknown to us, accepted like OpenAI clients expect
    }
    response = client.post("/v1/chat/completions", json=request, headers={"X-Session-Id": "oai-1"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["model"] == "lumina"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 4
    assert body["adapter_version"] == "base" and body["session_id"] == "oai-1"
    assert response.headers["x-session-id"] == "oai-1"

    with client.stream("POST", "/v1/chat/completions", json=request | {"stream": True}) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length")
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    # Same greedy generation, streamed or not, and the stored reply is what was streamed.
    assert streamed == body["choices"][0]["message"]["content"]
    assert final["message_id"] > body["message_id"]

    last_not_user = client.post("/v1/chat/completions", json=request | {"messages": request["messages"][:3]})
    assert last_not_user.status_code == 422
    assert last_not_user.json()["detail"][0]["loc"] == ["body", "messages", 2, "role"]
    assert client.post("/v1/chat/completions", json=request | {"model": "nobody"}).status_code == 404
    assert client.post("/v1/chat/completions", json=request | {"n": 2}).status_code == 422


def test_streamed_text_adds_up_to_the_stored_reply() -> None:
    """The stored reply is stripped; the SSE stream drops leading and holds back trailing whitespace to match it."""
    pieces = ["  ", "\n Hello", " ", "world ", " \n", "!", "  "]
    text = StrippedText()
    sent = [text.feed(piece) for piece in pieces]
    assert "".join(sent) == "".join(pieces).strip() == "Hello world  \n!"
    assert sent[:4] == ["", "Hello", "", " world"]  # nothing before the text; a space only once more text follows


def test_concurrent_chats_match_serial_ones(make_settings: Callable[..., Settings], kit, tmp_path: Path) -> None:
    """Generation is serialized under one lock, so concurrent greedy requests answer exactly as serial ones do."""
    with kit.serve(make_settings()) as base, httpx.Client(base_url=base, timeout=60) as client:
        prompts = [("lumina", f"q{i}") for i in range(4)] + [("sora", f"q{i}") for i in range(4)]
        serial = {p: chat(client, p[1], character=p[0])["reply"] for p in prompts}
        results: dict[tuple[str, str], str] = {}

        def ask(p: tuple[str, str]) -> None:
            with httpx.Client(base_url=base, timeout=60) as own:
                results[p] = chat(own, p[1], character=p[0])["reply"]

        threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == serial


def test_health_and_history_answer_while_many_chats_queue(
    make_settings: Callable[..., Settings], kit, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queued generations wait on the event loop, not in threadpool threads (40), so with more queued chats than
    pool threads the probes and the history API still get a thread and answer at once."""
    import asyncio

    from chat_service.generation import ModelManager

    # The model answers 4 tokens in milliseconds, so chats would drain before the probes; a gate holds the first
    # generation until the probes are done, which keeps the other 49 queued whatever the machine's speed.
    release = threading.Event()
    real_generate = ModelManager.generate

    def generate(self: ModelManager, *args: Any, **kwargs: Any) -> Any:
        release.wait(timeout=120)
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(ModelManager, "generate", generate)

    def threads_in_generate() -> int:
        """Threads now inside ModelManager.generate (the gated wrapper or the real one)."""
        count = 0
        for frame in sys._current_frames().values():
            while frame is not None:
                code = frame.f_code
                if code.co_name == "generate" and code.co_filename.endswith(("generation.py", __file__)):
                    count += 1
                    break
                frame = frame.f_back
        return count

    async def run(base: str) -> tuple[float, float, int, int, list[int]]:
        async with httpx.AsyncClient(base_url=base, timeout=300) as client:
            body = {"character": "sora", "message": "hi", "max_tokens": 4, "temperature": 0}
            chats = [asyncio.create_task(client.post("/v1/chat", json=body)) for _ in range(50)]
            await asyncio.sleep(1.0)  # let them all arrive and queue
            threads = threads_in_generate()
            started = time.perf_counter()
            assert (await client.get("/readyz")).status_code == 200
            probe = time.perf_counter() - started
            started = time.perf_counter()
            assert (await client.get("/v1/history", params={"character": "sora"}, headers=kit.auth)).status_code == 200
            history_seconds = time.perf_counter() - started
            pending = sum(not task.done() for task in chats)
            release.set()
            statuses = [(await task).status_code for task in chats]
            return probe, history_seconds, threads, pending, statuses

    with kit.serve(make_settings()) as base:
        # The server runs in this process, so its threads' stacks can be inspected.
        probe, history_seconds, threads, pending, statuses = asyncio.run(run(base))
    assert pending == 50, "every chat should still be queued behind the gated first generation"
    assert threads == 1, f"{threads} threads inside generate: queued chats are holding threadpool threads"
    assert probe < 2.0 and history_seconds < 2.0, (probe, history_seconds)
    assert statuses == [200] * 50


def test_every_documented_variable_is_a_setting() -> None:
    """Variable names are in users' manifests: the docs' table, the settings and deploy/chat must agree."""
    rows = re.findall(r"^\| `([A-Z][A-Z_]+)` \|", (DOCS / "chat-service.md").read_text(encoding="utf-8"), re.MULTILINE)
    assert sorted(rows) == sorted(env_var(name) for name in Settings.model_fields)
    deployment = yaml.safe_load((DEPLOY / "chat" / "deployment.yaml").read_text(encoding="utf-8"))
    env = {e["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
    assert env - {"HF_HUB_OFFLINE"} <= set(rows)  # HF_HUB_OFFLINE is read by transformers
    values = {"DATABASE_URL": "sqlite:///x.db", "CHAT_MAX_PROMPT_TOKENS": "64", "HISTORY_TOKEN": "t"}
    settings = Settings.from_env(values)
    assert (settings.database_url, settings.max_prompt_tokens, settings.history_token) == ("sqlite:///x.db", 64, "t")
