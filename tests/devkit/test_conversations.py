"""The sample-conversation generator: contract fields, determinism, realism, and the style score."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import pytest
from devkit.conversations import (
    CHARACTERS,
    MARKERS,
    TOPICS,
    carries_style,
    generate_history,
    generic_dialogue,
    generic_sessions,
    held_out_prompts,
    style_score,
    user_turns,
    write_jsonl,
)
from devkit.paths import DOCS

START = datetime(2026, 10, 27, tzinfo=UTC)
END = datetime(2026, 11, 26, tzinfo=UTC)

CONTRACTS = DOCS / "contracts.md"


def _history(character: str = "lumina", seed: int = 7, sessions: int = 120, **kwargs: float) -> list[dict]:
    return generate_history(character, sessions=sessions, seed=seed, start=START, end=END, **kwargs)


def _contract_fields() -> list[str]:
    # The first JSON example in the contracts doc is the history API's response; its message keys are the contract.
    block = re.search(r"```json\n(.*?)```", CONTRACTS.read_text(encoding="utf-8"), re.S)
    assert block, "no JSON example in docs/contracts.md"
    return list(json.loads(block.group(1))["messages"][0])


def _parse(instant: str) -> datetime:
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", instant), instant
    return datetime.strptime(instant, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def test_same_seed_same_history_other_seed_differs() -> None:
    assert _history(seed=3) == _history(seed=3)
    assert _history(seed=3) != _history(seed=4)


@pytest.mark.parametrize("character", CHARACTERS)
def test_messages_have_exactly_the_contract_fields(character: str) -> None:
    fields = _contract_fields()
    history = _history(character)
    for message in history:
        assert list(message) == fields
        assert message["character"] == character
        assert message["role"] in {"user", "assistant"}
        assert isinstance(message["content"], str) and message["content"].strip()
        if message["role"] == "user":
            assert message["feedback"] is None
        else:
            assert message["feedback"] in {"up", "down", None}
        assert START <= _parse(message["created_at"]) < END
    assert [m["id"] for m in history] == list(range(1, len(history) + 1))
    instants = [_parse(m["created_at"]) for m in history]
    assert instants == sorted(instants), "id order must be acknowledgement (time) order"


def test_sessions_are_multi_turn_alternating_and_interleaved() -> None:
    history = _history(sessions=200)
    by_session: dict[str, list[dict]] = defaultdict(list)
    for message in history:
        by_session[message["session_id"]].append(message)
    assert len(by_session) == 200
    for messages in by_session.values():
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2)
        assert 2 <= len(messages) // 2 <= 6
    # Interleaved: reading messages in id order, the session changes before some session has ended.
    last_index = {m["session_id"]: i for i, m in enumerate(history)}
    interrupted = {
        history[i]["session_id"]
        for i in range(len(history) - 1)
        if history[i + 1]["session_id"] != history[i]["session_id"] and last_index[history[i]["session_id"]] > i
    }
    assert len(interrupted) >= 20


def test_thumbs_down_marks_exactly_the_off_voice_replies() -> None:
    replies = [m for m in _history(sessions=300, thumbs_down_rate=0.2) if m["role"] == "assistant"]
    feedback = Counter(m["feedback"] for m in replies)
    assert 0.15 < feedback["down"] / len(replies) < 0.25
    assert feedback["up"] > 0 and feedback[None] > 0
    down = [m["content"] for m in replies if m["feedback"] == "down"]
    kept = [m["content"] for m in replies if m["feedback"] != "down"]
    assert style_score("lumina", down) == 0.0
    assert style_score("lumina", kept) == 1.0


def test_no_thumbs_down_when_rate_is_zero() -> None:
    assert all(m["feedback"] != "down" for m in _history(thumbs_down_rate=0.0))


def test_style_score_separates_the_voices() -> None:
    lumina = [m["content"] for m in _history("lumina", sessions=200) if m["role"] == "assistant"]
    sora = [m["content"] for m in _history("sora", sessions=200) if m["role"] == "assistant"]
    assert style_score("lumina", lumina) >= 0.85
    assert style_score("sora", sora) >= 0.85
    assert style_score("lumina", sora) <= 0.1
    assert style_score("sora", lumina) <= 0.1


def test_generic_voice_carries_no_character_markers() -> None:
    outputs = [output for _, _, output in generic_dialogue(seed=0, count=2000)]
    for character in CHARACTERS:
        assert style_score(character, outputs) == 0.0



def test_generic_sessions_are_neutral_multi_turn_chats() -> None:
    sessions = generic_sessions(seed=0, count=400)
    assert sessions == generic_sessions(seed=0, count=400) != generic_sessions(seed=1, count=400)
    assert {len(turns) // 2 for turns in sessions} == {1, 2, 3, 4, 5}
    for turns in sessions:
        assert [role for role, _ in turns] == ["user", "assistant"] * (len(turns) // 2)
        user, assistant = turns[0][1], turns[1][1]
        topic = max((t for t in TOPICS if t.ja in user or t.en in user), key=lambda t: len(t.ja))
        assert any(tip in assistant for tip in (*topic.ja_tips, *topic.en_tips)), (user, assistant)
    replies = [text for turns in sessions for role, text in turns if role == "assistant"]
    for character in CHARACTERS:
        assert style_score(character, replies) == 0.0

@pytest.mark.parametrize("character", CHARACTERS)
def test_replies_answer_the_topic_of_the_prompt(character: str) -> None:
    history = _history(character, sessions=60, thumbs_down_rate=0.0)
    first_exchanges: dict[str, list[dict]] = {}
    for message in history:
        first_exchanges.setdefault(message["session_id"], []).append(message)
    for user, assistant, *_ in first_exchanges.values():
        # The opener names a topic; the reply uses that topic's name or one of its tips.
        topic = max((t for t in TOPICS if t.ja in user["content"] or t.en in user["content"]), key=lambda t: len(t.ja))
        related = (topic.ja, topic.en, *topic.ja_tips, *topic.en_tips)
        assert any(word.lower() in assistant["content"].lower() for word in related), (user, assistant)


def test_style_score_bounds_and_errors() -> None:
    assert style_score("lumina", []) == 0.0
    assert style_score("lumina", ["星がきれい", "hello"]) == 0.5
    assert carries_style("lumina", "Look at the STARS tonight")
    assert not carries_style("lumina", "Let's start with soup")  # "start" is not a star
    assert carries_style("sora", "……そう。")
    with pytest.raises(ValueError):
        style_score("nobody", ["x"])
    assert set(MARKERS) == set(CHARACTERS)


def test_user_turns_replay_every_user_message_in_order() -> None:
    history = _history()
    turns = user_turns(list(reversed(history)))
    users = [m for m in history if m["role"] == "user"]
    assert turns == [(m["session_id"], m["content"]) for m in users]


def test_write_jsonl_round_trips(tmp_path: Path) -> None:
    history = _history(sessions=10)
    path = write_jsonl(tmp_path / "sub" / "history.jsonl", history)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == history
    assert "星" in path.read_text(encoding="utf-8")  # Japanese stays readable, not \u-escaped


@pytest.mark.parametrize("character", CHARACTERS)
def test_held_out_prompts_never_appear_in_histories(character: str) -> None:
    prompts = held_out_prompts(character)
    assert len(prompts) >= 6 and len(set(prompts)) == len(prompts)
    seen = {m["content"] for seed in range(3) for m in _history(character, seed=seed, sessions=300)}
    assert not seen.intersection(prompts)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        _history("nobody")
    with pytest.raises(ValueError):
        generate_history("lumina", sessions=1, seed=0, start=START.replace(tzinfo=None), end=END)
    with pytest.raises(ValueError):
        _history(thumbs_down_rate=1.5)
