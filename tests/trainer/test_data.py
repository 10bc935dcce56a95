"""Pairing user turns with their replies, and the split by session."""

from __future__ import annotations

import random

import pytest
from training.data import DataError, pair_messages, session_bucket, split_by_session


def msg(i: int, session: str, role: str, content: str, second: int, feedback: str | None = None) -> dict:
    return {"id": i, "session_id": session, "character": "lumina", "role": role, "content": content,
            "created_at": f"2026-11-20T10:00:{second:02d}Z", "feedback": feedback}


def pairs(rows: list[dict], **kwargs: int) -> list[tuple[str, str]]:
    return [(e.instruction, e.output) for e in pair_messages(rows, **kwargs).examples]


def test_interleaved_sessions_pair_within_their_own_session() -> None:
    # Two sessions written at the same time: by global order, "A?" would be followed by B's reply.
    rows = [msg(1, "a", "user", "A?", 0), msg(2, "b", "user", "B?", 1),
            msg(3, "b", "assistant", "B!", 2), msg(4, "a", "assistant", "A!", 3)]
    assert sorted(pairs(rows)) == [("A?", "A!"), ("B?", "B!")]


def test_out_of_order_timestamps_are_sorted_by_time_then_id() -> None:
    rows = [msg(10, "a", "assistant", "second answer", 9), msg(11, "a", "user", "second question", 8),
            msg(3, "a", "assistant", "first answer", 2), msg(2, "a", "user", "first question", 1)]
    assert pairs(rows) == [("first question", "first answer"), ("second question", "second answer")]
    # Same timestamp: the id decides.
    same = [msg(6, "s", "assistant", "reply", 5), msg(5, "s", "user", "question", 5)]
    assert pairs(same) == [("question", "reply")]


def test_two_assistant_messages_in_a_row_first_one_answers() -> None:
    rows = [msg(1, "a", "user", "Q", 0), msg(2, "a", "assistant", "first", 1), msg(3, "a", "assistant", "second", 2)]
    result = pair_messages(rows)
    assert [(e.instruction, e.output) for e in result.examples] == [("Q", "first")]
    assert result.dropped["unanswered_assistant"] == 1


def test_assistant_first_session_drops_the_greeting() -> None:
    rows = [msg(1, "a", "assistant", "Welcome!", 0), msg(2, "a", "user", "Hi", 1), msg(3, "a", "assistant", "Hello", 2)]
    result = pair_messages(rows)
    assert [(e.instruction, e.output) for e in result.examples] == [("Hi", "Hello")]
    assert result.dropped["unanswered_assistant"] == 1


def test_user_followed_by_user_earlier_turn_has_no_reply_but_is_context() -> None:
    rows = [msg(1, "a", "user", "one", 0), msg(2, "a", "user", "two", 1), msg(3, "a", "assistant", "reply", 2),
            msg(4, "a", "user", "dangling", 3)]
    result = pair_messages(rows, context_turns=2)
    assert [(e.instruction, e.input, e.output) for e in result.examples] == [("two", "user: one", "reply")]
    assert result.dropped["unanswered_user"] == 2  # "one" (superseded) and "dangling" (never answered)


def test_thumbs_down_empty_and_duplicates_are_dropped() -> None:
    rows = [
        msg(1, "a", "user", "Q1", 0), msg(2, "a", "assistant", "bad", 1, feedback="down"),
        msg(3, "a", "user", "   ", 2), msg(4, "a", "assistant", "to nothing", 3),
        msg(5, "a", "user", "Q2", 4), msg(6, "a", "assistant", "", 5),
        msg(7, "a", "user", "Q3", 6), msg(8, "a", "assistant", "good", 7, feedback="up"),
        msg(9, "b", "user", "Q3", 8), msg(10, "b", "assistant", "good", 9),
        msg(11, "b", "user", "Q3 ", 10), msg(12, "b", "assistant", " good", 11),
    ]
    result = pair_messages(rows)
    assert [(e.instruction, e.output, e.session_id) for e in result.examples] == [("Q3", "good", "a")]
    assert result.dropped_dict() == {"thumbs_down": 1, "empty": 2, "duplicate": 2, "unanswered_user": 0,
                                     "unanswered_assistant": 0, "other_role": 0}


