"""Base model, tokenizer and LoRA configuration; loading a published adapter back."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from peft import LoraConfig, PeftModel, TaskType
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .config import TrainerConfig, module_list
from .publish import character_dir, list_versions

log = logging.getLogger(__name__)


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


def build_lora_config(config: TrainerConfig) -> LoraConfig:
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=module_list(config.target_modules) or detect_target_modules(config.base_model),
        # GPT-2 keeps its projections in Conv1D layers, whose weights are stored transposed.
        fan_in_fan_out=model_type_of(config.base_model) == "gpt2",
        bias="none",
        task_type=TaskType.CAUSAL_LM,
    )


def load_tokenizer(base_model: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base_model: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(base_model)


def fit_max_length(base: Any, max_length: int) -> int:
    """``max_length``, or the model's number of positions when that is smaller: longer inputs would index past the
    position embeddings."""
    positions = getattr(base.config, "n_positions", None) or getattr(base.config, "max_position_embeddings", None)
    if positions and max_length > positions:
        log.warning("max length %d exceeds the model's %d positions; using %d", max_length, positions, positions)
        return int(positions)
    return max_length


def load_adapter(base_model: str, output_root: str | Path, character: str, version: str | None = None) -> PeftModel:
    """Base model + the character's adapter (the given version, else the newest), in eval mode.

    Accepts both the volume layout ``<root>/lora_<c>/<version>/`` and the serving mount layout
    ``<root>/lora_<c>/adapter_config.json``. ``FileNotFoundError`` when there is no adapter.
    """
    directory = character_dir(output_root, character)
    if version is None and (directory / "adapter_config.json").is_file():
        path = directory
    else:
        versions = list_versions(output_root, character)
        chosen = version or (versions[-1] if versions else None)
        path = directory / chosen if chosen else directory
        if not chosen or not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"no LoRA adapter for {character!r} at {path}")
    model = PeftModel.from_pretrained(load_base(base_model), str(path))
    model.eval()
    return model
