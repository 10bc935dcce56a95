"""The GPU check (bench/gpu_check.sh) stays runnable for when a GPU is lent; nothing here needs a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from devkit.paths import BENCH

from bench import gpu_check


def test_the_model_has_at_least_a_billion_parameters() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):  # shapes only, no memory
        model = LlamaForCausalLM(LlamaConfig(**gpu_check.LLAMA_1B, vocab_size=2048))
    assert sum(p.numel() for p in model.parameters()) >= 1_000_000_000


def test_the_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], check=False).returncode == 0


@pytest.mark.slow
def test_a_cpu_smoke_run_reports(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--quick", "--layers", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())["result"]
    assert result["steps"] >= 1 and result["tokens_per_s"] > 0 and result["lora_parameters"] > 0
    assert result["flops_per_token"] > 4 * (result["parameters"] - result["lora_parameters"])
    assert "real tokens/s" in done.stdout  # the table
