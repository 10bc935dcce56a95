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
    assert len(blocks) == 3
    history, manifest, result = blocks
    assert {"messages", "next_cursor"} <= history.keys()
    assert manifest["prompt_template"].format(instruction="a", input="") == "Instruction: a\nInput: \nOutput: "
    assert result["outcome"] in {"trained", "skipped", "failed"}


def test_result_example_fits_termination_message() -> None:
    result = _json_blocks()[2]
    assert len(json.dumps(result, ensure_ascii=False).encode()) <= 4096
