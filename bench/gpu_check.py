"""GPU check: the trainer's own LoRA training in bf16 on a ≥ 1 B-parameter random-init Llama, and its MFU.

    python -m bench.gpu_check                      # on a CUDA machine; bench/gpu_check.sh also runs the GPU tests
    python -m bench.gpu_check --layers 2 --quick   # a smoke run (numbers mean nothing), CPU allowed

The model is a Llama config of the Llama-3.2-1B shape (width 2048, MLP 8192, 32 query / 8 KV heads of 64) with the
embedded model's tokenizer and chat template, randomly initialised: throughput does not depend on the weights. The
data are devkit's Lumina conversations as the trainer pairs them; training is ``training.train.train_lora`` exactly
as the CLI calls it (dynamic padding, reply-only loss, bf16 chosen by ``choose_precision``) with the trainer's default
LoRA (r 8 on the targets it picks, q_proj/v_proj).

MFU = real tokens/s × model FLOPs per token / the GPU's measured dense bf16 matmul rate (8192² matmuls, the same
measurement as bench/train_throughput.py). Model FLOPs per token for LoRA training: the frozen weights cost 4 N (the
forward pass and the backward pass for activations; no weight gradients), the LoRA weights 6 N_lora, attention
12 · layers · width · mean length (PaLM's term). Benchmarks measure and print; they never assert.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench._common import log, machine, table, write_json

LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 18, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 2048, "tie_word_embeddings": True,
            "rope_theta": 500000.0}


def build_model(directory: Path, layers: int) -> tuple[Path, int]:
    """A random-init Llama of LLAMA_1B's shape (``layers`` decoder layers) with the embedded tokenizer, saved."""
    import torch
    from devkit.model import ensure_embedded_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ensure_embedded_model())
    config = LlamaConfig(**(LLAMA_1B | {"num_hidden_layers": layers}), vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, sum(p.numel() for p in model.parameters())


def records(base: Path, sessions: int) -> list[dict[str, Any]]:
    """Lumina's generated conversations as the trainer's training records."""
    from devkit.conversations import generate_history
    from training.lora_tuning import CharacterFineTuning

    end = datetime.now(UTC)
    history = generate_history("lumina", sessions=sessions, seed=1, start=end - timedelta(days=25), end=end)
    return CharacterFineTuning(str(base), min_examples=1)._create_training_data(history)


def matmul_tflops() -> float:
    from bench.train_throughput import matmul_tflops as measured

    return measured("cuda")


def train(base: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One epoch of the trainer's training over ``rows`` on the GPU; its throughput and memory."""
    import torch
    from peft import get_peft_model
    from training.collate import tokenize_example
    from training.lora_tuning import CharacterFineTuning
    from training.train import choose_precision, train_lora
    from transformers import set_seed

    tuning = CharacterFineTuning(str(base), min_examples=1, max_length=args.max_length)
    tokenizer = tuning._load_tokenizer()
    real_tokens = sum(len(tokenize_example(r, tokenizer, args.max_length)["input_ids"]) for r in rows)
    set_seed(0)
    model = get_peft_model(tuning._load_base(), tuning.lora_config)
    if torch.cuda.is_available():
        model.to("cuda")
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work_dir:
        _, stats = train_lora(model, tokenizer, rows, work_dir=work_dir, epochs=1, batch_size=args.batch_size,
                              max_length=args.max_length, logging_steps=50)
    config = model.get_base_model().config
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    frozen = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    mean_len = real_tokens / len(rows)
    return {
        "precision": choose_precision(),
        "examples": len(rows),
        "mean_tokens": round(mean_len, 1),
        "steps": stats.steps,
        "train_seconds": round(stats.duration_seconds, 2),
        "tokens_per_s": real_tokens / stats.duration_seconds,
        "flops_per_token": 4 * frozen + 6 * lora + 12 * config.num_hidden_layers * config.hidden_size * mean_len,
        "lora_parameters": lora,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "train_loss": stats.train_loss,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=LLAMA_1B["num_hidden_layers"], help="decoder layers")
    parser.add_argument("--sessions", type=int, default=600, help="generated chat sessions (~2.6 pairs each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="a few sessions, for a smoke test")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    import torch

    if args.quick:
        args.sessions = 8
    on_gpu = torch.cuda.is_available()
    if not on_gpu and not args.quick:
        parser.error("no CUDA device: this check is for a GPU machine (--quick runs a CPU smoke test)")
    with tempfile.TemporaryDirectory(prefix="gpu-check-model-") as tmp:
        started = time.perf_counter()
        base, parameters = build_model(Path(tmp), args.layers)
        log(f"model: {parameters / 1e9:.2f} B parameters, built in {time.perf_counter() - started:.0f}s")
        rows = records(base, args.sessions)
        result = train(base, rows, args)
    result["parameters"] = parameters
    if on_gpu:
        result["gpu"] = torch.cuda.get_device_name()
        result["matmul_tflops"] = matmul_tflops()
        result["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / (result["matmul_tflops"] * 1e12)
    info = machine() | {"torch": torch.__version__, "cuda": torch.version.cuda}
    write_json(args.json, {"machine": info, "result": result})
    print(f"\n{json.dumps(info)}")
    columns = [("gpu", "GPU", ""), ("parameters", "parameters", ",d"), ("precision", "precision", ""),
               ("examples", "examples", ""), ("mean_tokens", "tokens/example", ".1f"), ("steps", "steps", ""),
               ("tokens_per_s", "real tokens/s", ".0f"), ("matmul_tflops", "matmul TFLOP/s", ".0f"),
               ("mfu", "MFU", ".1%"), ("peak_mem_gib", "peak GiB", ".1f")]
    print(table([result], columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
