"""Trainer throughput: the spec's pad-to-512 setup vs the trainer as shipped vs pad-free packed batches.

    .venv/bin/python -m bench.train_throughput                 # CPU, ~4 min on 2 cores
    .venv/bin/python -m bench.train_throughput --device cuda   # on a GPU: bf16 throughput and MFU as well

Every variant trains the same LoRA (the trainer's own config) on the embedded model, on the same records, for the
same epochs, through the trainer's own ``training.train.train_lora`` — only the batching differs:

=============  ==================================================================================================
spec           the original spec: every example padded to 512, batch 4, loss on prompt and reply, random order
shipped        the trainer's defaults (``train_lora`` as the CLI calls it): loss on the reply, random order, each
               batch one pad-free row (examples back to back, position ids restarting, attention kept inside each
               example: the padded batch's maths without the padding)
dynamic        shipped's random batches padded to their longest member (the trainer's default before packing)
grouped        padded to the longest, length-grouped batches (the Trainer's group_by_length sampler)
grouped-16     a middle way: random groups of 16 examples, sorted by length into 4 batches, all batches in random
               order (little padding, batches still mixed), padded; a sampler swapped into the Trainer here
checkpointing  shipped with gradient checkpointing (trades compute for activation memory)
packed         the practical ceiling: all tokens concatenated and cut into rows of the mean example length, batch 4
               rows, plain causal attention, no mask, no padding — pretraining-style packing; the same tokens and
               tokens per step, but examples are cut and see their neighbours, so its loss is not comparable
=============  ==================================================================================================

Each variant runs in its own process, so peak RSS is that variant's own. "Real tokens" are the examples' tokens
without padding: the same count for every variant. Eval loss is the trainer's ``eval_loss`` (reply tokens of the
held-out sessions) after training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from devkit.paths import REPO_ROOT

from bench._common import log, machine, peak_rss_mib, table, write_json

VARIANTS = ("spec", "shipped", "dynamic", "grouped", "grouped-16", "checkpointing", "packed")
CHARACTER = "lumina"
WINDOW_END = datetime(2026, 11, 26, tzinfo=UTC)


# -- data (parent) ----------------------------------------------------------------------------------------------------


def prepare_records(workdir: Path, model_path: Path, sessions: int, seed: int) -> dict[str, Any]:
    """Generated chat history → the trainer's own pairing and session split → train/eval records on disk."""
    from devkit.conversations import generate_history, write_jsonl
    from training.lora_tuning import CharacterFineTuning

    history = generate_history(
        CHARACTER, sessions=sessions, seed=seed, start=WINDOW_END - timedelta(days=30), end=WINDOW_END
    )
    history_file = write_jsonl(workdir / "history.jsonl", history)
    tuning = CharacterFineTuning(base_model=str(model_path), history_file=history_file, min_examples=1)
    messages, dropped, train, held_out = tuning.prepare_data(CHARACTER, 30, WINDOW_END)
    records = {"train": [e.alpaca() for e in train], "eval": [e.alpaca() for e in held_out]}
    (workdir / "records.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return {"messages": messages, "train_pairs": len(train), "eval_pairs": len(held_out), "dropped": dropped}


# -- one variant (worker process) -------------------------------------------------------------------------------------


def chunked_dataset(width: int) -> Any:
    """A stand-in for ``training.train.build_dataset``: the same tokens and labels, cut into rows of ``width``."""
    from datasets import Dataset
    from training.collate import tokenize_example

    def build(records: Sequence[Mapping[str, str]], tokenizer: Any, max_length: int, **options: Any) -> Dataset:
        features = [tokenize_example(r, tokenizer, max_length, **options) for r in records]
        ids = [t for f in features for t in f["input_ids"]]
        labels = [t for f in features for t in f["labels"]]
        rows = [
            {"input_ids": ids[i : i + width], "labels": labels[i : i + width], "length": len(ids[i : i + width])}
            for i in range(0, len(ids), width)
        ]
        return Dataset.from_list(rows)

    return build


class SmallGroupSampler:
    """Length grouping inside random groups of ``group`` examples; the resulting batches in random order.

    The Trainer's own length grouping sorts groups of 50 batches and keeps them in order, so nearly every batch holds
    examples of one length; small groups leave little padding while batches stay mixed.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = 16) -> None:
        self.lengths, self.batch_size, self.seed, self.group = list(lengths), batch_size, seed, group
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Any:
        import torch

        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        batches = []
        for start in range(0, len(order), self.group):
            group = sorted(order[start : start + self.group], key=self.lengths.__getitem__, reverse=True)
            batches += [group[i : i + self.batch_size] for i in range(0, len(group), self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield from batches[b]


def apply_variant(variant: str, model: Any, train_module: Any, mean_len: int) -> dict[str, Any]:
    """``train_lora`` options for ``variant``; the packed variants swap one of its building blocks in place
    (this is a throw-away worker process), so sampler, loop, optimizer and logging stay the trainer's own."""
    if variant == "spec":
        return {"padding": "max_length", "loss_on_prompt": True, "group_by_length": False}
    if variant == "grouped":
        return {"padding": "longest", "group_by_length": True}
    if variant == "dynamic":
        return {"padding": "longest"}
    if variant == "checkpointing":
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen under LoRA).
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    elif variant == "packed":
        train_module.build_dataset = chunked_dataset(mean_len)
        return {"padding": "longest"}  # rows of one width: no padding, plain causal attention
    elif variant == "grouped-16":
        from transformers import Trainer

        def sampler(trainer: Any, dataset: Any = None) -> SmallGroupSampler:
            data = dataset if dataset is not None else trainer.train_dataset
            return SmallGroupSampler(data["length"], trainer.args.per_device_train_batch_size, trainer.args.seed)

        Trainer._get_train_sampler = sampler
        return {"padding": "longest"}
    return {}


