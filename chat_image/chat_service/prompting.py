"""The prompt, built here and nowhere else: which earlier turns go in (and the persona), how that context is cut,
the template it is written into, and the token bound.

`prompt_rules` says how one character's prompt is built with the adapter it serves (the adapter's manifest, else
the settings); `build_prompt` picks the context for a request; `prompt_ids` writes and tokenizes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: generation imports this module
    from .characters import Character
    from .config import Settings
    from .generation import AdapterStatus

DEFAULT_PROMPT_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nOutput: "


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass(frozen=True)
class PromptRules:
    """How one character's prompt is built while it serves one adapter (or the base model)."""

    template: str
    context_turns: int  # earlier non-empty turns in the prompt's input
    context_chars: int  # that input is cut to its last this many characters
    persona: str  # put first as a `system` turn; empty when an adapter serves


def prompt_rules(settings: Settings, character: Character, adapter: AdapterStatus) -> PromptRules:
    """What the serving adapter was trained with (manifest `prompt_template`, `data.context_turns`,
    `data.context_chars`), else the settings (CHAT_CONTEXT_MESSAGES, CHAT_CONTEXT_CHARS).

    An adapter learned its character from history, which has no persona line, so the persona is used only for the
    base model, which knows nothing about the character otherwise.
    """
    if adapter.state != "loaded":
        return PromptRules(
            DEFAULT_PROMPT_TEMPLATE, settings.context_messages, settings.context_chars, character.persona
        )
    return PromptRules(
        template=adapter.prompt_template,
        context_turns=settings.context_messages if adapter.context_turns is None else adapter.context_turns,
        context_chars=settings.context_chars if adapter.context_chars is None else adapter.context_chars,
        persona="",
    )


@dataclass(frozen=True)
class Prompt:
    rules: PromptRules
    instruction: str
    context: tuple[Turn, ...]  # the persona first (base model only), then earlier turns, oldest first


def build_prompt(rules: PromptRules, instruction: str, earlier: Sequence[Turn] = ()) -> Prompt:
    """The prompt for `instruction` after the `earlier` turns of the conversation (oldest first): its last
    `rules.context_turns` non-empty turns (empty messages are skipped, as the trainer does), the persona in front."""
    count = rules.context_turns
    turns = [t for t in earlier if t.content.strip()][-count:] if count else []
    if rules.persona:
        turns = [Turn("system", rules.persona), *turns]
    return Prompt(rules, instruction, tuple(turns))


def format_context(turns: Sequence[Turn], max_chars: int) -> str:
    """The prompt's `input`: earlier turns of the session, oldest first, one `<role>: <content>` per turn joined by
    newlines, cut to its last `max_chars` characters (the most recent part is what the reply answers).

    This is the trainer's rule for the Alpaca `input` (training/data.py), so an adapter trained with context sees the
    same text when serving. `system` turns (the persona, base model only) come first and are never cut.
    """
    fixed = [f"{t.role}: {t.content}" for t in turns if t.role == "system"]
    text = "\n".join(f"{t.role}: {t.content}" for t in turns if t.role != "system")
    if len(text) > max_chars:
        text = text[-max_chars:] if max_chars > 0 else ""
    return "\n".join([*fixed, text] if text else fixed)


def prompt_ids(prompt: Prompt, tokenize: Callable[[str], list[int]], max_tokens: int) -> list[int]:
    """Token ids of the prompt, bounded to `max_tokens` (CHAT_MAX_PROMPT_TOKENS).

    Rule: drop context turns oldest first (the persona, which stands first, goes first) until the prompt fits; if the
    prompt without context still does not fit, keep its last `max_tokens` tokens (the end of the message and the
    "Output: " cue).
    """
    template, max_chars = prompt.rules.template, prompt.rules.context_chars
    turns = list(prompt.context)
    while True:
        text = template.format(instruction=prompt.instruction, input=format_context(turns, max_chars))
        ids = tokenize(text)
        if len(ids) <= max_tokens or not turns:
            return ids[-max_tokens:]
        turns = turns[1:]
