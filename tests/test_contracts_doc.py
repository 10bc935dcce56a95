"""The examples in docs/contracts.md are valid JSON and respect the limits the contract states."""

from __future__ import annotations

import json
import re

from devkit.paths import DOCS

CONTRACTS = DOCS / "contracts.md"


def _json_blocks() -> list[dict]:
    text = CONTRACTS.read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)```", text, flags=re.S)
    return [json.loads(b.replace('"..."', '""')) for b in blocks]


def test_contract_examples_parse() -> None:
    blocks = _json_blocks()
    assert len(blocks) == 4
    history, manifest, prompt_vector, result = blocks
    assert {"messages", "next_cursor"} <= history.keys()
    assert manifest["prompt"]["format"] in {"chat_template", "alpaca"} and manifest["schema_version"] == 2
    assert prompt_vector["prompt"].endswith("<|assistant|>\n") and prompt_vector["reply"].endswith("</s>")
    assert result["outcome"] in {"trained", "skipped", "failed"}
    assert result["compatibility"]["vllm"]["compatible"] is False and result["compatibility"]["vllm"]["reasons"]


def test_result_example_fits_termination_message() -> None:
    result = _json_blocks()[-1]
    assert len(json.dumps(result, ensure_ascii=False).encode()) <= 4096
