"""The prompt-format test vector of docs/contracts.md §2, for the trainer's and the chat service's contract tests:
both render it with `vector_tokenizer()` and compare with the vector's `prompt` and `reply`."""

from __future__ import annotations

import json
import re
from typing import Any

from devkit.paths import DOCS


def prompt_vector() -> dict[str, Any]:
    """The JSON block of docs/contracts.md that holds a `chat_template`."""
    text = (DOCS / "contracts.md").read_text(encoding="utf-8")
    for block in re.findall(r"```json\n(.*?)```", text, flags=re.S):
        if '"chat_template":' in block:
            return json.loads(block)
    raise LookupError("docs/contracts.md has no prompt-format test vector")


def vector_tokenizer(vector: dict[str, Any] | None = None) -> Any:
    """A byte-level tokenizer (one token per byte, plus the vector's EOS as a special token) carrying the vector's
    chat template: enough to render, tokenize and decode the vector exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vector = vector or prompt_vector()
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=vector["eos_token"])
    tokenizer.chat_template = vector["chat_template"]
    return tokenizer
