"""The history client against a real HTTP server speaking contract §1, and the offline JSONL form."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from training.history import HistoryClient, HistoryError, read_history_file

NOW = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)


def no_sleep(_: float) -> None:
    """Backoff delays are asserted on, not waited for."""


def test_pages_through_everything_in_the_window_with_the_token(make_voice_history, history_server) -> None:
    messages = make_voice_history(sessions=30, end=NOW, days=40)
    # Another character's messages share the id sequence and must not leak in.
    messages += [dict(m, id=m["id"] + 100000, character="sol") for m in messages[:50]]
    since, until = NOW - timedelta(days=30), NOW
    expected = [m["id"] for m in messages if m["character"] == "lumina"
                and since <= datetime.fromisoformat(m["created_at"]) < until]
    with history_server(messages, characters=("lumina", "sol")) as server:
        got = HistoryClient(server.url, "s3cret", page_limit=25, sleep=no_sleep).fetch("lumina", since, until)
        statuses = [status for _, status in server.requests]
        first = server.requests[0][0]
    assert [m["id"] for m in got] == expected
    assert 0 < len(expected) < 240
    assert statuses == [200] * len(statuses) and len(statuses) >= -(-len(expected) // 25)
    assert first["since"] == "2026-10-27T03:00:00.000000Z" and first["until"] == "2026-11-26T03:00:00.000000Z"
    assert first["limit"] == "25"


def test_transient_503_is_retried_with_backoff_and_the_same_cursor(make_voice_history, history_server) -> None:
    messages = make_voice_history(sessions=10, end=NOW)
    delays: list[float] = []
    with history_server(messages) as server:
        server.fail_next, server.fail_only_later_pages = 2, True
        got = HistoryClient(server.url, "s3cret", page_limit=30, sleep=delays.append).fetch("lumina", None, None)
        requests = list(server.requests)
    assert [m["id"] for m in got] == [m["id"] for m in messages]
    assert [status for _, status in requests][:4] == [200, 503, 503, 200]
    assert "cursor" not in requests[0][0]
    assert requests[1][0]["cursor"] == requests[2][0]["cursor"] == requests[3][0]["cursor"]
    assert delays == [0.5, 1.0]


def test_outage_longer_than_the_retries_is_a_clear_error(make_voice_history, history_server) -> None:
    with history_server(make_voice_history(sessions=2, end=NOW)) as server:
        server.fail_next = 10
        with pytest.raises(HistoryError, match=r"kept failing after 3 attempts: HTTP 503"):
            HistoryClient(server.url, "s3cret", retries=2, sleep=no_sleep).fetch("lumina", None, None)


def test_bad_token_and_unknown_character_are_not_retried(make_voice_history, history_server) -> None:
    with history_server(make_voice_history(sessions=2, end=NOW)) as server:
        with pytest.raises(HistoryError, match=r"refused the token \(401\).*HISTORY_TOKEN"):
            HistoryClient(server.url, "wrong", sleep=no_sleep).fetch("lumina", None, None)
        with pytest.raises(HistoryError, match=r"HISTORY_TOKEN is not set"):
            HistoryClient(server.url, None, sleep=no_sleep).fetch("lumina", None, None)
        with pytest.raises(HistoryError, match=r"does not know character 'nobody' \(404\)"):
            HistoryClient(server.url, "s3cret", sleep=no_sleep).fetch("nobody", None, None)
        assert [status for _, status in server.requests] == [401, 401, 404]


def test_unreachable_server_is_retried_then_reported() -> None:
    delays: list[float] = []
    with pytest.raises(HistoryError, match="ConnectError"):
        HistoryClient("http://127.0.0.1:9", "t", retries=3, sleep=delays.append).fetch("lumina", None, None)
    assert delays == [0.5, 1.0, 2.0]


def test_jsonl_file_filters_character_and_window(tmp_path: Path, make_voice_history) -> None:
    messages = make_voice_history(sessions=10, end=NOW, days=40)
    messages.append(dict(messages[0], id=999, character="sol"))
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in messages) + "\n", encoding="utf-8")
    since = NOW - timedelta(days=30)
    got = read_history_file(path, "lumina", since, NOW)
    assert [m["id"] for m in got] == [m["id"] for m in messages if m["character"] == "lumina"
                                      and datetime.fromisoformat(m["created_at"]) >= since]
    assert got and got[0]["content"] == next(m for m in messages if m["id"] == got[0]["id"])["content"]

    path.write_text(json.dumps(messages[0]) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(HistoryError, match=r"history.jsonl:2: not valid JSON"):
        read_history_file(path, "lumina", None, None)
    with pytest.raises(HistoryError, match="does not exist"):
        read_history_file(tmp_path / "missing.jsonl", "lumina", None, None)
