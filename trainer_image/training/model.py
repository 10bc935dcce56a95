"""Base model, tokenizer and LoRA configuration; loading a published adapter back."""

from __future__ import annotations

import functools
import logging
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from peft import LoraConfig, PeftModel, TaskType
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .config import TrainerConfig, module_list
from .publish import character_dir, list_versions

log = logging.getLogger(__name__)

HUB_PROBE_SECONDS = 3.0


class BaseModelUnavailable(OSError):
    """--base-model is neither a local directory nor loadable from the hub (or its cache)."""


def source_options(base_model: str) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for ``base_model``, decided in at most a few seconds: none for a local
    directory or a reachable hub, ``local_files_only`` when only the hub cache has it; ``BaseModelUnavailable`` (saying
    what to pass) otherwise — instead of minutes of retries against a hub that an offline machine cannot reach."""
    if Path(base_model).expanduser().is_dir():
        return {}
    hint = "give --base-model a directory saved with save_pretrained"
    if base_model.startswith(("/", ".", "~")) or base_model.count("/") > 1:
        raise BaseModelUnavailable(f"base model {base_model!r}: no such directory; {hint}")
    offline = any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"}
                  for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if not offline and _hub_reachable():
        return {}
    if _in_hub_cache(base_model):
        return {"local_files_only": True}
    from huggingface_hub import constants

    why = "the hub is off (HF_HUB_OFFLINE)" if offline else f"the model hub at {constants.ENDPOINT} cannot be reached"
    raise BaseModelUnavailable(f"base model {base_model!r} is not a local directory nor in the hub cache, and {why}; "
                               f"{hint}")


def _in_hub_cache(base_model: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(base_model, "config.json"), str)
    except HFValidationError:
        return False


@functools.cache
def _hub_reachable() -> bool:
    from huggingface_hub import constants

    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlsplit(proxy or constants.ENDPOINT)
    try:
        with socket.create_connection((target.hostname or "", target.port or 443), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False


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
    tokenizer = AutoTokenizer.from_pretrained(base_model, **source_options(base_model))
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(base_model: str) -> Any:
    return AutoModelForCausalLM.from_pretrained(base_model, **source_options(base_model))


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
