"""Fixtures for the tests against a real vLLM engine: a tiny random-init Llama, real PEFT adapters for it, and the
engine process itself (devkit.vllm_engine, started as deploy/vllm/engine.yaml starts the pod)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from devkit.vllm_engine import VllmServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# vLLM's CPU attention supports head_dim 64 (not 16); vocabulary and layers are kept tiny so it starts fast.
TOKENIZER_TEXT = [
    "Instruction: hello there\nInput: \nOutput: hi, how are you today?",
    "Instruction: what is the weather like?\nInput: user: good morning\nOutput: sunny and warm, a good day.",
    "こんにちは、元気ですか。今日はいい天気ですね。",
]


def build_tiny_llama(directory: Path, *, seed: int = 0) -> Path:
    """A random-init LlamaForCausalLM (2 layers, 2 heads of 64) with a byte-level BPE tokenizer, saved with
    save_pretrained so that vLLM and transformers load it like any checkpoint."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TOKENIZER_TEXT * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def build_adapter(base_model: Path, directory: Path, *, seed: int) -> Path:
    """A real PEFT LoRA adapter (rank 8 on q_proj/v_proj), with random non-zero A and B so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.5)
    peft_model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def adapters(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_adapter(tiny_llama, root / name, seed=seed) for name, seed in (("one", 1), ("two", 2))}


@pytest.fixture(scope="session")
def engine(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """One engine for the whole session: a start costs one to two minutes on two cores."""
    server = VllmServer(tiny_llama, log_path=tmp_path_factory.mktemp("vllm") / "vllm.log")
    with server:
        print(f"\nvLLM ready in {server.startup_seconds:.0f}s at {server.url}")
        yield server


@pytest.fixture()
def client(engine: VllmServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engine.url, timeout=120) as http:
        yield http


@dataclass(frozen=True)
class AdapterVolume:
    root: Path  # holds lora_lumina/<version>/
    version: str
    context_turns: int  # the manifest's data.context_turns


@pytest.fixture(scope="session")
def adapter_volume(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterVolume:
    """The adapter volume in the contract's layout (docs/contracts.md §2): lora_lumina/<version>/ with a manifest
    that asks for two turns of context."""
    root = tmp_path_factory.mktemp("adapter-volume")
    volume = AdapterVolume(root, "20261201T030000Z", 2)
    directory = build_adapter(tiny_llama, root / "lora_lumina" / volume.version, seed=3)
    manifest = {
        "schema_version": 1,
        "character": "lumina",
        "version": volume.version,
        "base_model": str(tiny_llama),
        "prompt_template": "Instruction: {instruction}\nInput: {input}\nOutput: ",
        "data": {"context_turns": volume.context_turns, "context_chars": 1000},
    }
    (directory / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    return volume


@pytest.fixture(scope="session")
def chat_mounts(adapter_volume: AdapterVolume, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the chat pod sees: /models/lora_lumina is the version's directory (the operator's subPath mount)."""
    root = tmp_path_factory.mktemp("chat-models")
    (root / "lora_lumina").symlink_to(adapter_volume.root / "lora_lumina" / adapter_volume.version)
    return root
