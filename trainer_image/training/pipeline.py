"""One character's monthly run: collect → pair and split → train → evaluate → publish.

``run`` reads top to bottom as the job does; each step is a function below it. ``CharacterFineTuning`` (the spec's
class) is the same pipeline behind the spec's methods. Contracts: docs/contracts.md §1 (history API) and §2
(adapter layout and manifest).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedTokenizerBase, set_seed

from .compat import targeted_layers, vllm_compatibility
from .config import HISTORY_TOKEN_ENV, TrainerConfig
from .data import DataError, PairingResult, PreparedData, pair_messages, split_by_session
from .distributed import from_rank_zero, init_distributed, rank
from .evaluate import before_after_samples, held_out_losses
from .history import HistoryClient, fetch_persona, read_history_file, rfc3339
from .manifest import build_manifest
from .model import build_lora_config, fit_max_length, load_adapter, load_base, load_tokenizer
from .pausing import pause_point
from .prompt import PromptFormat, prompt_format_for
from .publish import character_dir, check_writable, prune, publish, version_for
from .train import TrainStats, train_lora

log = logging.getLogger("training")


class InsufficientDataError(ValueError):
    """Too few usable examples: the run is *skipped*, not failed."""

    def __init__(self, message: str, pairs: int) -> None:
        super().__init__(message)
        self.pairs = pairs

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:  # sent between processes under torchrun
        return (type(self), (str(self), self.pairs))


@dataclass
class RunReport:
    version: str
    path: Path
    serving_version: str | None
    pairs: int
    train_examples: int
    eval_examples: int
    metrics: dict[str, float | None]
    compatibility: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    model: Any = field(default=None, repr=False)  # the trained peft model, for callers that keep using it


def run(config: TrainerConfig, *, started: datetime | None = None) -> RunReport | None:
    """The whole job for ``config.character``. Returns ``None`` on the non-zero ranks of a multi-process run
    (only rank 0 evaluates and publishes)."""
    t0 = time.perf_counter()
    character = _character(config)
    init_distributed()
    moment = (started or datetime.now(UTC)).replace(microsecond=0)
    # Rank 0's clock, data and persona for every rank: the same window, examples, prompts and version.
    started, data, persona = from_rank_zero(lambda: (moment, prepare_data(config, moment), persona_for(config)))
    version = version_for(started)
    if rank() == 0:
        # Before spending the training time: a version that exists or a volume we cannot write ends it now.
        check_writable(config.output_root, character, version)

    model, tokenizer, config = load_for_training(config)
    prompt_format = prompt_format_for(tokenizer, persona)
    log.info("prompt format: %s", prompt_format.manifest())
    stats, is_main_process = train(model, tokenizer, data, config, prompt_format)
    if not is_main_process:
        return None

    eval_records = data.eval_records()
    metrics = held_out_losses(model, tokenizer, eval_records, serving_path=_serving_path(config),
                              max_length=config.max_length, prompt_format=prompt_format)
    pause_point("evaluate", "after the held-out losses")
    samples = before_after_samples(model, tokenizer, eval_records, prompt_format=prompt_format)
    compatibility = engine_compatibility(model)
    metrics.update(
        train_loss=round(stats.train_loss, 6),
        tokens_per_second=round(stats.tokens_per_second, 1),
        duration_seconds=round(time.perf_counter() - t0, 1),
    )
    manifest = build_manifest(
        config, data, version=version, started=started, target_modules=model.peft_config["default"].target_modules,
        steps=stats.steps, tokens=stats.tokens, metrics=metrics, samples=samples, created_at=datetime.now(UTC),
        prompt=prompt_format.manifest(), compatibility=compatibility,
    )
    path = publish_version(config, version, model, data, manifest)
    return RunReport(
        version=version,
        path=path,
        serving_version=config.serving_version,
        pairs=len(data.train) + len(data.held_out),
        train_examples=len(data.train),
        eval_examples=len(data.held_out),
        metrics=metrics,
        compatibility=compatibility,
        manifest=manifest,
        model=model,
    )


# -- data -------------------------------------------------------------------------------------------------------


def collect(config: TrainerConfig, until: datetime) -> list[dict[str, Any]]:
    """The character's messages in ``[until - days, until)``, from the history API or the JSON Lines file."""
    character = _character(config)
    since = until - timedelta(days=config.days)
    if config.history_url:
        token = config.history_token if config.history_token is not None else os.environ.get(HISTORY_TOKEN_ENV)
        messages = HistoryClient(config.history_url, token).fetch(character, since, until)
    elif config.history_file:
        messages = read_history_file(config.history_file, character, since, until)
    else:
        raise ValueError("no history source: give --history-url or --history-file")
    log.info("collected %d messages for %s in [%s, %s)", len(messages), character, rfc3339(since), rfc3339(until))
    pause_point("collect", f"after reading {len(messages)} messages")
    return messages


