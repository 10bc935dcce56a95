"""Tokenize Alpaca records for causal-LM fine-tuning and batch them.

Each example is the prompt and the reply as ``training.prompt`` builds them (the chat template, or the spec's Alpaca
text; the reply ends with EOS). Labels are ``-100`` on the prompt (and on
padding), so the loss is only on the reply the character should produce. Training batches carry no padding at all
(:class:`FlatteningCollator`: one row per batch, examples back to back); padded to their longest member instead, a
random batch of chat pairs would be about a quarter padding.

The spec's original setup (every example padded to 512, loss on prompt and reply) is still expressible with
``padding="max_length"`` and ``loss_on_prompt=True``, only so that benchmarks can compare the two honestly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from .prompt import PromptFormat, ids, prompt_format_for, prompt_ids, render_prompt, reply_ids

IGNORE_INDEX = -100


def tokenize_example(
    record: Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    prompt_format: PromptFormat | None = None,
    loss_on_prompt: bool = False,
) -> dict[str, list[int]]:
    """Token ids and labels for one record, in ``prompt_format`` (default: the tokenizer's own, without a persona).

    Too long for ``max_length``: the prompt keeps at most half of the budget (earlier turns and then the persona go
    first; then its *last* tokens, nearest the reply) and the reply is cut at the end, so every example still teaches
    at least the start of a reply.
    """
    fmt = prompt_format or prompt_format_for(tokenizer)
    prompt = render_prompt(record, fmt, tokenizer)
    head, reply = ids(tokenizer, prompt), reply_ids(record, fmt, tokenizer, prompt)
    if len(head) + len(reply) > max_length:
        head = prompt_ids(record, fmt, tokenizer, budget=min(len(head), max(1, max_length // 2)))
        reply = reply[: max_length - len(head)]
    input_ids = head + reply
    labels = list(input_ids) if loss_on_prompt else [IGNORE_INDEX] * len(head) + reply
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


@dataclass
class FlatteningCollator:
    """Packs a batch into one row without padding: the examples back to back, position ids restarting at each one.

    With no attention mask and restarting position ids, transformers attends only inside each example (a
    block-diagonal causal mask, or flash-attention's variable-length kernel), so the loss is the padded batch's
    without computing the padding. Only for training: nothing may reuse a cache across the packed examples.
    """

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        input_ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for feature in features:
            input_ids += feature["input_ids"]
            # An example's first label would be predicted from the previous example's last token; in a padded row
            # the shift drops it anyway.
            labels += [IGNORE_INDEX, *feature["labels"][1:]]
            positions += range(len(feature["input_ids"]))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "use_cache": False,  # with a cache, transformers would not derive the per-example mask
        }
