"""Bearer tokens are compared in constant time: no `==`/`!=`/`in` on a token in product code, and every module that
refuses a wrong bearer token compares with `hmac.compare_digest`."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from devkit.paths import REPO_ROOT

PRODUCT = [REPO_ROOT / "chat_image" / "chat_service", REPO_ROOT / "operator" / "finetune_operator",
           REPO_ROOT / "trainer_image" / "training"]
SECRET_NAME = re.compile(r"(^|_)(token|credentials|secret|password)$", re.IGNORECASE)
COMPARISONS = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)


def names_in(node: ast.AST) -> set[str]:
    found = set()
    for child in ast.walk(node):
        if isinstance(child, ast.Name):
            found.add(child.id)
        elif isinstance(child, ast.Attribute):
            found.add(child.attr)
    return found


def secret_comparisons(source: str) -> list[str]:
    """`line: code` of each comparison (other than with None) that has a secret-named value on one side."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare) or not any(isinstance(op, COMPARISONS) for op in node.ops):
            continue
        operands = [node.left, *node.comparators]
        if any(isinstance(o, ast.Constant) and o.value is None for o in operands):
            continue  # "is there a token at all", not its value
        if any(SECRET_NAME.search(name) for operand in operands for name in names_in(operand)):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def product_modules() -> list[Path]:
    return sorted(p for root in PRODUCT for p in root.rglob("*.py"))


def test_no_token_is_compared_with_an_operator() -> None:
    offending = {str(p.relative_to(REPO_ROOT)): secret_comparisons(p.read_text(encoding="utf-8"))
                 for p in product_modules()}
    assert {path: found for path, found in offending.items() if found} == {}


def test_every_token_check_uses_compare_digest() -> None:
    checks = [p for p in product_modules() if "invalid bearer token" in p.read_text(encoding="utf-8")]
    assert checks, "no module refuses an invalid bearer token?"
    assert [str(p.relative_to(REPO_ROOT)) for p in checks
            if "hmac.compare_digest(" not in p.read_text(encoding="utf-8")] == []


@pytest.mark.parametrize(("code", "found"), [
    ("ok = credentials.credentials == expected", True),
    ("ok = header != f'Bearer {self.history_token}'", True),
    ("ok = token in allowed", True),
    ("ok = token is None", False),
    ("ok = hmac.compare_digest(given.encode(), expected.encode())", False),
    ("ok = max_tokens == 3", False),
])
def test_the_check_finds_comparisons(code: str, found: bool) -> None:
    assert bool(secret_comparisons(code)) is found
