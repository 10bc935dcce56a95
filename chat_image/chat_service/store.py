"""Conversation store: SQLAlchemy 2 models and the repository the API uses.

Ordering guarantee (the history API contract): a message's `id` is the order in which it was acknowledged, and an id
becomes visible to readers only after every smaller id that will ever exist is visible. Paging by `id > cursor`
therefore neither skips nor repeats messages while writers are busy. How each backend keeps that promise:

* SQLite has one writer at a time. Write transactions start with `BEGIN IMMEDIATE`, which takes the write lock up
  front, so the rowid is chosen and committed while no other writer can run: ids commit in id order.
* PostgreSQL hands out sequence values without waiting for commits, so id 7 may commit after id 8 and a reader that
  already moved its cursor past 8 would never see 7. Every inserting transaction therefore first takes one
  transaction-level advisory lock (`pg_advisory_xact_lock`). The sequence value is drawn while holding it, and
  PostgreSQL makes a commit visible before it releases the transaction's locks, so ids again become visible strictly
  in order, also across several replicas sharing the database. Inserts are serialized; a chat turn is one short
  insert transaction, so this costs one commit's latency per turn, not throughput that matters here.

`created_at` is taken after the lock is held, so it also never decreases along `id` (barring a clock step back).
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import (
    BigInteger,
    DateTime,
    Engine,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

from .generation import BASE_VERSION

Role = Literal["user", "assistant"]
Feedback = Literal["up", "down"]

# One fixed 64-bit key for the insert lock; derived from a name so it does not collide with other users of the DB.
_PG_INSERT_LOCK_KEY = zlib.crc32(b"chat_service.messages.insert")


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC as a naive timestamp (SQLite has no time zones) and always returns aware UTC datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; use an aware UTC datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    pass


class Message(Base):
    __tablename__ = "messages"
    # sqlite_autoincrement: never reuse the id of a deleted row, or a trainer's cursor could skip a new message.
    __table_args__ = (
        Index("ix_messages_character_id", "character", "id"),
        Index("ix_messages_session_id", "session_id", "character", "id"),
        # Feedback per (character, adapter version) is counted from this partial index: only rated replies are in it,
        # so the count reads the rated rows of one character, never the whole table.
        Index(
            "ix_messages_feedback",
            "character",
            "adapter_version",
            "feedback",
            sqlite_where=text("feedback IS NOT NULL"),
            postgresql_where=text("feedback IS NOT NULL"),
        ),
        {"sqlite_autoincrement": True},
    )

    # BIGSERIAL on PostgreSQL (sequence cache 1, so values are drawn in lock order); INTEGER PRIMARY KEY on SQLite.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(String(128))
    character: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    feedback: Mapped[str | None] = mapped_column(String(8), nullable=True)
    # Which adapter produced an assistant message ("base" without one): the service is honest about who answered.
    adapter_version: Mapped[str | None] = mapped_column(String(64), nullable=True)


@dataclass(frozen=True)
class StoredMessage:
    id: int
    session_id: str
    character: str
    role: str
    content: str
    created_at: datetime
    feedback: str | None
    adapter_version: str | None

    @classmethod
    def of(cls, row: Message) -> StoredMessage:
        return cls(
            id=row.id,
            session_id=row.session_id,
            character=row.character,
            role=row.role,
            content=row.content,
            created_at=row.created_at,
            feedback=row.feedback,
            adapter_version=row.adapter_version,
        )


@dataclass(frozen=True)
class NewMessage:
    character: str
    session_id: str
    role: Role
    content: str
    adapter_version: str | None = None
    created_at: datetime | None = None  # None: the commit time; set only when importing recorded history
    feedback: Feedback | None = None


@dataclass(frozen=True)
class VersionFeedback:
    """Thumbs on one adapter version's replies (each reply counts once: its latest vote)."""

    version: str | None  # None: replies imported without a recorded version
    up: int
    down: int

    @property
    def rated(self) -> int:
        return self.up + self.down


def version_order(version: str | None) -> tuple[bool, bool, str]:
    """Sort key for adapter versions: base first, then by name (UTC start times: oldest first), None last."""
    return (version is None, version != BASE_VERSION, version or "")


class InvalidCursor(ValueError):
    """The history cursor was not produced by this service."""


class FeedbackTargetError(LookupError):
    """Feedback names a message that does not exist or is not an assistant reply."""


