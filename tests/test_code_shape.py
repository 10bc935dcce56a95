"""Product code stays readable: no function or method in the three images is longer than MAX_LINES lines, counted
from its `def` line to its last line (decorators not counted, nested functions measured on their own as well)."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

from devkit.paths import REPO_ROOT

MAX_LINES = 60
PRODUCT_DIRS = ("operator", "trainer_image", "chat_image")


def long_functions(source: str, filename: str, limit: int = MAX_LINES) -> list[str]:
    """`file:line name (N lines)` for every function in `source` longer than `limit` lines."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > limit:
                found.append(f"{filename}:{node.lineno} {node.name} ({length} lines)")
    return found


def product_files() -> list[Path]:
    return sorted(p for d in PRODUCT_DIRS for p in (REPO_ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)


def test_the_measure_counts_from_def_to_last_line() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(59))
    at_limit = f"@decorator\ndef fits():\n{body}\n"  # def + 59 lines = 60
    over = f"class C:\n    async def grows(self):\n{textwrap.indent(body, '    ')}\n        return 1\n"
    assert long_functions(at_limit, "a.py") == []
    assert long_functions(over, "b.py") == ["b.py:2 grows (61 lines)"]


def test_no_product_function_is_longer_than_the_limit() -> None:
    files = product_files()
    assert len(files) > 20, f"expected the three images' packages under {REPO_ROOT}, found {len(files)} files"
    offenders = [hit for path in files
                 for hit in long_functions(path.read_text(encoding="utf-8"), str(path.relative_to(REPO_ROOT)))]
    assert not offenders, f"functions longer than {MAX_LINES} lines (split them):\n" + "\n".join(offenders)
