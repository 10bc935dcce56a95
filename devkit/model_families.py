"""Tiny random-init checkpoints of the architectures users fine-tune, for tests that must cover more than one.

``ensure_family_model("qwen2")`` returns a ``save_pretrained`` directory with a 2-layer random-init model of that
architecture and the embedded model's tokenizer (chat template included), so every family speaks the same tokens and
the same prompt format as the embedded model. The weights are random: these checkpoints exercise code paths (module
names, attention variants, tied or untied heads, LoRA targets), not learning quality.

Each is built in seconds and cached beside the embedded model, under a name that carries a hash of its config and of
the tokenizer's files. ``python -m devkit.model_families [FAMILY ...]`` builds (or finds) them and prints their paths.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from devkit.model import cached_build, default_cache_root, ensure_embedded_model

# Width 128 with 64-dim heads (what vLLM's attention backends accept), 2 layers, 512 positions. Qwen2, Mistral and
# Gemma2 use grouped-query attention (one KV head for two query heads), Llama plain multi-head attention.
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 512, "tie_word_embeddings": True},
    "qwen2": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 512, "tie_word_embeddings": True},
    "mistral": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 64, "max_position_embeddings": 512, "sliding_window": None,
                "tie_word_embeddings": False},
    "gemma2": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": 256,
               "max_position_embeddings": 512},
    "gpt_neox": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "max_position_embeddings": 512, "tie_word_embeddings": False},
    "gpt2": {"n_embd": 128, "n_layer": 2, "n_head": 2, "n_positions": 512},
}
FAMILIES = tuple(FAMILY_CONFIGS)
FAMILY_VERSION = 1
SEED = 1234


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _tokenizer_digest(tokenizer_dir: Path) -> str:
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        digest.update((tokenizer_dir / name).read_bytes())
    return digest.hexdigest()


def family_key(family: str, tokenizer_dir: Path) -> str:
    """Hash of the family's config, the build's version and seed, and the tokenizer's files."""
    recipe = {"family": family, "config": FAMILY_CONFIGS[family], "version": FAMILY_VERSION, "seed": SEED}
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode())
    digest.update(_tokenizer_digest(tokenizer_dir).encode())
    return digest.hexdigest()[:16]


def _build(work: Path, family: str, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **special, **FAMILY_CONFIGS[family])
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(**special)
    model.save_pretrained(work)
    for name in TOKENIZER_FILES:  # copied as they are: every family has exactly the embedded model's tokenizer
        shutil.copyfile(tokenizer_dir / name, work / name)
    info = {"family": family, "config": FAMILY_CONFIGS[family], "tokenizer_from": str(tokenizer_dir),
            "parameters": sum(p.numel() for p in model.parameters())}
    (work / "family.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def ensure_family_model(family: str, cache_root: Path | None = None, *, tokenizer_dir: Path | None = None) -> Path:
    """The directory of ``family``'s tiny random-init checkpoint, built on first use (seconds) and reused afterwards.

    ``tokenizer_dir`` defaults to the embedded model (built first if needed), whose tokenizer and chat template every
    family shares.
    """
    if family not in FAMILY_CONFIGS:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    source = Path(tokenizer_dir) if tokenizer_dir is not None else ensure_embedded_model(root, progress=False)
    name = f"family-{family}-{family_key(family, source)}"
    return cached_build(root, name, lambda work: _build(work, family, source))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build (or find) tiny random-init checkpoints and print their paths.")
    parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"default: all of {', '.join(FAMILIES)}")
    parser.add_argument("--cache-root", type=Path, default=None, help="default: the embedded model's cache root")
    parser.add_argument("--tokenizer-dir", type=Path, default=None, help="default: the embedded model's directory")
    args = parser.parse_args(argv)
    unknown = [family for family in args.families if family not in FAMILY_CONFIGS]
    if unknown:
        parser.error(f"unknown families {', '.join(unknown)}; known: {', '.join(FAMILIES)}")
    for family in args.families or FAMILIES:
        print(f"{family}\t{ensure_family_model(family, args.cache_root, tokenizer_dir=args.tokenizer_dir)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
