"""Feedback per adapter version in the store, on SQLite and on a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from chat_service.store import NewMessage, Store, VersionFeedback
from sqlalchemy import event, inspect, text


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store(database_url)
    store.create_schema()
    yield store
    store.close()


def reply(store: Store, version: str | None, character: str = "lumina") -> int:
    _, answer = store.add_messages(
        [
            NewMessage(character, "s-1", "user", "こんにちは"),
            NewMessage(character, "s-1", "assistant", "こんにちは！", adapter_version=version),
        ]
    )
    return answer.id


def vote(store: Store, version: str | None, up: int, down: int, character: str = "lumina") -> None:
    for rating, count in (("up", up), ("down", down)):
        for _ in range(count):
            store.set_feedback(reply(store, version, character), rating)


def test_counts_per_version_base_first_unrecorded_last(store: Store) -> None:
    vote(store, "20261126T030000Z", up=3, down=1)
    vote(store, "20261026T030000Z", up=1, down=2)
    vote(store, "base", up=0, down=4)
    vote(store, "20261126T030000Z", up=5, down=5, character="sora")
    reply(store, "20261226T030000Z")  # a reply nobody rated: not listed
    store.add_messages([NewMessage("lumina", "old", "assistant", "imported", feedback="up")])

    assert store.feedback_by_version("lumina") == [
        VersionFeedback("base", 0, 4),
        VersionFeedback("20261026T030000Z", 1, 2),
        VersionFeedback("20261126T030000Z", 3, 1),
        VersionFeedback(None, 1, 0),
    ]
    assert store.feedback_by_version("sora") == [VersionFeedback("20261126T030000Z", 5, 5)]
    assert store.feedback_by_version("nobody") == []


def test_a_changed_vote_counts_once(store: Store) -> None:
    message_id = reply(store, "v1")
    store.set_feedback(message_id, "up")
    store.set_feedback(message_id, "down")
    assert store.feedback_by_version("lumina") == [VersionFeedback("v1", 0, 1)]
    assert store.feedback_by_version("lumina")[0].rated == 1


def test_the_count_reads_the_feedback_index(store: Store) -> None:
    vote(store, "v1", up=2, down=1)
    executed: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany) -> None:
        executed.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        store.feedback_by_version("lumina")
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    ((statement, parameters),) = [(s, p) for s, p in executed if "GROUP BY" in s]
    with store.engine.connect() as conn:
        if store.dialect == "sqlite":
            plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
            details = " ".join(row[-1] for row in plan)
        else:
            # A tiny table makes a sequential scan cheapest; switched off, the planner shows whether the index fits.
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = conn.exec_driver_sql(f"EXPLAIN {statement}", parameters).all()
            details = " ".join(row[0] for row in plan)
    assert "ix_messages_feedback" in details, details
    assert "SCAN messages" not in details and "Seq Scan" not in details, details


def test_create_schema_adds_the_index_to_an_existing_table(store: Store) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_messages_feedback"))
    assert "ix_messages_feedback" not in {i["name"] for i in inspect(store.engine).get_indexes("messages")}
    store.create_schema()
    store.create_schema()  # idempotent
    assert "ix_messages_feedback" in {i["name"] for i in inspect(store.engine).get_indexes("messages")}