def persona_for(config: TrainerConfig) -> str:
    """The system turn of chat-template prompts: ``--persona``, else the chat service's persona for the character."""
    if config.persona is not None:
        return config.persona
    return fetch_persona(config.history_url, _character(config)) if config.history_url else ""


def pair(config: TrainerConfig, messages: Sequence[dict[str, Any]]) -> PairingResult:
    """User turns paired with their replies (rules in ``training.data``)."""
    return pair_messages(messages, context_turns=config.context_turns)


def prepare_data(config: TrainerConfig, until: datetime) -> PreparedData:
    """Collect, pair, cap and split. Raises ``InsufficientDataError`` below ``min_examples``."""
    pairing = pair(config, collect(config, until))
    examples = pairing.examples
    if config.max_examples is not None and len(examples) > config.max_examples:
        examples = examples[-config.max_examples :]  # the newest: the character as it is now
    log.info("pairs: %d usable from %d messages, dropped %s", len(examples), pairing.messages,
             pairing.dropped_dict())
    if len(examples) < config.min_examples:
        raise InsufficientDataError(
            f"too little data: {len(examples)} < {config.min_examples} examples", len(examples)
        )
    try:
        train_examples, held_out = split_by_session(examples, config.eval_fraction)
    except DataError as exc:
        raise InsufficientDataError(f"too little data: {exc}", len(examples)) from exc
    log.info("split by session: %d train, %d eval examples", len(train_examples), len(held_out))
    return PreparedData(pairing.messages, pairing.dropped_dict(), train_examples, held_out)


# -- model and training -----------------------------------------------------------------------------------------


def load_for_training(config: TrainerConfig) -> tuple[PeftModel, PreTrainedTokenizerBase, TrainerConfig]:
    """The peft model with a fresh adapter, its tokenizer, and ``config`` with ``max_length`` fitted to the model."""
    set_seed(config.seed)  # LoRA's initial weights come from the RNG
    tokenizer = load_tokenizer(config.base_model)
    base = load_base(config.base_model)
    config = replace(config, max_length=fit_max_length(base, config.max_length))
    return get_peft_model(base, build_lora_config(config)), tokenizer, config


def train(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    data: PreparedData,
    config: TrainerConfig,
    prompt_format: PromptFormat | None = None,
) -> tuple[TrainStats, bool]:
    """Train the adapter in place; also says whether this process is the one that evaluates and publishes."""
    with tempfile.TemporaryDirectory(prefix="trainer-work-") as work_dir:
        trainer, stats = train_lora(
            model,
            tokenizer,
            data.train_records(),
            work_dir=work_dir,
            epochs=config.epochs,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            max_length=config.max_length,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            seed=config.seed,
            logging_steps=config.logging_steps,
            prompt_format=prompt_format,
        )
    return stats, trainer.is_world_process_zero()


def engine_compatibility(model: PeftModel) -> dict[str, Any]:
    """Whether serving engines can load the adapter (training.compat): ``{"vllm": {...}}``."""
    base = model.get_base_model()
    architecture = (getattr(base.config, "architectures", None) or [type(base).__name__])[0]
    adapter_config = model.peft_config["default"].to_dict()
    verdict = vllm_compatibility(adapter_config, architecture, targeted_layers(model))
    log.info("vLLM-compatible: %s %s", verdict["compatible"], "; ".join(verdict["reasons"]))
    return {"vllm": verdict}


# -- publishing -------------------------------------------------------------------------------------------------


