"""The training loop: transformers ``Trainer`` over a peft model, loss on replies only, pad-free batches.

Batches are drawn in random order, and each is packed into one row without padding (``FlatteningCollator``) where
the model gives the padded loss that way (checked on the run's first examples). Length-grouped batches were measured
too (docs/benchmarks.md §1): they leave little padding, but every batch is then homogeneous and the held-out loss
after the same epochs came out worse on every seed tried; packing removes the padding without that cost.

``Trainer`` (through accelerate) handles one process per GPU when started with ``torchrun``/``accelerate launch``;
nothing here depends on the number of processes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from datasets import Dataset
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from .collate import CompletionCollator, FlatteningCollator, tokenize_example
from .pausing import pause_point
from .prompt import PromptFormat

log = logging.getLogger(__name__)

Precision = Literal["bf16", "fp16", "fp32"]


def choose_precision() -> Precision:
    """bf16 where the GPU supports it (no loss scaling needed), fp16 on older GPUs, fp32 on the CPU."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def build_dataset(
    records: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    *,
    prompt_format: PromptFormat | None = None,
    loss_on_prompt: bool = False,
) -> Dataset:
    rows = [
        tokenize_example(r, tokenizer, max_length, prompt_format=prompt_format, loss_on_prompt=loss_on_prompt)
        for r in records
    ]
    return Dataset.from_list(rows)


def make_collator(
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    padding: Literal["longest", "max_length"] = "longest",
) -> CompletionCollator:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Multiples of 8 keep GPU matmuls on tensor cores; on the CPU they would only add padding.
    multiple = 8 if torch.cuda.is_available() and padding == "longest" else None
    return CompletionCollator(pad_token_id=pad_id, padding=padding, max_length=max_length, pad_to_multiple_of=multiple)


def train_collator(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    max_length: int,
    padding: Literal["none", "longest", "max_length"],
) -> CompletionCollator | FlatteningCollator:
    """The training batches' collator: for ``"none"`` pad-free rows if the model computes the padded loss from them,
    otherwise (an attention that ignores restarting position ids would let packed examples see each other) padded."""
    padded = make_collator(tokenizer, max_length, "longest" if padding == "none" else padding)
    if padding != "none":
        return padded
    sample = [dataset[i] for i in range(min(4, len(dataset)))]
    flat = FlatteningCollator()
    if packing_matches_padding(model, padded(sample), flat(sample)):
        return flat
    log.warning("%s: packed rows do not give the padded loss; training on padded batches", type(model).__name__)
    return padded


def packing_matches_padding(model: PreTrainedModel, padded: Mapping[str, Any], flat: Mapping[str, Any]) -> bool:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: both passes must see the same weights
    try:
        with torch.no_grad():
            losses = [model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss
                      for batch in (padded, flat)]
    finally:
        model.train(was_training)
    return bool(torch.allclose(losses[0], losses[1], rtol=1e-4, atol=1e-5))


class ThroughputLogger(TrainerCallback):
    """Logs loss and non-padding tokens per second every ``logging_steps`` (the Trainer's own logs lack the rate)."""

    def __init__(self) -> None:
        self.started = 0.0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        self.started = time.perf_counter()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        log.info(
            "step %d/%d epoch %.2f loss %.4f lr %.2e tokens/s %.0f",
            state.global_step,
            state.max_steps,
            logs.get("epoch", 0.0),
            logs["loss"],
            logs.get("learning_rate", 0.0),
            state.num_input_tokens_seen / elapsed,
        )


class _TrainPausePoint(TrainerCallback):
    """The ``train`` test pause point (training.pausing): after the first optimizer step, in the middle of training."""

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any) -> None:
        if state.global_step == 1 and state.is_world_process_zero:
            pause_point("train", f"after step 1/{state.max_steps}")


@dataclass
class TrainStats:
    train_loss: float
    tokens: int  # non-padding tokens processed, all processes, all epochs
    tokens_per_second: float
    duration_seconds: float
    steps: int


def _training_arguments(
    work_dir: str,
    *,
    epochs: float,
    batch_size: int,
    learning_rate: float,
    gradient_accumulation_steps: int,
    seed: int,
    logging_steps: int,
    precision: Precision,
    group_by_length: bool,
    padded: bool,
) -> TrainingArguments:
    return TrainingArguments(
        output_dir=work_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        logging_steps=logging_steps,
        logging_first_step=True,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
        # Pad-free rows have no attention mask to count by, and nothing to leave out.
        include_num_input_tokens_seen="non_padding" if padded else "all",
        # Every LoRA weight takes part in every step, so DDP need not search for unused parameters.
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=torch.cuda.is_available(),
        # Without a GPU, accelerate only treats torchrun's processes as one job (gloo DDP) when told it is on CPUs.
        use_cpu=not torch.cuda.is_available(),
    )


def train_lora(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_records: Sequence[Mapping[str, Any]],
    *,
    work_dir: str,
    epochs: float = 3,
    batch_size: int = 4,
    learning_rate: float = 3e-4,
    max_length: int = 512,
    gradient_accumulation_steps: int = 1,
    seed: int = 42,
    logging_steps: int = 10,
    prompt_format: PromptFormat | None = None,
    padding: Literal["none", "longest", "max_length"] = "none",
    loss_on_prompt: bool = False,
    group_by_length: bool = False,
) -> tuple[Trainer, TrainStats]:
    """Train ``model`` (a peft model) in place, on pad-free rows (``padding="none"``, see :func:`train_collator`).
    ``padding="longest"|"max_length"``, ``loss_on_prompt`` and ``group_by_length`` exist so that benchmarks can
    reproduce the spec's padded-to-512 setup and the alternatives; the product uses the defaults."""
    dataset = build_dataset(
        train_records, tokenizer, max_length, prompt_format=prompt_format, loss_on_prompt=loss_on_prompt
    )
    precision = choose_precision()
    collator = train_collator(model, tokenizer, dataset, max_length, padding)
    args = _training_arguments(
        work_dir, epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
        gradient_accumulation_steps=gradient_accumulation_steps, seed=seed, logging_steps=logging_steps,
        precision=precision, group_by_length=group_by_length, padded=isinstance(collator, CompletionCollator),
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        callbacks=[ThroughputLogger(), _TrainPausePoint()],
    )
    # The printer would put every log dict on stdout, whose last line is reserved for the result JSON;
    # ThroughputLogger reports the same numbers (plus tokens/s) through logging instead.
    trainer.remove_callback(PrinterCallback)
    log.info(
        "training: %d examples, %s epochs, batch %d x accumulation %d, lr %g, precision %s, %d process(es)",
        len(dataset), epochs, batch_size, gradient_accumulation_steps, learning_rate, precision, args.world_size,
    )
    started = time.perf_counter()
    output = trainer.train()
    duration = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen)
    stats = TrainStats(
        train_loss=float(output.training_loss),
        tokens=tokens,
        tokens_per_second=tokens / duration if duration > 0 else 0.0,
        duration_seconds=duration,
        steps=int(trainer.state.global_step),
    )
    log.info("trained: loss %.4f, %d tokens in %.1fs (%.0f tokens/s)", stats.train_loss, tokens, duration,
             stats.tokens_per_second)
    return trainer, stats