def encode_cursor(last_id: int) -> str:
    """Opaque cursor: base64url of {"id": N}, unpadded."""
    raw = json.dumps({"id": last_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)["id"]
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidCursor("cursor is not one this service returned") from exc
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidCursor("cursor is not one this service returned")
    return value


class Store:
    """Repository over one SQLAlchemy engine. Thread-safe: every call uses its own connection from the pool."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        self.dialect = url.get_backend_name()
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {self.dialect!r}: use sqlite:/// or postgresql+psycopg://")
        if self.dialect == "sqlite":
            if url.database in (None, "", ":memory:"):
                raise ValueError("the store needs a SQLite file, not an in-memory database (history must survive)")
            # timeout: wait up to 30 s for the write lock instead of failing at once under concurrent writers.
            self.engine: Engine = create_engine(
                url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=8, max_overflow=16
            )
            _configure_sqlite(self.engine)
        else:
            self.engine = create_engine(url, pool_size=8, max_overflow=16, pool_pre_ping=True)

    def create_schema(self) -> None:
        """Create missing tables and indexes (idempotent). create_all skips tables that exist, so indexes added
        since a table was made are created one by one."""
        Base.metadata.create_all(self.engine)
        for table in Base.metadata.sorted_tables:
            for index in table.indexes:
                index.create(self.engine, checkfirst=True)

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raise if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    @contextmanager
    def _write_session(self) -> Iterator[Session]:
        conn = self.engine.connect()
        if self.dialect == "sqlite":
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        try:
            with Session(bind=conn) as session, session.begin():
                if self.dialect == "postgresql":
                    session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_INSERT_LOCK_KEY})
                yield session
        finally:
            conn.close()

    def add_messages(
        self,
        messages: Sequence[NewMessage],
        *,
        before_commit: Callable[[], None] | None = None,
    ) -> list[StoredMessage]:
        """Insert messages in one transaction, all or none, ids in list order; returns them once committed
        (= acknowledged).

        `before_commit` runs inside the transaction after the insert; tests use it to hold a transaction open.
        """
        with self._write_session() as session:
            now = datetime.now(UTC)
            rows = [
                {
                    "session_id": m.session_id,
                    "character": m.character,
                    "role": m.role,
                    "content": m.content,
                    "created_at": (m.created_at or now).astimezone(UTC),
                    "feedback": m.feedback,
                    "adapter_version": m.adapter_version,
                }
                for m in messages
            ]
            # One multi-row INSERT ... RETURNING (SQLAlchemy's insertmanyvalues); ids come back in list order.
            statement = insert(Message).returning(Message.id, sort_by_parameter_order=True)
            ids = list(session.scalars(statement, rows).all())
            # Both databases number the rows of one INSERT in VALUES order; the contract relies on it (a user turn
            # before its reply), so check instead of assuming. Raising here rolls the transaction back.
            if ids != sorted(ids):
                raise RuntimeError(f"database assigned ids out of order: {ids}")
            if before_commit is not None:
                before_commit()
        return [StoredMessage(id=i, **row) for i, row in zip(ids, rows, strict=True)]

    def recent_messages(self, character: str, session_id: str, limit: int) -> list[StoredMessage]:
        """The last `limit` messages of a session with this character, oldest first."""
        if limit <= 0:
            return []
        with Session(self.engine) as session:
            rows = session.scalars(
                select(Message)
                .where(Message.character == character, Message.session_id == session_id)
                .order_by(Message.id.desc())
                .limit(limit)
            ).all()
            return [StoredMessage.of(row) for row in reversed(rows)]

    def history_page(
        self,
        character: str,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        after_id: int = 0,
        limit: int = 500,
    ) -> tuple[list[StoredMessage], int | None]:
        """One page in id order; returns the messages and the id to continue after (None on the last page)."""
        # Plain column rows, not ORM objects: a page is read-only and up to 1000 rows, and skipping the identity map
        # makes it several times cheaper.
        columns = [getattr(Message, f.name) for f in fields(StoredMessage)]
        query = select(*columns).where(Message.character == character, Message.id > after_id)
        if since is not None:
            query = query.where(Message.created_at >= since)
        if until is not None:
            query = query.where(Message.created_at < until)
        # One extra row tells whether another page exists without a second query.
        query = query.order_by(Message.id).limit(limit + 1)
        with Session(self.engine) as session:
            rows = session.execute(query).all()
            page = [StoredMessage(*row) for row in rows[:limit]]
        next_after = page[-1].id if len(rows) > limit else None
        return page, next_after

    def set_feedback(self, message_id: int, feedback: Feedback) -> StoredMessage:
        """Record thumbs up/down on an assistant reply; the latest vote wins."""
        with Session(self.engine) as session, session.begin():
            row = session.get(Message, message_id)
            if row is None:
                raise FeedbackTargetError(f"message {message_id} does not exist")
            if row.role != "assistant":
                raise FeedbackTargetError(f"message {message_id} is a user message; feedback is for replies")
            session.execute(update(Message).where(Message.id == message_id).values(feedback=feedback))
            session.refresh(row)
            return StoredMessage.of(row)

    def feedback_by_version(self, character: str) -> list[VersionFeedback]:
        """Thumbs up/down per adapter version of a character's replies: base first, then versions in name order (they
        are UTC start times, so oldest first), unrecorded last. Reads only the partial feedback index."""
        query = (
            select(Message.adapter_version, Message.feedback, func.count())
            .where(Message.character == character, Message.feedback.is_not(None))
            .group_by(Message.adapter_version, Message.feedback)
        )
        counts: dict[str | None, dict[str, int]] = {}
        with Session(self.engine) as session:
            for version, vote, count in session.execute(query):
                counts.setdefault(version, {"up": 0, "down": 0})[vote] = count
        order = sorted(counts, key=version_order)
        return [VersionFeedback(version, counts[version]["up"], counts[version]["down"]) for version in order]


def _configure_sqlite(engine: Engine) -> None:
    """WAL + synchronous=FULL, and explicit BEGIN so write transactions can be IMMEDIATE.

    synchronous=FULL: in WAL mode NORMAL can lose the last commits on power loss; an acknowledged message must
    survive that too, and one extra fsync per chat turn is cheap next to generating the reply.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event below issue BEGIN itself (pysqlite's own implicit BEGIN is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")