def matmul_tflops(device: str) -> float:
    """The GPU's measured dense bf16 matmul rate, the denominator of MFU."""
    import torch

    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps = 20
    started = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - started) / 1e12


def run_variant(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from peft import get_peft_model
    from training import train as train_module
    from training.collate import tokenize_example
    from training.evaluate import adapter_disabled, eval_loss
    from training.lora_tuning import CharacterFineTuning
    from transformers import set_seed

    torch.set_num_threads(args.threads)
    records = json.loads((Path(args.workdir) / "records.json").read_text(encoding="utf-8"))
    tuning = CharacterFineTuning(base_model=args.model, min_examples=1, max_length=args.max_length, seed=args.seed)
    tokenizer = tuning._load_tokenizer()
    real_tokens = sum(len(tokenize_example(r, tokenizer, args.max_length)["input_ids"]) for r in records["train"])
    mean_len = real_tokens / len(records["train"])
    durations = []
    for _ in range(args.repeats):
        set_seed(args.seed)  # LoRA's initial weights come from the RNG: every run starts from the same adapter
        model = get_peft_model(tuning._load_base(), tuning.lora_config)
        if args.device == "cuda":
            model.to("cuda")
            torch.cuda.reset_peak_memory_stats()
        with adapter_disabled(model):
            loss_base = eval_loss(model, tokenizer, records["eval"], max_length=args.max_length)
        options = apply_variant(variant, model, train_module, round(mean_len))
        rss_before = peak_rss_mib()
        with tempfile.TemporaryDirectory(prefix="bench-train-") as work_dir:
            _, stats = train_module.train_lora(
                model,
                tokenizer,
                records["train"],
                work_dir=work_dir,
                epochs=args.epochs,
                batch_size=args.batch_size,
                max_length=args.max_length,
                seed=args.seed,
                logging_steps=1000,
                **options,
            )
        durations.append(stats.duration_seconds)
    loss_adapter = eval_loss(model, tokenizer, records["eval"], max_length=args.max_length)
    # Best of the repeats: on a shared machine noise only ever slows a run down.
    duration = min(durations)
    tokens = real_tokens * args.epochs
    result: dict[str, Any] = {
        "variant": variant,
        "repeats": len(durations),
        "train_seconds_all": [round(d, 2) for d in durations],
        "steps": stats.steps,
        "train_seconds": round(duration, 2),
        "epoch_seconds": round(duration / args.epochs, 2),
        "real_tokens": tokens,
        "counted_tokens": stats.tokens,  # what the Trainer counted as non-padding (padded positions count for spec)
        "tokens_per_s": tokens / duration,
        "train_loss": stats.train_loss,
        "eval_loss_base": loss_base,
        "eval_loss": loss_adapter,
        "threads": torch.get_num_threads(),
    }
    if args.device == "cuda":
        result["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["precision"] = train_module.choose_precision()
        # Model FLOPs per token (PaLM's 6N + 12·L·d·T, N without position embeddings, T the mean example length).
        config = model.base_model.model.config
        params = sum(p.numel() for n, p in model.named_parameters() if "wpe" not in n)
        flops_per_token = 6 * params + 12 * config.num_hidden_layers * config.hidden_size * mean_len
        peak = matmul_tflops("cuda")
        result["matmul_tflops"] = peak
        result["mfu"] = result["tokens_per_s"] * flops_per_token / (peak * 1e12)
    else:
        result["peak_mem_mib"] = peak_rss_mib()
        result["rss_before_train_mib"] = rss_before
    return result


# -- orchestration (parent) -------------------------------------------------------------------------------------------


def spawn(variant: str, args: argparse.Namespace, workdir: Path, model_path: Path) -> dict[str, Any]:
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the Trainer would otherwise move to a GPU if one exists
    command = [
        # As a module from the repository root: run as a file, the script's folder would shadow the `bench` package.
        sys.executable, "-m", "bench.train_throughput", "--worker", variant, "--workdir", str(workdir),
        "--model", str(model_path),
        "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--threads", str(args.threads), "--device", args.device, "--seed", str(args.seed),
        "--repeats", str(args.spec_repeats if variant == "spec" else args.repeats),
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"variant {variant} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    log(f"  {variant}: {result['tokens_per_s']:.0f} real tokens/s, eval loss {result['eval_loss']:.4f} "
        f"({time.perf_counter() - started:.0f}s with start-up)")
    return result


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios of each variant's real-token rate to spec's and to packed's; eval loss relative to spec's."""
    rate = {r["variant"]: r["tokens_per_s"] for r in rows}
    loss = {r["variant"]: r["eval_loss"] for r in rows}
    for row in rows:
        row["x_spec"] = row["tokens_per_s"] / rate["spec"] if "spec" in rate else None
        row["pct_packed"] = 100 * row["tokens_per_s"] / rate["packed"] if "packed" in rate else None
        row["loss_vs_spec_pct"] = 100 * (row["eval_loss"] / loss["spec"] - 1) if "spec" in loss else None
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=100, help="generated chat sessions (~2.6 usable pairs each)")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--repeats", type=int, default=5, help="training runs per variant (best kept), but spec")
    parser.add_argument("--spec-repeats", type=int, default=1, help="runs of spec: ten times slower, run once")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steadier on a shared 2-core machine)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--base-model", help="a save_pretrained causal LM directory (default: the embedded model)")
    parser.add_argument("--quick", action="store_true", help="tiny data, for a smoke test: numbers mean nothing")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(run_variant(args.worker, args)))
        return 0

    from devkit.model import ensure_embedded_model

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if args.quick:
        args.sessions, args.repeats, args.spec_repeats = 8, 1, 1
    model_path = Path(args.base_model) if args.base_model else ensure_embedded_model()
    with tempfile.TemporaryDirectory(prefix="bench-train-data-") as tmp:
        workdir = Path(tmp)
        data = prepare_records(workdir, model_path, args.sessions, args.seed)
        records = json.loads((workdir / "records.json").read_text(encoding="utf-8"))
        data["mean_tokens_per_pair"] = mean_tokens(model_path, records["train"], args.max_length)
        log(f"data: {data['train_pairs']} train / {data['eval_pairs']} eval pairs, "
            f"{data['mean_tokens_per_pair']:.1f} tokens per pair on average")
        rows = summarise([spawn(v, args, workdir, model_path) for v in variants])
    info = machine() | {"device": args.device, "threads": args.threads, "epochs": args.epochs,
                        "batch_size": args.batch_size} | data
    write_json(args.json, {"machine": info, "variants": rows})
    print(f"\n{info}")
    columns = [
        ("variant", "variant", ""), ("tokens_per_s", "real tokens/s", ".0f"), ("x_spec", "× spec", ".2f"),
        ("pct_packed", "% of packed", ".0f"), ("epoch_seconds", "s/epoch", ".1f"), ("steps", "steps", ""),
        ("peak_mem_mib", "peak MiB", ".0f"), ("eval_loss", "eval loss", ".4f"),
        ("loss_vs_spec_pct", "loss vs spec %", "+.2f"),
    ]
    if args.device == "cuda":
        columns += [("precision", "precision", ""), ("mfu", "MFU", ".2%")]
    print(table(rows, columns))
    if rows:
        print(f"eval loss of the base model (no adapter): {rows[0]['eval_loss_base']:.4f}; "
              f"bars: shipped ≥ 8× spec with eval loss no worse, shipped ≥ 85% of packed")
    return 0


def mean_tokens(model_path: Path, records: list[dict[str, str]], max_length: int) -> float:
    from training.collate import tokenize_example
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    lengths = [len(tokenize_example(r, tokenizer, max_length)["input_ids"]) for r in records]
    return sum(lengths) / max(len(lengths), 1)


if __name__ == "__main__":
    sys.exit(main())
