"""The trainer image's entry point (contract §4): command line → ``TrainerConfig`` → pipeline → result JSON::

    python -m training.lora_tuning --character lumina --epochs 3 --history-url http://chat:8000

Every flag and its ``TRAINER_*`` variable come from ``training.config``; the job itself is ``training.pipeline``.
The spec's ``CharacterFineTuning`` is importable from here, as in the spec. Contracts: docs/contracts.md §3 (result
JSON) and §4 (flags).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from .config import TrainerConfig, UsageError, cli_default, cli_fields, env_name, flag_name
from .distributed import rank
from .pipeline import CharacterFineTuning, InsufficientDataError, RunReport, run
from .result import Result, default_result_file, emit

__all__ = ["CharacterFineTuning", "build_parser", "main"]

log = logging.getLogger("training")


# A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it.
class Terminated(BaseException):
    """SIGTERM arrived (pod deletion, deadline): unwind so half-written work is cleaned up."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit(2) without a result JSON
        raise UsageError(message)


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """One flag per ``TrainerConfig`` field marked ``cli``; its ``TRAINER_*`` variable (read now) is its default."""
    environ = os.environ if environ is None else environ
    parser = _Parser(
        prog="python -m training.lora_tuning",
        description="Train a character's LoRA adapter from its recent conversations and publish it atomically. "
        "Every flag can also be set with the environment variable TRAINER_<FLAG> (e.g. TRAINER_BASE_MODEL); "
        "flags win. The history API token is read only from the environment variable HISTORY_TOKEN.",
    )
    for spec in cli_fields():
        parser.add_argument(
            flag_name(spec.name),
            type=spec.metadata["parse"],
            default=cli_default(spec, environ),
            help=f"{spec.metadata['help']} (env {env_name(spec.name)}; default: %(default)s)",
        )
    return parser


def parse_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> TrainerConfig:
    """The run's configuration from the command line and ``TRAINER_*``; ``UsageError`` when it cannot run."""
    config = TrainerConfig(**vars(build_parser(environ).parse_args(argv)))
    config.validate()
    return config


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(argv)
    except UsageError as exc:
        character = os.environ.get(env_name("character")) or ""
        emit(Result("failed", character, reason=f"usage: {exc}"), _result_file_hint(argv))
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        result, exit_code = _train_and_report(config)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    if result is not None and rank() == 0:  # under torchrun every rank gets here; one result for the job
        emit(result, config.result_file or default_result_file())
    return exit_code


def _train_and_report(config: TrainerConfig) -> tuple[Result | None, int]:
    """The run's result (``None`` on the ranks that do not report) and the exit code."""
    character = config.character or ""
    try:
        report = run(config)
    except InsufficientDataError as exc:
        log.warning("skipped: %s", exc)
        result = Result("skipped", character, serving_version=config.serving_version,
                        examples={"pairs": exc.pairs}, reason=str(exc))
    except Terminated:
        log.error("terminated by SIGTERM; nothing published")
        return Result("failed", character, serving_version=config.serving_version,
                      reason="terminated by SIGTERM before publishing"), 128 + signal.SIGTERM
    except Exception as exc:
        log.exception("training failed")
        result = Result("failed", character, serving_version=config.serving_version,
                        reason=f"{type(exc).__name__}: {exc}")
    else:
        if report is None:
            return None, 0  # not rank 0: rank 0 reports for the whole job
        result = _trained(config, report)
    return result, result.exit_code


def _trained(config: TrainerConfig, report: RunReport) -> Result:
    return Result(
        "trained",
        config.character or "",
        version=report.version,
        path=str(report.path.relative_to(Path(config.output_root))),
        serving_version=report.serving_version,
        examples={"pairs": report.pairs, "train": report.train_examples, "eval": report.eval_examples},
        metrics=report.metrics,
        compatibility=report.compatibility,
    )


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def _result_file_hint(argv: Sequence[str] | None) -> str | None:
    """Where the result goes when the command line itself is wrong: --result-file if it can be read, else its env."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--result-file" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--result-file="):
            return arg.split("=", 1)[1]
    return os.environ.get(env_name("result_file")) or default_result_file()


if __name__ == "__main__":
    sys.exit(main())