def publish_version(
    config: TrainerConfig, version: str, model: PeftModel, data: PreparedData, manifest: dict[str, Any]
) -> Path:
    """Publish the adapter atomically (contract §2), then prune old versions around the serving one."""
    character = _character(config)
    path = publish(config.output_root, character, version,
                   lambda directory: _write_adapter(directory, model, data, manifest))
    protect = {config.serving_version} if config.serving_version else set()
    prune(config.output_root, character, config.keep_versions, protect | {version})
    return path


def _write_adapter(directory: Path, model: PeftModel, data: PreparedData, manifest: dict[str, Any]) -> None:
    model.save_pretrained(str(directory), selected_adapters=["default"], safe_serialization=True)
    # peft adds a hub model card; manifest.json is this layout's description (contract §2).
    (directory / "README.md").unlink(missing_ok=True)
    for name, records in (("train_data.json", data.train_records()), ("eval_data.json", data.eval_records())):
        (directory / name).write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    (directory / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=2), encoding="utf-8")


def _serving_path(config: TrainerConfig) -> Path | None:
    if not config.serving_version:
        return None
    return character_dir(config.output_root, _character(config)) / config.serving_version


def _character(config: TrainerConfig) -> str:
    if not config.character:
        raise ValueError("no character given")
    return config.character


# -- the spec's class -------------------------------------------------------------------------------------------


class CharacterFineTuning:
    """LoRA fine-tuning for one base model; the spec's class, made to train for real.

    The first four arguments are the spec's; every other ``TrainerConfig`` field (data, training, publishing) can be
    given by keyword, and the command line maps one flag to each. Arguments left out of the methods below come from
    that configuration.
    """

    def __init__(
        self,
        base_model: str = TrainerConfig.base_model,
        lora_r: int = TrainerConfig.lora_r,
        lora_alpha: int = TrainerConfig.lora_alpha,
        lora_dropout: float = TrainerConfig.lora_dropout,
        **options: Any,
    ) -> None:
        self.config = TrainerConfig(base_model=base_model, lora_r=lora_r, lora_alpha=lora_alpha,
                                    lora_dropout=lora_dropout, **options)

    @cached_property
    def lora_config(self) -> LoraConfig:
        return build_lora_config(self.config)

    def _collect_conversations(
        self, character_name: str, days: float | None = None, *, until: datetime | None = None
    ) -> list[dict[str, Any]]:
        """Messages of ``character_name`` in ``[until - days, until)`` (``until`` defaults to now)."""
        return collect(self._for(character_name, days=days), until or datetime.now(UTC))

    def _create_training_data(self, conversations: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
        """Alpaca records (``instruction``/``input``/``output``) from messages; rules in ``training.data``."""
        return [e.alpaca() for e in pair(self.config, conversations).examples]

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        return load_tokenizer(self.config.base_model)

    def _load_base(self) -> Any:
        return load_base(self.config.base_model)

    def load_lora_model(self, character_name: str, version: str | None = None) -> PeftModel:
        """Base model + the character's adapter (the given version, else the newest), in eval mode;
        ``FileNotFoundError`` when there is none."""
        return load_adapter(self.config.base_model, self.config.output_root, character_name, version)

    def prepare_data(self, character_name: str, days: float, until: datetime) -> PreparedData:
        """Collect, pair, cap and split. Raises ``InsufficientDataError`` below ``min_examples``."""
        return prepare_data(self._for(character_name, days=days), until)

    def run(
        self,
        character_name: str,
        num_epochs: float | None = None,
        batch_size: int | None = None,
        *,
        days: float | None = None,
        started: datetime | None = None,
    ) -> RunReport | None:
        """The whole job. Returns ``None`` on non-zero ranks of a multi-process run (only rank 0 publishes)."""
        return run(self._for(character_name, epochs=num_epochs, batch_size=batch_size, days=days), started=started)

    def fine_tune_character(
        self, character_name: str, num_epochs: float | None = None, batch_size: int | None = None
    ) -> str:
        """The spec's method: train and publish; returns the published adapter directory."""
        report = self.run(character_name, num_epochs, batch_size)
        return "" if report is None else str(report.path)

    def _for(self, character_name: str, **overrides: Any) -> TrainerConfig:
        """This tuner's configuration for one call: the character, and the arguments the caller gave."""
        given = {name: value for name, value in overrides.items() if value is not None}
        return replace(self.config, character=character_name, **given)
