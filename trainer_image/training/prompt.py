"""The tokens before a reply and the reply the model learns: built here and nowhere else (training, evaluation,
samples). The rule is docs/contracts.md §2 "Prompt format"; the chat service builds the same tokens for serving.

* ``chat_template`` — the base model's tokenizer has a chat template: the messages are a ``system`` turn (the
  character's persona), the session's earlier turns and the user turn, rendered with ``add_generation_prompt``;
  the reply is what the template writes after that prompt for the assistant's message, up to and including the
  first EOS (the end of turn).
* ``alpaca`` — no template: the spec's ``Instruction/Input/Output`` text, then the reply and EOS.

Training records stay Alpaca records (``instruction``, ``input``, ``output``); with context they also carry
``history``, the earlier turns as ``{"role", "content"}`` objects, which ``input`` holds as text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from jinja2 import TemplateError

if TYPE_CHECKING:  # data.py imports this module; it need not load transformers
    from transformers import PreTrainedTokenizerBase

PROMPT_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nOutput: "

Record = Mapping[str, Any]


class PromptFormatError(ValueError):
    """The base model's chat template cannot be used by the contract's rule."""


@dataclass(frozen=True)
class PromptFormat:
    """How one run renders its records: recorded in the manifest (``prompt``), which the chat service follows."""

    name: Literal["chat_template", "alpaca"] = "alpaca"
    system: str = ""  # chat_template: the system turn (the persona); empty: none
    template: str = PROMPT_TEMPLATE  # alpaca: the text before the reply
    template_sha256: str | None = None  # chat_template: the tokenizer's template it was trained with

    def manifest(self) -> dict[str, Any]:
        if self.name == "chat_template":
            return {"format": "chat_template", "template_sha256": self.template_sha256, "system": self.system}
        return {"format": "alpaca", "template": self.template}


ALPACA = PromptFormat()


def template_sha256(template: str) -> str:
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def prompt_format_for(tokenizer: PreTrainedTokenizerBase, system: str = "") -> PromptFormat:
    """The chat template when the tokenizer has one (the persona as ``system``), else the spec's Alpaca text."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template.strip():
        return PromptFormat("chat_template", system=system, template_sha256=template_sha256(template))
    return ALPACA


def conversation(system: str, history: Sequence[Mapping[str, str]], instruction: str) -> list[dict[str, str]]:
    """The messages for the chat template: the system turn (if any), the earlier turns, the user turn. Empty earlier
    turns are left out, consecutive turns of one role are joined by a newline and leading assistant turns dropped
    (templates such as Mistral's and Gemma's want alternating turns that start with the user)."""
    turns: list[dict[str, str]] = []
    for role, content in [*((t["role"], t["content"]) for t in history if t["content"].strip()),
                          ("user", instruction)]:
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + content
        elif turns or role == "user":
            turns.append({"role": role, "content": content})
    return ([{"role": "system", "content": system}] if system else []) + turns


def context_within(turns: Sequence[Mapping[str, str]], max_turns: int, max_chars: int) -> list[dict[str, str]]:
    """The earlier turns a prompt carries: the last ``max_turns`` non-empty ones, and of those the most recent whole
    turns whose contents add up to at most ``max_chars`` characters."""
    recent = [t for t in turns if t["content"].strip()][-max_turns:] if max_turns > 0 else []
    kept: list[dict[str, str]] = []
    room = max_chars
    for turn in reversed(recent):
        room -= len(turn["content"])
        if room < 0:
            break
        kept.insert(0, {"role": turn["role"], "content": turn["content"]})
    return kept


def render_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool
) -> str:
    """``apply_chat_template`` as text. A template without a system role (it raises, as Gemma's does) gets the
    system text in front of the first user turn, separated by a blank line."""
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError:
        if len(messages) < 2 or messages[0]["role"] != "system":
            raise
    system, first, *rest = messages
    folded = [{"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}, *rest]
    return tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=generation_prompt)


def ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template writes BOS and other special tokens as text; the tokenizer must not add them a second time.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_prompt(record: Record, fmt: PromptFormat = ALPACA, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The text before the reply for an Alpaca record (``instruction``, optional ``input`` and ``history``)."""
    if fmt.name == "alpaca":
        return fmt.template.format(instruction=record["instruction"], input=record.get("input", ""))
    if tokenizer is None:
        raise ValueError("a chat-template prompt needs the tokenizer")
    messages = conversation(fmt.system, record.get("history") or (), record["instruction"])
    return render_chat(tokenizer, messages, generation_prompt=True)


def reply_ids(record: Record, fmt: PromptFormat, tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The tokens the model learns after ``prompt``: the reply and the end of turn (EOS)."""
    eos_id, eos = tokenizer.eos_token_id, tokenizer.eos_token
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token; replies could not end")
    if fmt.name == "alpaca":
        return [*ids(tokenizer, record["output"]), eos_id]
    messages = conversation(fmt.system, record.get("history") or (), record["instruction"])
    full = render_chat(tokenizer, [*messages, {"role": "assistant", "content": record["output"]}],
                       generation_prompt=False)
    if not full.startswith(prompt):
        raise PromptFormatError("the chat template does not continue the prompt with the assistant's reply; "
                                "it cannot be trained by the contract's rule (docs/contracts.md §2)")
    suffix = full[len(prompt):]
    end = suffix.find(eos) if eos else -1
    if end >= 0:
        return ids(tokenizer, suffix[: end + len(eos)])
    return [*ids(tokenizer, suffix), eos_id]  # a template whose end of turn is not EOS: EOS still ends the reply


def prompt_ids(record: Record, fmt: PromptFormat, tokenizer: PreTrainedTokenizerBase, budget: int) -> list[int]:
    """The prompt's tokens within ``budget``. Chat template: earlier turns go first (oldest first), then the system
    turn; a prompt that still does not fit keeps its last ``budget`` tokens, as the Alpaca prompt does."""
    prompt = ids(tokenizer, render_prompt(record, fmt, tokenizer))
    if fmt.name == "chat_template":
        history = list(record.get("history") or ())
        system = fmt.system
        while len(prompt) > budget and (history or system):
            if history:
                history = history[1:]
            else:
                system = ""
            smaller = PromptFormat(fmt.name, system=system, template_sha256=fmt.template_sha256)
            prompt = ids(tokenizer, render_prompt({**record, "history": history}, smaller, tokenizer))
    return prompt[len(prompt) - budget :] if len(prompt) > budget else prompt
