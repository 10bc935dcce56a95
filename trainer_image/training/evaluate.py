"""Held-out evaluation: token-weighted loss on reply tokens, and a few sample replies for people to read."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .collate import IGNORE_INDEX, tokenize_example
from .prompt import PromptFormat, ids, prompt_format_for, render_prompt
from .train import choose_precision, make_collator

log = logging.getLogger(__name__)

SAMPLE_COUNT = 3


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    precision = choose_precision()
    if device.type == "cuda" and precision != "fp32":
        return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def eval_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    *,
    max_length: int = 512,
    batch_size: int = 8,
    prompt_format: PromptFormat | None = None,
) -> float:
    """Mean cross-entropy per reply token over all ``records``.

    Weighted by tokens, not by batch, so the number does not depend on the batch size or on how lengths were grouped;
    base, serving and new adapter are compared on exactly the same tokens.
    """
    if not records:
        raise ValueError("no evaluation records")
    features = [tokenize_example(r, tokenizer, max_length, prompt_format=prompt_format) for r in records]
    features.sort(key=lambda f: f["length"])  # similar lengths together: little padding
    collate = make_collator(tokenizer, max_length)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(features), batch_size):
            batch = {k: v.to(device) for k, v in collate(features[start : start + batch_size]).items()}
            with _autocast(device):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            shifted = logits[:, :-1, :].float()
            targets = batch["labels"][:, 1:]
            total += F.cross_entropy(
                shifted.reshape(-1, shifted.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((targets != IGNORE_INDEX).sum().item())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluation records have no reply tokens")
    return total / count


@torch.no_grad()
def sample_replies(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 40,
    max_chars: int = 160,
    prompt_format: PromptFormat | None = None,
) -> list[str]:
    """Greedy replies (deterministic, so before/after differ only because of the adapter), cut to ``max_chars``."""
    fmt = prompt_format or prompt_format_for(tokenizer)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    replies = []
    try:
        for record in records:
            prompt = torch.tensor([ids(tokenizer, render_prompt(record, fmt, tokenizer))], device=device)
            with _autocast(device):
                out = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            text = tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
            replies.append(text[:max_chars])
    finally:
        model.train(was_training)
    return replies


@contextlib.contextmanager
def adapter_disabled(model: PreTrainedModel) -> Iterator[None]:
    """The base model's behaviour, from a peft model, without copying weights."""
    with model.disable_adapter():  # type: ignore[attr-defined]
        yield


def held_out_losses(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    *,
    serving_path: Path | None,
    max_length: int = 512,
    prompt_format: PromptFormat | None = None,
) -> dict[str, float | None]:
    """Eval loss of the base model, of the serving adapter at ``serving_path`` (``None`` when there is none or it
    cannot be loaded) and of the new adapter (a peft model's ``default``), on the same records."""
    kwargs: dict[str, Any] = {"max_length": max_length, "prompt_format": prompt_format}
    adapter = eval_loss(model, tokenizer, records, **kwargs)
    with adapter_disabled(model):
        base = eval_loss(model, tokenizer, records, **kwargs)
    serving = None if serving_path is None else _serving_loss(model, tokenizer, records, serving_path, kwargs)
    log.info("eval loss on %d held-out examples: base %.4f, serving %s, new adapter %.4f", len(records), base,
             "n/a" if serving is None else f"{serving:.4f}", adapter)
    return {
        "eval_loss_base": round(base, 6),
        "eval_loss_serving": None if serving is None else round(serving, 6),
        "eval_loss_adapter": round(adapter, 6),
    }


def _serving_loss(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    path: Path,
    kwargs: dict[str, Any],
) -> float | None:
    if not (path / "adapter_config.json").is_file():
        log.warning("serving version %s not found at %s; eval_loss_serving stays null", path.name, path)
        return None
    # Loaded next to the new adapter, so the base weights are shared rather than loaded twice.
    try:
        model.load_adapter(str(path), adapter_name="serving")
    except Exception as exc:  # a broken or foreign adapter must not cost this month's training
        log.warning("serving version %s cannot be loaded (%s); eval_loss_serving stays null", path.name, exc)
        return None
    model.set_adapter("serving")
    try:
        return eval_loss(model, tokenizer, records, **kwargs)
    finally:
        model.set_adapter("default")
        model.delete_adapter("serving")


def before_after_samples(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Mapping[str, Any]],
    *,
    prompt_format: PromptFormat | None = None,
) -> list[dict[str, str]]:
    """Greedy replies of the base model and of the adapter to the first few records, for people to read."""
    chosen = records[:SAMPLE_COUNT]
    with adapter_disabled(model):
        before = sample_replies(model, tokenizer, chosen, prompt_format=prompt_format)
    after = sample_replies(model, tokenizer, chosen, prompt_format=prompt_format)
    return [
        {"instruction": r["instruction"][:160], "reference": r["output"][:160], "before": b, "after": a}
        for r, b, a in zip(chosen, before, after, strict=True)
    ]
