"""The store on SQLite and on a real PostgreSQL server: same tests, both databases."""

from __future__ import annotations

import random
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from chat_service.store import (
    FeedbackTargetError,
    InvalidCursor,
    NewMessage,
    Store,
    decode_cursor,
    encode_cursor,
)


@pytest.fixture
def store(database_url: str) -> Store:
    store = Store(database_url)
    store.create_schema()
    yield store
    store.close()


def turn(session: str, text: str, character: str = "lumina") -> list[NewMessage]:
    return [
        NewMessage(character, session, "user", text),
        NewMessage(character, session, "assistant", f"re: {text}", adapter_version="v1"),
    ]


def page_all(store: Store, character: str, limit: int, **window: datetime) -> list[int]:
    ids: list[int] = []
    after = 0
    while True:
        page, after_next = store.history_page(character, after_id=after, limit=limit, **window)
        ids += [m.id for m in page]
        if after_next is None:
            return ids
        after = after_next


def test_messages_round_trip_in_order(store: Store) -> None:
    user, reply = store.add_messages(turn("s-1", "こんにちは"))
    assert reply.id == user.id + 1
    assert (user.role, user.content, user.feedback, user.session_id) == ("user", "こんにちは", None, "s-1")
    assert (reply.role, reply.content, reply.adapter_version) == ("assistant", "re: こんにちは", "v1")
    assert user.created_at.tzinfo is not None
    page, after = store.history_page("lumina", limit=10)
    assert [m.id for m in page] == [user.id, reply.id]
    assert after is None
    assert page[0].created_at == user.created_at  # microseconds survive the round trip, in UTC


def test_recent_messages_are_per_session_and_character(store: Store) -> None:
    for i in range(4):
        store.add_messages(turn("s-a", f"a{i}"))
        store.add_messages(turn("s-b", f"b{i}"))
    store.add_messages(turn("s-a", "sora", "sora"))
    recent = store.recent_messages("lumina", "s-a", 3)
    assert [m.content for m in recent] == ["re: a2", "a3", "re: a3"]
    assert store.recent_messages("lumina", "s-a", 0) == []
    assert [m.content for m in store.recent_messages("sora", "s-a", 10)] == ["sora", "re: sora"]


def test_history_paging_window_and_character(store: Store) -> None:
    for i in range(7):
        store.add_messages(turn(f"s-{i}", str(i)))
        store.add_messages(turn(f"s-{i}", str(i), "sora"))
    all_lumina = [m.id for m in store.history_page("lumina", limit=1000)[0]]
    assert len(all_lumina) == 14
    assert page_all(store, "lumina", 3) == all_lumina
    assert page_all(store, "lumina", 14) == all_lumina  # exact multiple: last full page says "no more"
    page, after = store.history_page("lumina", limit=14)
    assert after is None and len(page) == 14
    page, after = store.history_page("lumina", limit=13)
    assert after == page[-1].id

    messages = store.history_page("lumina", limit=1000)[0]
    since, until = messages[4].created_at, messages[10].created_at
    windowed = page_all(store, "lumina", 2, since=since, until=until)
    # [since, until): both messages of a turn share a timestamp, so turns 2..4 are inside.
    assert windowed == [m.id for m in messages if since <= m.created_at < until]
    assert windowed == all_lumina[4:10]
    future = datetime.now(UTC) + timedelta(days=1)
    assert store.history_page("lumina", since=future, limit=10) == ([], None)


def test_feedback(store: Store) -> None:
    user, reply = store.add_messages(turn("s-1", "hi"))
    assert store.set_feedback(reply.id, "up").feedback == "up"
    assert store.set_feedback(reply.id, "down").feedback == "down"  # latest vote wins
    assert store.history_page("lumina", limit=10)[0][1].feedback == "down"
    with pytest.raises(FeedbackTargetError, match="user message"):
        store.set_feedback(user.id, "up")
    with pytest.raises(FeedbackTargetError, match="does not exist"):
        store.set_feedback(reply.id + 100, "up")


def test_cursor_is_opaque_and_checked() -> None:
    assert encode_cursor(18) == "eyJpZCI6MTh9"  # the contract's example
    assert decode_cursor(encode_cursor(12345)) == 12345
    for bad in ["", "abc", "eyJpZCI6LTF9", "eyJpZCI6IngifQ", "e30", "!!!!"]:
        with pytest.raises(InvalidCursor):
            decode_cursor(bad)


def test_history_survives_reopening(database_url: str) -> None:
    first = Store(database_url)
    first.create_schema()
    written = [m.id for m in first.add_messages(turn("s-1", "remember me"))]
    first.close()
    second = Store(database_url)
    second.create_schema()  # idempotent on an existing schema
    assert [m.id for m in second.history_page("lumina", limit=10)[0]] == written
    new = second.add_messages(turn("s-1", "again"))
    assert new[0].id > written[-1]
    second.close()


def test_paging_neither_skips_nor_repeats_with_concurrent_writers(store: Store) -> None:
    """Writers hold their transaction open for a random while after inserting, so without the store's ordering
    guarantee ids would commit out of order and a reader that moved past a later id would skip an earlier one."""
    writers, turns_each = 6, 12
    stop_reading = threading.Event()
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        rng = random.Random(n)
        try:
            for i in range(turns_each):
                store.add_messages(turn(f"w{n}", f"{n}-{i}"), before_commit=lambda: time.sleep(rng.uniform(0, 0.01)))
        except BaseException as exc:
            errors.append(exc)

    seen: list[int] = []

    def reader() -> None:
        after = 0
        try:
            while True:
                done = stop_reading.is_set()  # read the flag first: the pass after it is set sees every commit
                page, after_next = store.history_page("lumina", after_id=after, limit=5)
                seen.extend(m.id for m in page)
                if page:
                    after = page[-1].id
                if after_next is None:
                    if done:
                        return
                    time.sleep(0.002)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(writers)]
    read_thread = threading.Thread(target=reader)
    read_thread.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop_reading.set()
    read_thread.join()
    assert not errors
    everything = [m.id for m in store.history_page("lumina", limit=1000)[0]]
    assert len(everything) == writers * turns_each * 2
    assert len(seen) == len(set(seen)), "a message was delivered twice"
    assert seen == everything, f"skipped: {sorted(set(everything) - set(seen))}"


def test_sqlite_needs_a_file_and_unknown_databases_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="in-memory"):
        Store("sqlite://")
    with pytest.raises(ValueError, match="unsupported database"):
        Store("mysql://user@localhost/db")


def test_sqlite_is_durable_wal(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'c.db'}")
    store.create_schema()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    store.close()


def test_import_keeps_recorded_times_and_feedback(store: Store) -> None:
    then = datetime(2026, 10, 1, 12, 0, 0, 123456, tzinfo=UTC)
    stored = store.add_messages(
        [
            NewMessage("lumina", "old-1", "user", "昔の話", created_at=then),
            NewMessage("lumina", "old-1", "assistant", "はい", created_at=then + timedelta(seconds=1), feedback="up"),
        ]
    )
    page = store.history_page("lumina", until=then + timedelta(seconds=1), limit=10)[0]
    assert [m.id for m in page] == [stored[0].id]
    assert page[0].created_at == then
    assert store.history_page("lumina", limit=10)[0][1].feedback == "up"
