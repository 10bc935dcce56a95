"""The prompt format (contract §2 "Prompt format"): the trainer renders the contract's test vector exactly, and the
rules around it (normalised turns, a template without a system role, Alpaca without a template, the token budget)."""

from __future__ import annotations

from typing import Any

import pytest
from devkit.prompt_vector import prompt_vector, vector_tokenizer
from training.collate import IGNORE_INDEX, tokenize_example
from training.data import pair_messages
from training.prompt import (
    ALPACA,
    PROMPT_TEMPLATE,
    PromptFormat,
    PromptFormatError,
    conversation,
    prompt_format_for,
    render_prompt,
    reply_ids,
)

VECTOR = prompt_vector()
# Gemma-style: no system role, strict alternation (both raise, as the real template does).
NO_SYSTEM_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return vector_tokenizer(VECTOR)


def vector_record() -> dict[str, Any]:
    return {"instruction": VECTOR["instruction"], "input": "", "output": VECTOR["output"], "history": VECTOR["history"]}


def test_the_contract_vector_renders_exactly(tokenizer: Any) -> None:
    fmt = prompt_format_for(tokenizer, VECTOR["system"])
    assert fmt.manifest() == {"format": "chat_template", "template_sha256": VECTOR["template_sha256"],
                              "system": VECTOR["system"]}
    prompt = render_prompt(vector_record(), fmt, tokenizer)
    assert prompt == VECTOR["prompt"]
    assert tokenizer.decode(reply_ids(vector_record(), fmt, tokenizer, prompt)) == VECTOR["reply"]


def test_training_example_is_the_prompt_then_the_reply_with_loss_on_the_reply_only(tokenizer: Any) -> None:
    fmt = prompt_format_for(tokenizer, VECTOR["system"])
    feature = tokenize_example(vector_record(), tokenizer, 512, prompt_format=fmt)
    n = sum(label == IGNORE_INDEX for label in feature["labels"])
    assert tokenizer.decode(feature["input_ids"][:n]) == VECTOR["prompt"]
    assert tokenizer.decode(feature["labels"][n:]) == VECTOR["reply"]
    assert feature["input_ids"][-1] == tokenizer.eos_token_id


def test_over_budget_drops_earlier_turns_then_the_system_turn_then_keeps_the_tail(tokenizer: Any) -> None:
    fmt = prompt_format_for(tokenizer, VECTOR["system"])
    bare = render_prompt({"instruction": VECTOR["instruction"]}, PromptFormat("chat_template"), tokenizer)
    with_system = render_prompt({"instruction": VECTOR["instruction"]}, fmt, tokenizer)
    reply = len(tokenizer(VECTOR["reply"], add_special_tokens=False)["input_ids"])
    for expected in (with_system, bare):
        budget = len(tokenizer(expected, add_special_tokens=False)["input_ids"])  # the prompt keeps half the length
        feature = tokenize_example(vector_record(), tokenizer, 2 * budget, prompt_format=fmt)
        n = sum(label == IGNORE_INDEX for label in feature["labels"])
        assert tokenizer.decode(feature["input_ids"][:n]) == expected  # whole turns left out, not cut
        assert len(feature["input_ids"]) == n + reply
    tail = tokenize_example(vector_record(), tokenizer, 20, prompt_format=fmt)
    assert tokenizer.decode(tail["input_ids"][:10]) == bare[-10:]


def test_turns_are_normalised_for_strict_templates() -> None:
    history = [{"role": "assistant", "content": "greeting"}, {"role": "user", "content": "a"},
               {"role": "assistant", "content": ""}, {"role": "user", "content": "b"}]
    assert conversation("", history, "c") == [{"role": "user", "content": "a\nb\nc"}]
    assert conversation("sys", [], "c") == [{"role": "system", "content": "sys"}, {"role": "user", "content": "c"}]


def test_a_template_without_a_system_role_gets_the_persona_in_the_first_user_turn(tokenizer: Any) -> None:
    tokenizer = vector_tokenizer(VECTOR)
    tokenizer.chat_template = NO_SYSTEM_TEMPLATE
    fmt = prompt_format_for(tokenizer, "You are Lumina.")
    record = {"instruction": "hi", "output": "yo", "history": [{"role": "user", "content": "x"},
                                                               {"role": "assistant", "content": "y"}]}
    prompt = render_prompt(record, fmt, tokenizer)
    assert prompt == "<user>You are Lumina.\n\nx</s><assistant>y</s><user>hi</s><assistant>"
    assert tokenizer.decode(reply_ids(record, fmt, tokenizer, prompt)) == "yo</s>"


def test_a_template_that_does_not_continue_the_prompt_is_refused(tokenizer: Any) -> None:
    tokenizer = vector_tokenizer(VECTOR)
    tokenizer.chat_template = "{% if add_generation_prompt %}A:{% else %}B:{% endif %}{{ messages[-1]['content'] }}"
    fmt = prompt_format_for(tokenizer)
    record = {"instruction": "hi", "output": "yo"}
    with pytest.raises(PromptFormatError, match="does not continue the prompt"):
        reply_ids(record, fmt, tokenizer, render_prompt(record, fmt, tokenizer))


def test_without_a_template_the_spec_alpaca_format(tokenizer: Any) -> None:
    tokenizer = vector_tokenizer(VECTOR)
    tokenizer.chat_template = None
    assert prompt_format_for(tokenizer, "persona") == ALPACA  # Alpaca has no place for a persona
    assert ALPACA.manifest() == {"format": "alpaca", "template": PROMPT_TEMPLATE}
    record = {"instruction": "こんにちは", "input": "user: やあ", "output": "ルミナ"}
    assert render_prompt(record) == "Instruction: こんにちは\nInput: user: やあ\nOutput: "
    assert tokenizer.decode(reply_ids(record, ALPACA, tokenizer, render_prompt(record))) == "ルミナ</s>"


def test_pairs_carry_their_context_as_turns_and_as_alpaca_text() -> None:
    rows = [{"id": i, "session_id": "s", "role": role, "content": text, "created_at": f"2026-11-20T10:00:0{i}Z"}
            for i, (role, text) in enumerate([("user", "one"), ("assistant", "two"), ("user", "three" * 3),
                                              ("assistant", "four")])]
    # Five characters: the text keeps its last five, the turns the most recent whole turn that fits.
    examples = pair_messages(rows, context_turns=2, context_chars=5).examples
    assert examples[1].alpaca() == {"instruction": "three" * 3, "input": ": two", "output": "four",
                                    "history": [{"role": "assistant", "content": "two"}]}
    examples = pair_messages(rows, context_turns=2, context_chars=6).examples
    assert [t["content"] for t in examples[1].alpaca()["history"]] == ["one", "two"]
    assert examples[0].alpaca() == {"instruction": "one", "input": "", "output": "two"}  # no context: no history
