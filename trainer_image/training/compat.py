"""Can a serving engine load this adapter? The rules vLLM applies when it loads a PEFT LoRA adapter, checked at
publish so that an adapter no engine can load is never promoted to one (the operator refuses it for a vLLM target).

The rules are vLLM 0.32's (the engine image in deploy/vllm/): ``vllm/lora/peft_helper.py`` refuses
``modules_to_save``, DoRA, a bias, LoRA bias, layer replication, initialisations that change the base weights, and
a rank above the engine's ``--max-lora-rank`` (one of ``VLLM_MAX_LORA_RANKS``); ``vllm/lora/lora_model.py`` refuses
weights for modules the model's implementation cannot wrap (it wraps linear layers); and only some architectures
implement LoRA at all (GPT-2's does not). The result goes into the manifest and the result JSON as
``compatibility`` (docs/contracts.md §2, §3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the engine's --max-lora-rank choices
# Architectures (config.architectures[0]) whose vLLM implementation supports LoRA: native ones (SupportsLoRA) and
# those vLLM runs through its Transformers backend, which supports LoRA on every linear layer.
VLLM_LORA_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM",
    "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
    "Phi3ForCausalLM", "GraniteForCausalLM", "OPTForCausalLM",
    "GPTNeoXForCausalLM", "GPTBigCodeForCausalLM", "Starcoder2ForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM",
    "PhiForCausalLM",
})
# Initialisations that only set the adapter's first weights; the others (PiSSA, OLoRA, LoftQ...) change the base.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
MAX_REASONS = 4
MAX_REASON_CHARS = 160


def vllm_compatibility(
    adapter_config: Mapping[str, Any], architecture: str | None, targeted: Mapping[str, str]
) -> dict[str, Any]:
    """``{"compatible", "reasons", "max_lora_rank"}`` for one adapter: its ``adapter_config.json`` as a dict, the base
    model's architecture and the layers LoRA wraps (module name → the wrapped layer's class name).

    ``max_lora_rank`` is the smallest ``--max-lora-rank`` the engine needs for it (``None`` when none suffices).
    """
    reasons = _config_reasons(adapter_config)
    if architecture not in VLLM_LORA_ARCHITECTURES:
        reasons.append(f"architecture {architecture or 'unknown'}: vLLM implements no LoRA for it"
                       + (" (GPT2LMHeadModel has no SupportsLoRA)" if architecture == "GPT2LMHeadModel" else ""))
    reasons += _module_reasons(targeted)
    ranks = [int(adapter_config.get("r") or 0), *(adapter_config.get("rank_pattern") or {}).values()]
    rank = max(int(r) for r in ranks)
    fitting = [limit for limit in VLLM_MAX_LORA_RANKS if limit >= rank]
    if not fitting:
        reasons.append(f"rank {rank} is above {VLLM_MAX_LORA_RANKS[-1]}, vLLM's largest --max-lora-rank")
    return {
        "compatible": not reasons,
        "reasons": [r if len(r) <= MAX_REASON_CHARS else r[: MAX_REASON_CHARS - 1] + "…"
                    for r in reasons[:MAX_REASONS]],
        "max_lora_rank": fitting[0] if fitting else None,
    }


def _config_reasons(config: Mapping[str, Any]) -> list[str]:
    reasons = []
    if config.get("modules_to_save"):
        reasons.append(f"modules_to_save {list(config['modules_to_save'])}: vLLM loads no extra trained modules")
    if config.get("use_dora"):
        reasons.append("use_dora: vLLM does not support DoRA")
    if config.get("bias", "none") != "none":
        reasons.append(f"bias {config['bias']!r}: vLLM loads only adapters with bias 'none'")
    if config.get("lora_bias"):
        reasons.append("lora_bias: vLLM does not support LoRA bias")
    if config.get("layer_replication"):
        reasons.append("layer_replication: vLLM does not support it")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        reasons.append(f"init_lora_weights {init!r} changes the base weights; vLLM serves the base as it is")
    return reasons


def _module_reasons(targeted: Mapping[str, str]) -> list[str]:
    """vLLM wraps linear layers only, and the output layer only for some models: say which targets it cannot use."""
    unusable = sorted({name.rsplit(".", 1)[-1] + f" ({kind})" for name, kind in targeted.items()
                       if kind != "Linear" or name.rsplit(".", 1)[-1] == "lm_head"})
    if not unusable:
        return []
    return [f"target modules {', '.join(unusable)}: vLLM applies LoRA to linear layers (not lm_head) only"]


def targeted_layers(model: Any) -> dict[str, str]:
    """The layers LoRA wraps in a peft model: module name → class name of the wrapped (base) layer."""
    from peft.tuners.lora import LoraLayer

    return {name: type(module.get_base_layer()).__name__
            for name, module in model.named_modules() if isinstance(module, LoraLayer)}