def test_thumbs_down_reply_does_not_let_a_later_message_answer_for_it() -> None:
    rows = [msg(1, "a", "user", "Q", 0), msg(2, "a", "assistant", "rejected", 1, feedback="down"),
            msg(3, "a", "assistant", "sorry, again", 2)]
    assert pairs(rows) == []


def test_context_is_bounded_by_turns_and_characters() -> None:
    rows = []
    for k in range(5):
        rows += [msg(2 * k + 1, "a", "user", f"q{k}", 2 * k), msg(2 * k + 2, "a", "assistant", f"r{k}", 2 * k + 1)]
    last = pair_messages(rows, context_turns=3).examples[-1]
    assert last.input == "assistant: r2\nuser: q3\nassistant: r3"
    assert pair_messages(rows, context_turns=3, context_chars=13).examples[-1].input == "assistant: r3"
    assert pair_messages(rows).examples[-1].input == ""


def test_non_ascii_text_round_trips_untouched() -> None:
    text_q, text_a = "こんにちは 🌸 Ünïcödé\u3000全角", "ルミナだよ☆\n改行も　そのまま"
    rows = [msg(1, "a", "user", text_q, 0), msg(2, "a", "assistant", text_a, 1)]
    assert pairs(rows) == [(text_q, text_a)]


def test_bad_rows_give_clear_errors() -> None:
    with pytest.raises(DataError, match="no 'role'"):
        pair_messages([{"content": "x", "created_at": "2026-11-20T10:00:00Z"}])
    with pytest.raises(DataError, match="bad timestamp"):
        pair_messages([{"role": "user", "content": "x", "created_at": "yesterday"}])


def test_pairing_many_messages_is_fast_and_complete() -> None:
    rng = random.Random(0)
    rows, i = [], 0
    for s in range(5000):
        for t in range(4):
            rows.append(msg(i, f"s{s}", "user", f"q{s}-{t}", t * 2))
            rows.append(msg(i + 1, f"s{s}", "assistant", f"a{s}-{t}", t * 2 + 1))
            i += 2
    rng.shuffle(rows)
    result = pair_messages(rows)  # 40k messages; the O(n^2) original would take minutes
    assert len(result.examples) == 20000
    assert all(e.instruction[1:] == e.output[1:] for e in result.examples)


def test_split_is_by_session_deterministic_and_non_empty() -> None:
    rows = []
    for s in range(50):
        for t in range(3):
            rows += [msg(len(rows) + 1, f"sess-{s}", "user", f"q{s}.{t}", 2 * t),
                     msg(len(rows) + 2, f"sess-{s}", "assistant", f"a{s}.{t}", 2 * t + 1)]
    examples = pair_messages(rows).examples
    train, held_out = split_by_session(examples, 0.2)
    assert train and held_out
    assert not {e.session_id for e in train} & {e.session_id for e in held_out}
    assert len(train) + len(held_out) == len(examples)
    assert {e.session_id for e in held_out} == {s for s in {e.session_id for e in examples} if session_bucket(s) < 0.2}
    _, again_eval = split_by_session(list(reversed(examples)), 0.2)
    assert {e.session_id for e in again_eval} == {e.session_id for e in held_out}

    # Two sessions: whatever the hash says, one of them is held out.
    two = [e for e in examples if e.session_id in ("sess-0", "sess-1")]
    small_train, small_eval = split_by_session(two, 0.1)
    assert len({e.session_id for e in small_train}) == len({e.session_id for e in small_eval}) == 1
    with pytest.raises(DataError, match="at least 2 sessions"):
        split_by_session([e for e in examples if e.session_id == "sess-0"], 0.1)
