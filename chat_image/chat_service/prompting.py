"""The prompt, built here and nowhere else: which earlier turns go in (and the persona), how that context is cut,
the format it is written in, and the token bound. The rule is docs/contracts.md §2 "Prompt format", the trainer's.

Two formats, as the serving adapter's manifest says (`prompt.format`), else as the base model's tokenizer allows:

* `chat_template` — the tokenizer's chat template: a `system` turn (the persona), the session's earlier turns, the
  user turn, rendered with `add_generation_prompt`; the reply ends at EOS (the template's end of turn).
* `alpaca` — the spec's `Instruction/Input/Output` text, the earlier turns as `<role>: <content>` lines in `input`.

`prompt_rules` says how one character's prompt is built with the adapter it serves; `build_prompt` picks the context
for a request; `prompt_ids` writes and tokenizes it.
"""

from __future__ import annotations

import hashlib
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # types only: generation imports this module
    from .characters import Character
    from .config import Settings
    from .generation import AdapterStatus

DEFAULT_PROMPT_TEMPLATE = "Instruction: {instruction}\nInput: {input}\nOutput: "
PromptFormat = Literal["chat_template", "alpaca"]


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass(frozen=True)
class PromptRules:
    """How one character's prompt is built while it serves one adapter (or the base model)."""

    template: str  # alpaca: the text around the instruction and its context
    context_turns: int  # earlier non-empty turns in the prompt
    context_chars: int  # their characters: alpaca cuts its input to the last this many, chat keeps whole turns
    persona: str  # the system turn; alpaca: a `system:` line in the input, for the base model only
    format: PromptFormat = "alpaca"


def template_sha256(template: str) -> str:
    """The chat template's identity, as the trainer records it in the manifest (`prompt.template_sha256`)."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ManifestPrompt:
    """How an adapter was trained to be prompted (its manifest's `prompt`)."""

    format: PromptFormat = "alpaca"
    template: str = DEFAULT_PROMPT_TEMPLATE  # alpaca
    system: str = ""  # chat_template: the system turn it was trained with
    template_sha256: str | None = None  # chat_template: the tokenizer's template it was trained with


def manifest_prompt(manifest: Mapping[str, Any]) -> ManifestPrompt:
    """Schema 2's `prompt`, or schema 1's `prompt_template` (the Alpaca format); `ValueError` says what is wrong."""
    prompt = manifest.get("prompt")
    if prompt is None:
        return ManifestPrompt("alpaca", _alpaca_template(manifest.get("prompt_template", DEFAULT_PROMPT_TEMPLATE),
                                                         "prompt_template"))
    if not isinstance(prompt, dict):
        raise ValueError("'prompt' must be an object")
    if prompt.get("format") == "alpaca":
        return ManifestPrompt("alpaca", _alpaca_template(prompt.get("template", DEFAULT_PROMPT_TEMPLATE),
                                                         "prompt.template"))
    if prompt.get("format") != "chat_template":
        raise ValueError(f"'prompt.format' is {prompt.get('format')!r}, not 'chat_template' or 'alpaca'")
    digest, system = prompt.get("template_sha256"), prompt.get("system", "")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError("'prompt.template_sha256' must be a SHA-256 hex digest")
    if not isinstance(system, str):
        raise ValueError("'prompt.system' must be a string")
    return ManifestPrompt("chat_template", system=system, template_sha256=digest)


def _alpaca_template(template: Any, key: str) -> str:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None} \
        if isinstance(template, str) else set()
    if "instruction" not in fields:
        raise ValueError(f"'{key}' must be a string with {{instruction}}")
    if fields - {"instruction", "input"}:
        raise ValueError(f"'{key}' has unknown fields {sorted(fields - {'instruction', 'input'})}")
    return template


def template_mismatch(prompt: ManifestPrompt, chat_template: str | None) -> str | None:
    """Why the base tokenizer cannot render the prompts this adapter was trained on; `None` when it can."""
    if prompt.format != "chat_template":
        return None
    trained = (prompt.template_sha256 or "")[:12]
    if not chat_template:
        return f"trained with a chat template (sha256 {trained}…); the base tokenizer has none"
    serving = template_sha256(chat_template)
    if serving != prompt.template_sha256:
        return f"trained with chat template sha256 {trained}…; the base tokenizer's is {serving[:12]}…"
    return None


def prompt_rules(
    settings: Settings, character: Character, adapter: AdapterStatus, chat_template: str | None = None
) -> PromptRules:
    """What the serving adapter was trained with (manifest `prompt`, `data.context_turns`, `data.context_chars`),
    else the settings (CHAT_CONTEXT_MESSAGES, CHAT_CONTEXT_CHARS) and the base tokenizer's `chat_template`, if any.

    A chat-template adapter is served with the system turn it was trained with (the manifest's `prompt.system`).
    An Alpaca adapter learned its character from history, which has no persona line, so there the persona is used
    only for the base model, which knows nothing about the character otherwise.
    """
    if adapter.state != "loaded":
        return PromptRules(DEFAULT_PROMPT_TEMPLATE, settings.context_messages, settings.context_chars,
                           character.persona, "chat_template" if chat_template else "alpaca")
    return PromptRules(
        template=adapter.prompt_template,
        context_turns=settings.context_messages if adapter.context_turns is None else adapter.context_turns,
        context_chars=settings.context_chars if adapter.context_chars is None else adapter.context_chars,
        persona=adapter.system if adapter.prompt_format == "chat_template" else "",
        format=adapter.prompt_format,
    )


