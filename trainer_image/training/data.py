"""Conversation history → Alpaca records, and the train/eval split.

The chat service stores one row per message (contract §1). A training example is a user turn and the assistant reply
that answers it *in the same session*. Pairing rules, per session, messages ordered by ``(created_at, id)``:

- a user turn pairs with the next assistant message in that session;
- two assistant messages in a row: the first one answers, the second answers nothing and is dropped
  (counted as ``unanswered_assistant``);
- a session that starts with the assistant (a greeting): those leading assistant messages are dropped the same way;
- a user turn followed by another user turn: the earlier one got no reply of its own and is dropped
  (``unanswered_user``); with ``context_turns > 0`` it still appears in the later pair's context;
- a reply with thumbs-down feedback drops its pair (``thumbs_down``): we do not teach what users rejected;
- a pair with an empty (whitespace only) user or assistant text is dropped (``empty``);
- a pair whose (instruction, input, output) equals an earlier one is dropped (``duplicate``).

Text is never rewritten: Japanese and any other non-ASCII content reaches the records byte for byte.
Everything is one sort plus linear passes, O(n log n) in the number of messages.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from .prompt import context_within

# Context in the Alpaca `input` is cut to its last this many characters; the chat service cuts the same way
# (CHAT_CONTEXT_CHARS, default 1000), and the manifest records it.
CONTEXT_CHARS = 1000

DROP_REASONS = ("thumbs_down", "empty", "duplicate", "unanswered_user", "unanswered_assistant", "other_role")


class DataError(ValueError):
    """History data that cannot be used as given (missing fields, bad timestamps)."""


@dataclass(frozen=True)
class Message:
    id: int | str
    session_id: str
    role: str
    content: str
    created_at: datetime
    feedback: str | None = None


@dataclass(frozen=True)
class Example:
    """One Alpaca record plus where it came from (the session decides the split)."""

    instruction: str
    input: str
    output: str
    session_id: str
    created_at: datetime
    # The context as turns, for chat-template prompts (training.prompt); `input` is the same context as text.
    history: tuple[tuple[str, str], ...] = ()

    def alpaca(self) -> dict[str, Any]:
        record: dict[str, Any] = {"instruction": self.instruction, "input": self.input, "output": self.output}
        if self.history:
            record["history"] = [{"role": role, "content": content} for role, content in self.history]
        return record


@dataclass
class PairingResult:
    examples: list[Example]
    messages: int
    dropped: Counter[str] = field(default_factory=Counter)

    def dropped_dict(self) -> dict[str, int]:
        return {reason: int(self.dropped.get(reason, 0)) for reason in DROP_REASONS}


class PreparedData(NamedTuple):
    """What one run trains and evaluates on: the message count, the drop counters and the session split."""

    messages: int
    dropped: dict[str, int]
    train: list[Example]
    held_out: list[Example]

    def train_records(self) -> list[dict[str, Any]]:
        return [e.alpaca() for e in self.train]

    def eval_records(self) -> list[dict[str, Any]]:
        return [e.alpaca() for e in self.held_out]


def parse_time(value: Any) -> datetime:
    """RFC 3339 / ISO 8601 → aware UTC datetime; a naive value is taken as UTC."""
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError as exc:
            raise DataError(f"bad timestamp {value!r}: expected RFC 3339, e.g. 2026-11-20T10:00:00Z") from exc
    else:
        raise DataError(f"bad timestamp {value!r}: expected RFC 3339, e.g. 2026-11-20T10:00:00Z")
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def to_message(raw: Mapping[str, Any], index: int) -> Message:
    """Read one history row. ``timestamp`` (the spec's field) is accepted for ``created_at``; rows without
    ``session_id`` belong to one implicit session; rows without ``id`` are ordered by their position."""
    try:
        role = raw["role"]
        content = raw["content"]
    except KeyError as exc:
        raise DataError(f"message #{index} has no {exc.args[0]!r} field: {dict(raw)!r:.200}") from exc
    if not isinstance(content, str):
        content = "" if content is None else str(content)
    stamp = raw.get("created_at", raw.get("timestamp"))
    if stamp is None:
        raise DataError(f"message #{index} has no created_at/timestamp: {dict(raw)!r:.200}")
    msg_id = raw.get("id")
    return Message(
        id=index if msg_id is None else msg_id,
        session_id=str(raw.get("session_id") or ""),
        role=str(role),
        content=content,
        created_at=parse_time(stamp),
        feedback=raw.get("feedback"),
    )


def _order_key(message: Message) -> tuple[str, datetime, int, str]:
    # ids are integers from the chat service but may be strings in files; never compare int with str.
    msg_id = message.id
    return (
        message.session_id,
        message.created_at,
        msg_id if isinstance(msg_id, int) else 0,
        "" if isinstance(msg_id, int) else str(msg_id),
    )


def _remember(history: list[Message], message: Message) -> None:
    if message.content.strip():
        history.append(message)


def _context_text(turns: Sequence[Message], max_chars: int) -> str:
    text = "\n".join(f"{m.role}: {m.content}" for m in turns)
    # Keep the most recent part: it is what the reply responds to.
    return text[-max_chars:] if len(text) > max_chars else text


def pair_messages(
    rows: Iterable[Mapping[str, Any]],
    *,
    context_turns: int = 0,
    context_chars: int = CONTEXT_CHARS,
) -> PairingResult:
    """Pair user turns with their replies (rules in the module docstring).

    ``context_turns`` earlier messages of the session (bounded to ``context_chars`` characters) go into ``input``;
    0 keeps ``input`` empty, which is what the chat service sends by default.
    """
    messages = [to_message(raw, i) for i, raw in enumerate(rows)]
    messages.sort(key=_order_key)
    result = PairingResult(examples=[], messages=len(messages))
    candidates: list[Example] = []
    start = 0
    while start < len(messages):
        end = start
        while end < len(messages) and messages[end].session_id == messages[start].session_id:
            end += 1
        candidates += _pair_session(messages[start:end], context_turns, context_chars, result.dropped)
        start = end
    result.examples = _without_duplicates(candidates, result.dropped)
    return result


def _pair_session(
    session: Sequence[Message], context_turns: int, context_chars: int, dropped: Counter[str]
) -> list[Example]:
    """The pairs of one session's messages (in order); what cannot pair is counted in ``dropped``."""
    pairs: list[Example] = []
    pending: Message | None = None
    history: list[Message] = []  # earlier non-empty turns of this session, for context
    for message in session:
        if message.role == "user":
            if pending is not None:
                dropped["unanswered_user"] += 1
                _remember(history, pending)
            pending = message
        elif message.role == "assistant":
            if pending is None:
                dropped["unanswered_assistant"] += 1
            elif message.feedback == "down":
                dropped["thumbs_down"] += 1
            elif not pending.content.strip() or not message.content.strip():
                dropped["empty"] += 1
            else:
                context = _context_text(history[-context_turns:], context_chars) if context_turns > 0 else ""
                recent = history[-context_turns:] if context_turns > 0 else []
                turns = context_within([{"role": m.role, "content": m.content} for m in recent], context_turns,
                                       context_chars)
                pairs.append(Example(pending.content, context, message.content, message.session_id,
                                     pending.created_at, tuple((t["role"], t["content"]) for t in turns)))
            if pending is not None:
                _remember(history, pending)
                pending = None
            # A rejected reply was still said in the conversation, so it stays in later context.
            _remember(history, message)
        else:
            dropped["other_role"] += 1
    if pending is not None:
        dropped["unanswered_user"] += 1
    return pairs


def _without_duplicates(candidates: list[Example], dropped: Counter[str]) -> list[Example]:
    # Oldest first, so the kept copy of a duplicate is the earliest one and the order is reproducible.
    candidates.sort(key=lambda e: (e.created_at, e.session_id))
    seen: set[tuple[str, str, str]] = set()
    kept: list[Example] = []
    for example in candidates:
        key = (example.instruction.strip(), example.input.strip(), example.output.strip())
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        kept.append(example)
    return kept


def session_bucket(session_id: str) -> float:
    """A stable number in [0, 1) per session: the same session lands on the same side in every run."""
    digest = hashlib.sha256(session_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_by_session(examples: Sequence[Example], eval_fraction: float = 0.1) -> tuple[list[Example], list[Example]]:
    """Deterministic split by session hash, so no session has examples on both sides.

    With few sessions the hash may put none (or all) on one side; then the session with the smallest (largest)
    bucket is moved, so both sides are non-empty whenever there are at least two sessions.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    buckets = {s: session_bucket(s) for s in {e.session_id for e in examples}}
    if len(buckets) < 2:
        raise DataError(f"need at least 2 sessions to hold out an evaluation split, got {len(buckets)}")
    eval_sessions = {s for s, b in buckets.items() if b < eval_fraction}
    if not eval_sessions:
        eval_sessions = {min(buckets, key=buckets.__getitem__)}
    if len(eval_sessions) == len(buckets):
        eval_sessions.discard(max(buckets, key=buckets.__getitem__))
    train = [e for e in examples if e.session_id not in eval_sessions]
    held_out = [e for e in examples if e.session_id in eval_sessions]
    return train, held_out
