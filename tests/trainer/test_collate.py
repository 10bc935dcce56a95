"""Tokenization: loss only on the reply, dynamic padding, truncation (the spec's Alpaca format here; the chat template
in test_prompt.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from training.collate import IGNORE_INDEX, CompletionCollator, tokenize_example
from training.prompt import ALPACA, PROMPT_TEMPLATE
from transformers import AutoTokenizer


@pytest.fixture(scope="module")
def tokenizer(base_model_dir: Path):
    return AutoTokenizer.from_pretrained(base_model_dir)


RECORD = {"instruction": "機械学習について教えてください", "input": "", "output": "ルミナだよ☆ 機械学習はね、すてき！"}


def test_labels_cover_exactly_the_reply_and_eos(tokenizer) -> None:
    feature = tokenize_example(RECORD, tokenizer, 512, prompt_format=ALPACA)
    prompt_ids = tokenizer(PROMPT_TEMPLATE.format(instruction=RECORD["instruction"], input=""),
                           add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert feature["input_ids"][:n] == prompt_ids
    assert feature["labels"][:n] == [IGNORE_INDEX] * n
    assert feature["labels"][n:] == feature["input_ids"][n:]
    assert feature["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(feature["input_ids"][n:-1]) == RECORD["output"]
    whole = tokenize_example(RECORD, tokenizer, 512, prompt_format=ALPACA, loss_on_prompt=True)
    assert whole["labels"] == whole["input_ids"]


def test_truncation_keeps_prompt_tail_and_reply_start(tokenizer) -> None:
    long = {"instruction": "猫 " * 200, "input": "", "output": "ルミナだよ☆ " * 50}
    feature = tokenize_example(long, tokenizer, 64, prompt_format=ALPACA)
    assert len(feature["input_ids"]) == 64
    n_prompt = sum(1 for label in feature["labels"] if label == IGNORE_INDEX)
    assert n_prompt == 32
    assert tokenizer.decode(feature["input_ids"][:n_prompt]).endswith("Output: ")
    assert tokenizer.decode(feature["input_ids"][n_prompt:]).startswith("ルミナだよ☆")


def test_collator_pads_to_the_longest_not_to_max_length(tokenizer) -> None:
    short = tokenize_example({"instruction": "猫", "input": "", "output": "にゃ"}, tokenizer, 512)
    longer = tokenize_example(RECORD, tokenizer, 512)
    collate = CompletionCollator(pad_token_id=tokenizer.eos_token_id)
    batch = collate([short, longer])
    assert batch["input_ids"].shape == (2, len(longer["input_ids"]))
    pad = len(longer["input_ids"]) - len(short["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * len(short["input_ids"]) + [0] * pad
    assert batch["labels"][0, len(short["input_ids"]) :].eq(IGNORE_INDEX).all()
    assert batch["labels"][1].tolist() == longer["labels"]

    assert CompletionCollator(tokenizer.eos_token_id, pad_to_multiple_of=8)([short])["input_ids"].shape[1] % 8 == 0
    fixed = CompletionCollator(tokenizer.eos_token_id, padding="max_length", max_length=512)([short, longer])
    assert fixed["input_ids"].shape == (2, 512)