@dataclass(frozen=True)
class Prompt:
    rules: PromptRules
    instruction: str
    context: tuple[Turn, ...]  # the persona first (if any, as a `system` turn), then earlier turns, oldest first


def build_prompt(rules: PromptRules, instruction: str, earlier: Sequence[Turn] = ()) -> Prompt:
    """The prompt for `instruction` after the `earlier` turns of the conversation (oldest first): its last
    `rules.context_turns` non-empty turns (empty messages are skipped, as the trainer does), the persona in front.
    Chat template: of those, the most recent whole turns within `rules.context_chars` characters."""
    count = rules.context_turns
    turns = [t for t in earlier if t.content.strip()][-count:] if count else []
    if rules.format == "chat_template":
        turns = _within_chars(turns, rules.context_chars)
    if rules.persona:
        turns = [Turn("system", rules.persona), *turns]
    return Prompt(rules, instruction, tuple(turns))


def _within_chars(turns: Sequence[Turn], max_chars: int) -> list[Turn]:
    kept: list[Turn] = []
    for turn in reversed(turns):
        max_chars -= len(turn.content)
        if max_chars < 0:
            break
        kept.insert(0, turn)
    return kept


def format_context(turns: Sequence[Turn], max_chars: int) -> str:
    """The Alpaca prompt's `input`: earlier turns of the session, oldest first, one `<role>: <content>` per turn joined
    by newlines, cut to its last `max_chars` characters (the most recent part is what the reply answers).

    This is the trainer's rule for the Alpaca `input` (training/data.py), so an adapter trained with context sees the
    same text when serving. `system` turns (the persona, base model only) come first and are never cut.
    """
    fixed = [f"{t.role}: {t.content}" for t in turns if t.role == "system"]
    text = "\n".join(f"{t.role}: {t.content}" for t in turns if t.role != "system")
    if len(text) > max_chars:
        text = text[-max_chars:] if max_chars > 0 else ""
    return "\n".join([*fixed, text] if text else fixed)


def conversation(system: str, earlier: Sequence[Turn], instruction: str) -> list[dict[str, str]]:
    """The chat template's messages: the system turn (if any), the earlier turns, the user turn. Empty earlier turns
    are left out, consecutive turns of one role joined by a newline and leading assistant turns dropped (templates
    such as Mistral's and Gemma's want alternating turns that start with the user)."""
    turns: list[dict[str, str]] = []
    for role, content in [*((t.role, t.content) for t in earlier if t.content.strip()), ("user", instruction)]:
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n" + content
        elif turns or role == "user":
            turns.append({"role": role, "content": content})
    return ([{"role": "system", "content": system}] if system else []) + turns


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat template applied with the generation prompt. A template without a system role (it raises, as
    Gemma's does) gets the system text in front of the first user turn, separated by a blank line."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError:
        if len(messages) < 2 or messages[0]["role"] != "system":
            raise
    system, first, *rest = messages
    folded = [{"role": first["role"], "content": f"{system['content']}\n\n{first['content']}"}, *rest]
    return tokenizer.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)


def prompt_ids(prompt: Prompt, tokenizer: Any, max_tokens: int) -> list[int]:
    """Token ids of the prompt, bounded to `max_tokens` (CHAT_MAX_PROMPT_TOKENS).

    Rule: drop context turns oldest first until the prompt fits — Alpaca: the persona, which stands first, goes first;
    chat template: the persona goes after every earlier turn; if the prompt without context still does not fit, keep
    its last `max_tokens` tokens (the end of the message and the reply cue). Special tokens are the template's own
    text: the tokenizer adds none.
    """
    turns = list(prompt.context)
    while True:
        ids = tokenizer(_text(prompt, turns, tokenizer), add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens or not turns:
            return ids[-max_tokens:]
        earlier = [t for t in turns if t.role != "system"]
        if prompt.rules.format == "chat_template" and earlier:
            turns.remove(earlier[0])
        else:
            turns = turns[1:]


def _text(prompt: Prompt, turns: Sequence[Turn], tokenizer: Any) -> str:
    rules = prompt.rules
    if rules.format == "alpaca":
        return rules.template.format(instruction=prompt.instruction, input=format_context(turns, rules.context_chars))
    system = next((t.content for t in turns if t.role == "system"), "")
    return render_chat(tokenizer, conversation(system, [t for t in turns if t.role != "system"], prompt.instruction))
