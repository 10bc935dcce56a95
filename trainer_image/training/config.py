"""The trainer's knobs, each written once.

``TrainerConfig`` is the one list: ``CharacterFineTuning`` takes its fields as keyword arguments, and the command line
(contract §4) derives one flag ``--<name>`` and one environment variable ``TRAINER_<NAME>`` from every field marked
``cli`` (``-`` in the flag, ``_`` in the variable). Nothing here reads the environment until asked to.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "TRAINER_"
# The history API token comes only from this environment variable (a Secret in the pod), never from a flag.
HISTORY_TOKEN_ENV = "HISTORY_TOKEN"


class UsageError(Exception):
    """A flag or ``TRAINER_*`` value the trainer cannot run with."""


def number(text: str) -> float:
    """A float that stays an int when it is whole: ``--epochs 1`` is recorded as ``1``, not ``1.0``."""
    value = float(text)
    return int(value) if value.is_integer() else value


def knob(
    default: Any,
    help: str,
    *,
    parse: Callable[[str], Any] = str,
    positive: bool = False,
    cli: bool = True,
    cli_default: Any = dataclasses.MISSING,
    secret: bool = False,
) -> Any:
    """A ``TrainerConfig`` field: ``parse`` reads its flag or environment text; ``cli_default`` replaces ``default``
    on the command line only."""
    metadata = {"help": help, "parse": parse, "positive": positive, "cli": cli, "cli_default": cli_default}
    return dataclasses.field(default=default, metadata=metadata, repr=not secret)


# `knob` returns a dataclasses.Field, as `field` does: ruff's RUF009 cannot tell, hence the two `noqa` for paths.
@dataclass
class TrainerConfig:
    character: str | None = knob(None, "character name (required)")
    base_model: str = knob("gpt2", "base model path or hub id, loaded with from_pretrained")
    history_url: str | None = knob(None, "chat service base URL serving GET /v1/history")
    history_file: str | Path | None = knob(  # noqa: RUF009
        None, "JSON Lines history file (offline alternative to --history-url)")
    days: float = knob(30.0, "collect the window [now - days, now)", parse=float, positive=True)
    min_examples: int = knob(100, "fewer usable pairs than this ends the run as skipped", parse=int, positive=True)
    max_examples: int | None = knob(None, "use at most this many pairs, the newest", parse=int)
    epochs: float = knob(3, "training epochs", parse=number, positive=True)
    batch_size: int = knob(4, "examples per device per step", parse=int, positive=True)
    gradient_accumulation_steps: int = knob(1, "steps to accumulate before each optimizer update", parse=int,
                                            positive=True)
    learning_rate: float = knob(3e-4, "peak learning rate (linear decay)", parse=float, positive=True)
    max_length: int = knob(512, "maximum tokens per example (prompt + reply)", parse=int, positive=True)
    lora_r: int = knob(8, "LoRA rank", parse=int, positive=True)
    lora_alpha: int = knob(16, "LoRA alpha", parse=int, positive=True)
    lora_dropout: float = knob(0.1, "LoRA dropout", parse=float)
    target_modules: str | Sequence[str] | None = knob(
        "auto", "comma-separated module names, or 'auto' to pick them for the architecture")
    context_turns: int = knob(
        0, "earlier turns of the session in the prompt: the Alpaca 'input', or chat turns (0: none)", parse=int)
    persona: str | None = knob(
        None, "system turn of chat-template prompts; none: the character's persona as the chat service lists it "
        "(GET /v1/characters) with --history-url, else no system turn")
    eval_fraction: float = knob(0.1, "share of sessions held out for evaluation (by session hash)", parse=float)
    # The spec saves under ./models; the pod's adapter volume is mounted at /adapters (contract §4).
    output_root: str | Path = knob(  # noqa: RUF009
        "models", "adapter volume root; versions go to <root>/lora_<character>/<version>/", cli_default="/adapters")
    serving_version: str | None = knob(None, "version serving now: evaluated against and never pruned")
    keep_versions: int = knob(5, "published versions kept per character", parse=int, positive=True)
    result_file: str | None = knob(
        None, "where the result JSON goes (also printed as stdout's last line; none: /dev/termination-log if it "
        "exists)")
    seed: int = knob(42, "random seed", parse=int)
    log_level: str = knob("INFO", "logging level")
    logging_steps: int = knob(10, "training progress is logged every this many steps", parse=int, cli=False)
    history_token: str | None = knob(None, f"history API bearer token; none: ${HISTORY_TOKEN_ENV}", cli=False,
                                     secret=True)

    def validate(self) -> None:
        """What the command line refuses before starting; ``UsageError`` names the flag."""
        if not self.character:
            raise UsageError("--character is required")
        if bool(self.history_url) == bool(self.history_file):
            raise UsageError("give exactly one of --history-url or --history-file")
        for spec in cli_fields():
            value = getattr(self, spec.name)
            if spec.metadata["positive"] and value <= 0:
                raise UsageError(f"{flag_name(spec.name)} must be positive, got {value}")
        if self.max_examples is not None and self.max_examples < self.min_examples:
            raise UsageError("--max-examples must be at least --min-examples")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError("--lora-dropout must be in [0, 1)")
        if not 0 < self.eval_fraction < 1:
            raise UsageError("--eval-fraction must be in (0, 1)")
        if self.context_turns < 0:
            raise UsageError("--context-turns must be 0 or more")


def cli_fields() -> Iterator[dataclasses.Field[Any]]:
    return (spec for spec in dataclasses.fields(TrainerConfig) if spec.metadata["cli"])


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def cli_default(spec: dataclasses.Field[Any], environ: Mapping[str, str]) -> Any:
    """The value a flag takes when it is not given: its ``TRAINER_*`` variable (a malformed one is a usage error,
    not a silent default), else its default."""
    name = env_name(spec.name)
    text = environ.get(name)
    if text not in (None, ""):
        try:
            return spec.metadata["parse"](text)
        except ValueError as exc:
            raise UsageError(f"{name}={text!r}: {exc}") from exc
    return spec.default if spec.metadata["cli_default"] is dataclasses.MISSING else spec.metadata["cli_default"]


def module_list(target_modules: str | Sequence[str] | None) -> list[str] | None:
    """``"auto"``, ``None`` or empty → ``None`` (pick for the architecture); ``"a, b"`` or ``["a", "b"]`` → a list."""
    if isinstance(target_modules, str):
        if target_modules.strip().lower() == "auto":
            return None
        target_modules = target_modules.split(",")
    modules = [m.strip() for m in target_modules or () if m.strip()]
    return modules or None
