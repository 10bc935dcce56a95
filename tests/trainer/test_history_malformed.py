"""The trainer fed broken history pages (bad JSON, wrong types, ids out of order or repeated, invalid UTF-8, a 50 MB
message, a page that never ends, pages that never run out) by a real HTTP server: every one ends as a clear
`HistoryError` — and, through the command line, as a `failed` result naming the problem — never as a hang, a crash
or training on what the contract does not allow."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
from training.history import MAX_PAGE_BYTES, HistoryClient, HistoryError

# What the server sends for one request: (status, body chunks); chunks may be an endless generator.
Answer = tuple[int, Iterator[bytes]]
Script = Callable[[dict[str, str]], Answer]


def message(id_: int, **fields: Any) -> dict[str, Any]:
    base = {"id": id_, "session_id": f"s{id_ // 2}", "character": "lumina", "role": "user" if id_ % 2 else "assistant",
            "content": f"text {id_}", "created_at": "2026-11-20T10:00:00.000000Z", "feedback": None}
    return {**base, **fields}


def page(messages: list[Any], cursor: Any = None) -> Answer:
    return 200, iter([json.dumps({"messages": messages, "next_cursor": cursor}).encode()])


class RawServer:
    """A real HTTP/1.1 server whose answers to GET /v1/history come from `script` (query → answer), sent as chunked
    transfer encoding so that a body may be as long, as slow or as endless as the test wants."""

    def __init__(self, script: Script) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlparse(self.path)
                if url.path != "/v1/history":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                status, chunks = script({k: v[0] for k, v in parse_qs(url.query).items()})
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for chunk in chunks:
                        if outer.stopping.is_set():
                            return
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on the page: what the test wants

        self.stopping = threading.Event()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> RawServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def by_cursor(*answers: Answer) -> Script:
    """Page N for cursor "cN" (the first page has no cursor)."""
    return lambda query: answers[int(query.get("cursor", "c0")[1:])]


def endless(prefix: bytes, filler: bytes, pause: float = 0.0) -> Iterator[bytes]:
    yield prefix
    while True:
        if pause:
            time.sleep(pause)
        yield filler


def fetch(script: Script, **client: Any) -> list[dict[str, Any]]:
    with RawServer(script) as server:
        return HistoryClient(server.url, "t", sleep=lambda _: None, **client).fetch("lumina", None, None)


MALFORMED: dict[str, tuple[Script, str]] = {
    "not JSON": (lambda q: (200, iter([b'{"messages": [{"id": 1,'])), "not JSON"),
    "not an object": (lambda q: (200, iter([b"[1, 2]"])), "no 'messages' list"),
    "messages not a list": (lambda q: (200, iter([b'{"messages": {"id": 1}, "next_cursor": null}'])),
                            "no 'messages' list"),
    "message not an object": (lambda q: page(["hello"]), "message #0 is not an object"),
    "id a string": (lambda q: page([message(1, id="1")]), "'id' should be int, got '1'"),
    "id a boolean": (lambda q: page([message(1, id=True)]), "'id' should be int, got True"),
    "content a number": (lambda q: page([message(1, content=42)]), "'content' should be str, got 42"),
    "created_at missing": (lambda q: page([{k: v for k, v in message(1).items() if k != "created_at"}]),
                           "'created_at' should be str, got None"),
    "unknown role": (lambda q: page([message(1, role="system")]), "role 'system'"),
    "unknown feedback": (lambda q: page([message(2, feedback="meh")]), "feedback 'meh'"),
    "cursor a number": (lambda q: page([message(1)], cursor=7), "next_cursor that is not a string"),
    "ids out of order": (lambda q: page([message(2), message(1)]), "id 1 after id 2"),
    "duplicate id on the next page": (by_cursor(page([message(1), message(2)], "c1"), page([message(2), message(3)])),
                                      "history page 2, message #0: id 2 after id 2"),
    "invalid UTF-8": (lambda q: (200, iter([b'{"messages": [{"content": "\xff\xfe"}], "next_cursor": null}'])),
                      "not UTF-8 (byte 27)"),
    "a 50 MB message": (lambda q: page([message(1, content="x" * 50 * 1024 * 1024)]),
                        f"page over {MAX_PAGE_BYTES} bytes"),
    "a page that never ends": (lambda q: (200, endless(b'{"messages": [', b" " * 65536)),
                               f"page over {MAX_PAGE_BYTES} bytes"),
    "pages that never run out": (lambda q: page([], cursor=f"c{int(q.get('cursor', 'c0')[1:]) + 1}"),
                                 "empty page with a next_cursor"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_page_is_a_clear_error(case: str) -> None:
    script, expected = MALFORMED[case]
    started = time.monotonic()
    with pytest.raises(HistoryError) as caught:
        fetch(script)
    assert expected in str(caught.value)
    assert len(str(caught.value)) < 600  # the reason fits a result, whatever the server sent
    assert time.monotonic() - started < 60


def test_a_page_that_trickles_forever_is_cut_at_the_page_deadline() -> None:
    script: Script = lambda q: (200, endless(b'{"messages": [', b" ", pause=0.05))  # noqa: E731
    started = time.monotonic()
    with pytest.raises(HistoryError, match=r"took over 1s to send one page"):
        fetch(script, page_seconds=1.0)
    assert time.monotonic() - started < 10


def test_more_messages_than_the_cap_stop_the_collection() -> None:
    def script(query: dict[str, str]) -> Answer:
        n = int(query.get("cursor", "c0")[1:])
        return page([message(2 * n + 1), message(2 * n + 2)], cursor=f"c{n + 1}")

    with pytest.raises(HistoryError, match=r"more than 10 messages"):
        fetch(script, max_messages=10)


def test_well_formed_pages_still_arrive_whole() -> None:
    """The checks refuse only what the contract forbids: non-ASCII text, null feedback, several pages are fine."""
    pages = (page([message(1, content="こんにちは"), message(2, feedback="up")], "c1"), page([message(5)]))
    assert [m["id"] for m in fetch(by_cursor(*pages))] == [1, 2, 5]


@pytest.mark.parametrize("case", ["invalid UTF-8", "ids out of order", "a page that never ends"])
def test_the_trainer_reports_failed_with_the_reason(case: str, tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    script, expected = MALFORMED[case]
    result_file = tmp_path / "result.json"
    with RawServer(script) as server:
        done = subprocess.run(
            [sys.executable, "-m", "training.lora_tuning", "--character", "lumina", "--history-url", server.url,
             "--output-root", str(tmp_path / "adapters"), "--result-file", str(result_file)],
            env={**subprocess_env, "HISTORY_TOKEN": "t"}, capture_output=True, text=True, timeout=300)
    result = json.loads(result_file.read_text(encoding="utf-8"))
    assert done.returncode != 0
    assert result["outcome"] == "failed" and expected in result["reason"], result
    assert "HistoryError" in result["reason"]
    assert not (tmp_path / "adapters" / "lora_lumina").exists()  # nothing published
