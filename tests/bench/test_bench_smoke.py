"""Smoke tests of the benchmarks (bench/): they start, and their yardsticks compute what they claim.

No timing is asserted here: benchmarks measure, tests check. The packed "ceiling" of bench/train_throughput.py must
keep every token of the examples; that the shipped pad-free rows give the padded loss is checked in
tests/trainer/test_packing.py.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from devkit.paths import REPO_ROOT

from bench import _common, operator_scale, train_throughput


def test_percentile_interpolates() -> None:
    assert _common.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert _common.percentile([5.0], 95) == 5.0
    assert _common.percentile([3.0, 1.0, 2.0], 100) == 3.0


def test_table_is_markdown() -> None:
    text = _common.table([{"a": 1.234, "b": None}], [("a", "A", ".1f"), ("b", "B", "")])
    assert text.splitlines() == ["| A   | B |", "|-----|---|", "| 1.2 | – |"]


def test_resyncs_counted_from_first_reconcile() -> None:
    # Resources reconciled at 0, 10 and 20 s are re-checked at ~61, 71, 81 s (and 121, ...): a window that closes
    # just after creation plus one period sees none of them, a longer one sees each once.
    assert operator_scale.resyncs_between([0.0, 10.0, 20.0], 1.0, 60.5, 60) == 0
    assert operator_scale.resyncs_between([0.0, 10.0, 20.0], 20.0, 110.0, 60) == 3
    assert operator_scale.resyncs_between([0.0], 0.0, 200.0, 60) == 3


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any, list[dict[str, Any]]]:
    from devkit.model import ensure_embedded_model
    from training.collate import tokenize_example
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_embedded_model(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    records = [
        {"instruction": "hello there", "input": "", "output": "hi! how are you today?"},
        {"instruction": "明日の天気は？", "input": "", "output": "晴れると思います。傘はいらないかもしれません。"},
        {"instruction": "tea?", "input": "", "output": "brew it with water that is not too hot"},
    ]
    return tokenizer, model, [tokenize_example(r, tokenizer, 512) for r in records]


def test_chunked_dataset_keeps_every_token(tiny: tuple[Any, Any, list[dict[str, Any]]]) -> None:
    tokenizer, _, features = tiny
    records = [{"instruction": "hello there", "input": "", "output": "hi! how are you today?"}] * 5
    dataset = train_throughput.chunked_dataset(16)(records, tokenizer, 512)
    ids = [t for row in dataset for t in row["input_ids"]]
    assert ids == features[0]["input_ids"] * 5
    assert all(row["length"] == 16 for row in list(dataset)[:-1])


@pytest.mark.parametrize("script", ["train_throughput", "operator_scale", "chat_latency", "base_style"])
def test_script_help(script: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"bench.{script}", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
