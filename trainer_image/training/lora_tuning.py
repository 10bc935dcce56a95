"""Monthly LoRA fine-tuning of one character: collect → Alpaca → train → evaluate → publish.

Keeps the public surface of the original spec (``CharacterFineTuning``) and is the trainer image's entry point::

    python -m training.lora_tuning --character lumina --epochs 3 --history-url http://chat:8000

Contracts: docs/contracts.md §1 (history API), §2 (adapter layout and manifest), §3 (result JSON), §4 (flags).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, set_seed

from . import __version__
from .data import PROMPT_TEMPLATE, DataError, Example, pair_messages, split_by_session
from .evaluate import adapter_disabled, eval_loss, sample_replies
from .history import HistoryClient, read_history_file, rfc3339
from .publish import character_dir, check_writable, list_versions, prune, publish, version_for
from .result import Result, default_result_file, emit
from .train import train_lora

log = logging.getLogger("training")

SAMPLE_COUNT = 3
# Context in the Alpaca `input` is cut to its last this many characters; the chat service cuts the same way
# (CHAT_CONTEXT_CHARS, default 1000), and the manifest records it.
CONTEXT_CHARS = 1000
T = TypeVar("T")


class InsufficientDataError(ValueError):
    """Too few usable examples: the run is *skipped*, not failed."""

    def __init__(self, message: str, pairs: int) -> None:
        super().__init__(message)
        self.pairs = pairs

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:  # sent between processes under torchrun
        return (type(self), (str(self), self.pairs))


# A BaseException, like KeyboardInterrupt, so that no library's `except Exception` swallows it.
class Terminated(BaseException):
    """SIGTERM arrived (pod deletion, deadline): unwind so half-written work is cleaned up."""


def model_type_of(base_model: str) -> str | None:
    """The config's ``model_type``, read from a local directory or the hub cache — never the network, so that
    building a ``LoraConfig`` stays instant offline; ``None`` when the config is not at hand."""
    try:
        return AutoConfig.from_pretrained(base_model, local_files_only=True).model_type
    except (OSError, ValueError):
        return "gpt2" if "gpt2" in Path(base_model).name.lower() else None


def detect_target_modules(base_model: str) -> list[str] | None:
    """LoRA target modules for the model's architecture (GPT-2 ``c_attn``, llama-style ``q_proj``/``v_proj``...).

    ``None`` when the architecture is unknown or its config is not at hand: peft then resolves the modules itself
    from the loaded model.
    """
    modules = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type_of(base_model) or "")
    return list(modules) if isinstance(modules, list) else None


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _init_distributed() -> None:
    """Under torchrun (several processes), join the process group before collecting, so that rank 0 can share
    the data: every rank must train on exactly the same examples, and each fetching its own window a moment apart
    could differ. Trainer/accelerate reuse this group."""
    import torch
    import torch.distributed as dist

    if _world_size() <= 1 or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def _from_rank_zero(compute: Callable[[], T]) -> T:
    """``compute()`` on rank 0, its value (or its exception) handed to every rank; just ``compute()`` alone."""
    import torch.distributed as dist

    if _world_size() <= 1 or not dist.is_initialized():
        return compute()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, compute())]
        except Exception as exc:
            box = [(False, exc)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


@dataclass
class RunReport:
    version: str
    path: Path
    serving_version: str | None
    pairs: int
    train_examples: int
    eval_examples: int
    metrics: dict[str, float | None]
    manifest: dict[str, Any] = field(default_factory=dict)
    model: Any = field(default=None, repr=False)  # the trained peft model, for callers that keep using it


class CharacterFineTuning:
    """LoRA fine-tuning for one base model; the spec's class, made to train for real.

    The first four arguments are the spec's; the keyword-only rest configure data, training and publishing
    (the command line maps one flag to each).
    """

    def __init__(
        self,
        base_model: str = "gpt2",
        lora_r: int = 8,
        lora_alpha: int = 16,
        lora_dropout: float = 0.1,
        *,
        target_modules: Sequence[str] | None = None,
        output_root: str | Path = "models",
        history_url: str | None = None,
        history_file: str | Path | None = None,
        history_token: str | None = None,
        min_examples: int = 100,
        max_examples: int | None = None,
        learning_rate: float = 3e-4,
        max_length: int = 512,
        gradient_accumulation_steps: int = 1,
        seed: int = 42,
        serving_version: str | None = None,
        keep_versions: int = 5,
        context_turns: int = 0,
        eval_fraction: float = 0.1,
        logging_steps: int = 10,
    ) -> None:
        self.base_model = base_model
        self.lora_r = lora_r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.target_modules = list(target_modules) if target_modules else None
        self.output_root = Path(output_root)
        self.history_url = history_url
        self.history_file = history_file
        self.history_token = history_token if history_token is not None else os.environ.get("HISTORY_TOKEN")
        self.min_examples = min_examples
        self.max_examples = max_examples
        self.learning_rate = learning_rate
        self.max_length = max_length
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.seed = seed
        self.serving_version = serving_version
        self.keep_versions = keep_versions
        self.context_turns = context_turns
        self.eval_fraction = eval_fraction
        self.logging_steps = logging_steps
        self.prompt_template = PROMPT_TEMPLATE
        self._lora_config: LoraConfig | None = None

    @property
    def lora_config(self) -> LoraConfig:
        if self._lora_config is None:
            self._lora_config = LoraConfig(
                r=self.lora_r,
                lora_alpha=self.lora_alpha,
                lora_dropout=self.lora_dropout,
                target_modules=self.target_modules or detect_target_modules(self.base_model),
                # GPT-2 keeps its projections in Conv1D layers, whose weights are stored transposed.
                fan_in_fan_out=model_type_of(self.base_model) == "gpt2",
                bias="none",
                task_type=TaskType.CAUSAL_LM,
            )
        return self._lora_config

    # -- data ---------------------------------------------------------------------------------------------------

    def _collect_conversations(
        self, character_name: str, days: float = 30, *, until: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Messages of ``character_name`` in ``[until - days, until)`` (``until`` defaults to now)."""
        until = until or datetime.now(UTC)
        since = until - timedelta(days=days)
        if self.history_url:
            client = HistoryClient(self.history_url, self.history_token)
            messages = client.fetch(character_name, since, until)
        elif self.history_file:
            messages = read_history_file(self.history_file, character_name, since, until)
        else:
            raise ValueError("no history source: give --history-url or --history-file")
        log.info("collected %d messages for %s in [%s, %s)", len(messages), character_name, rfc3339(since),
                 rfc3339(until))
        return messages

    def _create_training_data(self, conversations: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
        """Alpaca records (``instruction``/``input``/``output``) from messages; rules in ``training.data``."""
        pairing = pair_messages(conversations, context_turns=self.context_turns, context_chars=CONTEXT_CHARS)
        return [e.alpaca() for e in pairing.examples]

    # -- model --------------------------------------------------------------------------------------------------

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        if tokenizer.pad_token is None:
            # Padding positions are masked out of attention and loss, so reusing EOS is safe.
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def _load_base(self) -> Any:
        return AutoModelForCausalLM.from_pretrained(self.base_model)

    def load_lora_model(self, character_name: str, version: str | None = None) -> PeftModel:
        """Base model + the character's adapter (the given version, else the newest), in eval mode.

        Accepts both the volume layout ``<root>/lora_<c>/<version>/`` and the serving mount layout
        ``<root>/lora_<c>/adapter_config.json``. ``FileNotFoundError`` when there is no adapter.
        """
        directory = character_dir(self.output_root, character_name)
        if version is None and (directory / "adapter_config.json").is_file():
            path = directory
        else:
            versions = list_versions(self.output_root, character_name)
            chosen = version or (versions[-1] if versions else None)
            path = directory / chosen if chosen else directory
            if not chosen or not (path / "adapter_config.json").is_file():
                raise FileNotFoundError(f"no LoRA adapter for {character_name!r} at {path}")
        model = PeftModel.from_pretrained(self._load_base(), str(path))
        model.eval()
        return model

    # -- the run ------------------------------------------------------------------------------------------------

    def prepare_data(
        self, character_name: str, days: float, until: datetime
    ) -> tuple[int, dict[str, int], list[Example], list[Example]]:
        """Collect, pair, cap and split. Raises ``InsufficientDataError`` below ``min_examples``."""
        messages = self._collect_conversations(character_name, days, until=until)
        pairing = pair_messages(messages, context_turns=self.context_turns, context_chars=CONTEXT_CHARS)
        examples = pairing.examples
        if self.max_examples is not None and len(examples) > self.max_examples:
            examples = examples[-self.max_examples :]  # the newest: the character as it is now
        log.info("pairs: %d usable from %d messages, dropped %s", len(examples), pairing.messages,
                 pairing.dropped_dict())
        if len(examples) < self.min_examples:
            raise InsufficientDataError(
                f"too little data: {len(examples)} < {self.min_examples} examples", len(examples)
            )
        try:
            train, held_out = split_by_session(examples, self.eval_fraction)
        except DataError as exc:
            raise InsufficientDataError(f"too little data: {exc}", len(examples)) from exc
        return pairing.messages, pairing.dropped_dict(), train, held_out

    def run(
        self,
        character_name: str,
        num_epochs: float = 3,
        batch_size: int = 4,
        *,
        days: float = 30,
        started: datetime | None = None,
    ) -> RunReport | None:
        """The whole job. Returns ``None`` on non-zero ranks of a multi-process run (only rank 0 publishes)."""
        t0 = time.perf_counter()
        _init_distributed()
        moment = (started or datetime.now(UTC)).replace(microsecond=0)
        started, (messages, dropped, train, held_out) = _from_rank_zero(
            lambda: (moment, self.prepare_data(character_name, days, moment))
        )
        version = version_for(started)
        if _rank() == 0:
            # Before spending the training time: a version that exists or a volume we cannot write ends it now.
            check_writable(self.output_root, character_name, version)
        train_records = [e.alpaca() for e in train]
        eval_records = [e.alpaca() for e in held_out]
        log.info("split by session: %d train, %d eval examples", len(train_records), len(eval_records))

        set_seed(self.seed)  # LoRA's initial weights come from the RNG
        tokenizer = self._load_tokenizer()
        base = self._load_base()
        positions = getattr(base.config, "n_positions", None) or getattr(base.config, "max_position_embeddings", None)
        if positions and self.max_length > positions:
            # Longer inputs would index past the position embeddings.
            log.warning("max length %d exceeds the model's %d positions; using %d", self.max_length, positions,
                        positions)
            self.max_length = positions
        model = get_peft_model(base, self.lora_config)
        with tempfile.TemporaryDirectory(prefix="trainer-work-") as work_dir:
            trainer, stats = train_lora(
                model,
                tokenizer,
                train_records,
                work_dir=work_dir,
                epochs=num_epochs,
                batch_size=batch_size,
                learning_rate=self.learning_rate,
                max_length=self.max_length,
                gradient_accumulation_steps=self.gradient_accumulation_steps,
                seed=self.seed,
                logging_steps=self.logging_steps,
                prompt_template=self.prompt_template,
            )
        if not trainer.is_world_process_zero():
            return None

        metrics = self._evaluate(model, tokenizer, character_name, eval_records)
        samples = self._samples(model, tokenizer, eval_records)
        metrics.update(
            train_loss=round(stats.train_loss, 6),
            tokens_per_second=round(stats.tokens_per_second, 1),
            duration_seconds=round(time.perf_counter() - t0, 1),
        )
        target_modules = model.peft_config["default"].target_modules
        manifest = {
            "schema_version": 1,
            "character": character_name,
            "version": version,
            "base_model": self.base_model,
            "prompt_template": self.prompt_template,
            "trainer_version": __version__,
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "data": {
                "window_start": rfc3339(started - timedelta(days=days)),
                "window_end": rfc3339(started),
                "messages": messages,
                "pairs": len(train) + len(held_out),
                "train_examples": len(train),
                "eval_examples": len(held_out),
                "eval_sessions": len({e.session_id for e in held_out}),
                "context_turns": self.context_turns,
                "context_chars": CONTEXT_CHARS,
                "dropped": dropped,
            },
            "lora": {
                "r": self.lora_r,
                "alpha": self.lora_alpha,
                "dropout": self.lora_dropout,
                "target_modules": sorted(target_modules) if not isinstance(target_modules, str) else target_modules,
            },
            "training": {
                "epochs": num_epochs,
                "batch_size": batch_size,
                "gradient_accumulation_steps": self.gradient_accumulation_steps,
                "learning_rate": self.learning_rate,
                "max_length": self.max_length,
                "seed": self.seed,
                "steps": stats.steps,
                "tokens": stats.tokens,
            },
            "metrics": metrics,
            "samples": samples,
        }

        def write(directory: Path) -> None:
            model.save_pretrained(str(directory), selected_adapters=["default"], safe_serialization=True)
            # peft adds a hub model card; manifest.json is this layout's description (contract §2).
            (directory / "README.md").unlink(missing_ok=True)
            for name, records in (("train_data.json", train_records), ("eval_data.json", eval_records)):
                (directory / name).write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
            (directory / "manifest.json").write_text(
                json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8"
            )

        path = publish(self.output_root, character_name, version, write)
        protect = {self.serving_version} if self.serving_version else set()
        prune(self.output_root, character_name, self.keep_versions, protect | {version})
        return RunReport(
            version=version,
            path=path,
            serving_version=self.serving_version,
            pairs=len(train) + len(held_out),
            train_examples=len(train),
            eval_examples=len(held_out),
            metrics=metrics,
            manifest=manifest,
            model=model,
        )

    def _evaluate(
        self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, character_name: str, records: list[dict[str, str]]
    ) -> dict[str, float | None]:
        kwargs = {"max_length": self.max_length, "prompt_template": self.prompt_template}
        adapter = eval_loss(model, tokenizer, records, **kwargs)
        with adapter_disabled(model):
            base = eval_loss(model, tokenizer, records, **kwargs)
        serving = None
        if self.serving_version:
            path = character_dir(self.output_root, character_name) / self.serving_version
            if (path / "adapter_config.json").is_file():
                # Loaded next to the new adapter, so the base weights are shared rather than loaded twice.
                try:
                    model.load_adapter(str(path), adapter_name="serving")
                except Exception as exc:  # a broken or foreign adapter must not cost this month's training
                    log.warning("serving version %s cannot be loaded (%s); eval_loss_serving stays null",
                                self.serving_version, exc)
                else:
                    model.set_adapter("serving")
                    try:
                        serving = eval_loss(model, tokenizer, records, **kwargs)
                    finally:
                        model.set_adapter("default")
                        model.delete_adapter("serving")
            else:
                log.warning("serving version %s not found at %s; eval_loss_serving stays null",
                            self.serving_version, path)
        log.info("eval loss on %d held-out examples: base %.4f, serving %s, new adapter %.4f", len(records), base,
                 "n/a" if serving is None else f"{serving:.4f}", adapter)
        return {
            "eval_loss_base": round(base, 6),
            "eval_loss_serving": None if serving is None else round(serving, 6),
            "eval_loss_adapter": round(adapter, 6),
        }

    def _samples(
        self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, records: list[dict[str, str]]
    ) -> list[dict[str, str]]:
        chosen = records[:SAMPLE_COUNT]
        kwargs = {"prompt_template": self.prompt_template}
        with adapter_disabled(model):
            before = sample_replies(model, tokenizer, chosen, **kwargs)
        after = sample_replies(model, tokenizer, chosen, **kwargs)
        return [
            {"instruction": r["instruction"][:160], "reference": r["output"][:160], "before": b, "after": a}
            for r, b, a in zip(chosen, before, after, strict=True)
        ]

    def fine_tune_character(self, character_name: str, num_epochs: int = 3, batch_size: int = 4) -> str:
        """The spec's method: train and publish; returns the published adapter directory."""
        report = self.run(character_name, num_epochs, batch_size)
        return "" if report is None else str(report.path)


# -- command line (contract §4) ---------------------------------------------------------------------------------


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit(2) without a result JSON
        raise UsageError(message)


def _env(flag: str) -> str | None:
    return os.environ.get("TRAINER_" + flag.lstrip("-").upper().replace("-", "_"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m training.lora_tuning",
        description="Train a character's LoRA adapter from its recent conversations and publish it atomically. "
        "Every flag can also be set with the environment variable TRAINER_<FLAG> (e.g. TRAINER_BASE_MODEL); "
        "flags win. The history API token is read only from the environment variable HISTORY_TOKEN.",
    )

    def add(flag: str, default: Any, kind: Any, help_text: str) -> None:
        env_name = "TRAINER_" + flag[2:].upper().replace("-", "_")
        env = os.environ.get(env_name)
        if env not in (None, ""):
            try:
                default = kind(env)
            except ValueError as exc:
                raise UsageError(f"{env_name}={env!r}: {exc}") from exc
        parser.add_argument(
            flag, type=kind, default=default, help=f"{help_text} (env {env_name}; default: %(default)s)"
        )

    add("--character", None, str, "character name (required)")
    add("--base-model", "gpt2", str, "base model path or hub id, loaded with from_pretrained")
    add("--history-url", None, str, "chat service base URL serving GET /v1/history")
    add("--history-file", None, str, "JSON Lines history file (offline alternative to --history-url)")
    add("--days", 30.0, float, "collect the window [now - days, now)")
    add("--min-examples", 100, int, "fewer usable pairs than this ends the run as skipped")
    add("--max-examples", None, int, "use at most this many pairs, the newest")
    add("--epochs", 3.0, float, "training epochs")
    add("--batch-size", 4, int, "examples per device per step")
    add("--gradient-accumulation-steps", 1, int, "steps to accumulate before each optimizer update")
    add("--learning-rate", 3e-4, float, "peak learning rate (linear decay)")
    add("--max-length", 512, int, "maximum tokens per example (prompt + reply)")
    add("--lora-r", 8, int, "LoRA rank")
    add("--lora-alpha", 16, int, "LoRA alpha")
    add("--lora-dropout", 0.1, float, "LoRA dropout")
    add("--target-modules", "auto", str, "comma-separated module names, or 'auto' to pick them for the architecture")
    add("--context-turns", 0, int, "earlier turns of the session put into the Alpaca 'input' (0: none)")
    add("--eval-fraction", 0.1, float, "share of sessions held out for evaluation (by session hash)")
    add("--output-root", "/adapters", str, "adapter volume root; versions go to <root>/lora_<character>/<version>/")
    add("--serving-version", None, str, "version serving now: evaluated against and never pruned")
    add("--keep-versions", 5, int, "published versions kept per character")
    add("--result-file", default_result_file(), str, "where the result JSON goes (also printed as stdout's last line)")
    add("--seed", 42, int, "random seed")
    add("--log-level", "INFO", str, "logging level")
    return parser


def _check(args: argparse.Namespace) -> None:
    if not args.character:
        raise UsageError("--character is required")
    if bool(args.history_url) == bool(args.history_file):
        raise UsageError("give exactly one of --history-url or --history-file")
    positive = ("days", "min_examples", "batch_size", "gradient_accumulation_steps", "max_length", "lora_r",
                "lora_alpha", "keep_versions", "epochs", "learning_rate")
    for name in positive:
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.max_examples is not None and args.max_examples < args.min_examples:
        raise UsageError("--max-examples must be at least --min-examples")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError("--lora-dropout must be in [0, 1)")
    if not 0 < args.eval_fraction < 1:
        raise UsageError("--eval-fraction must be in (0, 1)")
    if args.context_turns < 0:
        raise UsageError("--context-turns must be 0 or more")


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
    return _env("--result-file") or default_result_file()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        _check(args)
    except UsageError as exc:
        character = _env("--character") or ""
        emit(Result("failed", character, reason=f"usage: {exc}"), _result_file_hint(argv))
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    previous_handler = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run_cli(args)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def _run_cli(args: argparse.Namespace) -> int:
    modules = None if args.target_modules.strip().lower() == "auto" else args.target_modules.split(",")
    tuner = CharacterFineTuning(
        args.base_model,
        args.lora_r,
        args.lora_alpha,
        args.lora_dropout,
        target_modules=[m.strip() for m in modules if m.strip()] if modules else None,
        output_root=args.output_root,
        history_url=args.history_url,
        history_file=args.history_file,
        min_examples=args.min_examples,
        max_examples=args.max_examples,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=args.seed,
        serving_version=args.serving_version,
        keep_versions=args.keep_versions,
        context_turns=args.context_turns,
        eval_fraction=args.eval_fraction,
    )
    exit_code: int | None = None
    epochs = int(args.epochs) if float(args.epochs).is_integer() else args.epochs
    try:
        report = tuner.run(args.character, epochs, args.batch_size, days=args.days)
    except InsufficientDataError as exc:
        log.warning("skipped: %s", exc)
        result = Result("skipped", args.character, serving_version=args.serving_version,
                        examples={"pairs": exc.pairs}, reason=str(exc))
    except Terminated:
        log.error("terminated by SIGTERM; nothing published")
        result = Result("failed", args.character, serving_version=args.serving_version,
                        reason="terminated by SIGTERM before publishing")
        exit_code = 128 + signal.SIGTERM
    except Exception as exc:
        log.exception("training failed")
        result = Result("failed", args.character, serving_version=args.serving_version,
                        reason=f"{type(exc).__name__}: {exc}")
    else:
        if report is None:
            return 0  # not rank 0: rank 0 reports for the whole job
        result = Result(
            "trained",
            args.character,
            version=report.version,
            path=str(report.path.relative_to(Path(args.output_root))),
            serving_version=report.serving_version,
            examples={"pairs": report.pairs, "train": report.train_examples, "eval": report.eval_examples},
            metrics=report.metrics,
        )
    if _rank() == 0:  # under torchrun every rank gets here; one result for the job
        emit(result, args.result_file)
    return exit_code if exit_code is not None else result.exit_code


if __name__ == "__main__":
    sys.exit(main())
