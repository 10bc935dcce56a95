"""Tokenize Alpaca records for causal-LM fine-tuning and batch them.

Each example is the rendered prompt (``training.prompt``) + output + EOS. Labels are ``-100`` on the prompt (and on
padding), so the loss is only on the reply the character should produce. Batches are padded to their longest member,
not to ``max_length``; on chat data (short, similar lengths) that leaves about a quarter of a random batch as padding.

The spec's original setup (every example padded to 512, loss on prompt and reply) is still expressible with
``padding="max_length"`` and ``loss_on_prompt=True``, only so that benchmarks can compare the two honestly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from .prompt import PROMPT_TEMPLATE, render_prompt

IGNORE_INDEX = -100


def tokenize_example(
    record: Mapping[str, str],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    prompt_template: str = PROMPT_TEMPLATE,
    loss_on_prompt: bool = False,
) -> dict[str, list[int]]:
    """Token ids and labels for one record.

    Too long for ``max_length``: the prompt keeps at most half of the budget (its *last* tokens, nearest the reply)
    and the reply is cut at the end, so every example still teaches at least the start of a reply.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; replies could not end")
    prompt = render_prompt(record, prompt_template)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reply_ids = [*tokenizer(record["output"], add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    if len(prompt_ids) + len(reply_ids) > max_length:
        prompt_budget = min(len(prompt_ids), max(1, max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - prompt_budget :]
        reply_ids = reply_ids[: max_length - len(prompt_ids)]
    input_ids = prompt_ids + reply_ids
    labels = list(input_ids) if loss_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + reply_ids
    return {"input_ids": input_ids, "labels": labels, "length": len(input_ids)}


@dataclass
class CompletionCollator:
    """Pads a list of tokenized examples into tensors.

    ``padding="longest"`` (the default) pads to the longest example in the batch, rounded up to
    ``pad_to_multiple_of`` (8 helps tensor cores on GPUs); ``"max_length"`` pads everything to ``max_length``.
    """

    pad_token_id: int
    padding: Literal["longest", "max_length"] = "longest"
    max_length: int = 512
    pad_to_multiple_of: int | None = None

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.padding == "max_length":
            width = max(self.max_length, longest)
        else:
            width = longest
            if self.pad_to_multiple_of:
                width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            input_ids[row, :n] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
