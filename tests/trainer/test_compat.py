"""The engine-rule check at publish (contract §2 "Engine compatibility"): vLLM's rules for PEFT adapters."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from training.compat import VLLM_MAX_LORA_RANKS, targeted_layers, vllm_compatibility
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

PLAIN = {"r": 8, "lora_alpha": 16, "bias": "none", "modules_to_save": None, "use_dora": False,
         "init_lora_weights": True, "target_modules": ["q_proj", "v_proj"]}
LINEAR = {"model.layers.0.self_attn.q_proj": "Linear", "model.layers.0.self_attn.v_proj": "Linear"}


def check(config: dict[str, Any] | None = None, architecture: str = "LlamaForCausalLM",
          targeted: dict[str, str] | None = None) -> dict[str, Any]:
    return vllm_compatibility(PLAIN | (config or {}), architecture, LINEAR if targeted is None else targeted)


def test_a_plain_llama_adapter_is_compatible() -> None:
    assert check() == {"compatible": True, "reasons": [], "max_lora_rank": 8}
    assert check({"r": 4})["max_lora_rank"] == 8  # the engine's --max-lora-rank must hold the rank, not equal it
    assert check({"r": 300})["max_lora_rank"] == 320


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"use_dora": True}, "DoRA"),
        ({"bias": "lora_only"}, "bias 'lora_only'"),
        ({"lora_bias": True}, "lora_bias"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa'"),
        ({"r": 1024}, "rank 1024 is above 512"),
        ({"rank_pattern": {"q_proj": 600}}, "rank 600"),
    ],
)
def test_each_rule_vllm_applies_is_named_in_the_reason(change: dict[str, Any], rule: str) -> None:
    verdict = check(change)
    assert verdict["compatible"] is False
    assert any(rule in reason for reason in verdict["reasons"]), verdict


def test_architecture_and_target_modules() -> None:
    gpt2 = check(architecture="GPT2LMHeadModel", targeted={"transformer.h.0.attn.c_attn": "Conv1D"})
    assert gpt2["compatible"] is False
    assert "GPT2LMHeadModel" in gpt2["reasons"][0] and "SupportsLoRA" in gpt2["reasons"][0]
    assert "c_attn (Conv1D)" in gpt2["reasons"][1]
    assert check(architecture="GPTNeoXForCausalLM")["compatible"]  # through vLLM's Transformers backend
    assert not check(architecture="SomethingNewForCausalLM")["compatible"]
    head = check(targeted=LINEAR | {"lm_head": "Linear", "model.embed_tokens": "Embedding"})
    assert head["reasons"] == ["target modules embed_tokens (Embedding), lm_head (Linear): vLLM applies LoRA to "
                               "linear layers (not lm_head) only"]


def test_reasons_stay_small_enough_for_the_result() -> None:
    everything = check({"modules_to_save": ["x" * 500], "use_dora": True, "bias": "all", "lora_bias": True, "r": 999},
                       architecture="GPT2LMHeadModel")
    assert len(everything["reasons"]) == 4 and all(len(r) <= 160 for r in everything["reasons"])
    assert everything["max_lora_rank"] is None and max(VLLM_MAX_LORA_RANKS) == 512


def test_targeted_layers_of_real_peft_models() -> None:
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    layers = targeted_layers(get_peft_model(llama, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])))
    assert sorted(layers.values()) == ["Linear", "Linear"] and all(n.endswith(("q_proj", "v_proj")) for n in layers)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    layers = targeted_layers(get_peft_model(gpt2, LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True)))
    assert list(layers.values()) == ["Conv1D"]
