"""The chat API tried systematically: schemathesis (`st run`, every check, all phases including the stateful one)
generates requests from the service's own OpenAPI document and sends them over real HTTP to a real
`python -m chat_service` process, once with the history token and once without any.

Passing means 0 server errors and 0 contract mismatches: every answer's status code, content type, headers and body
are the ones the document declares, schema-valid requests are accepted (except by the rules the document states,
tests/reliability/schemathesis.toml), schema-violating ones are refused, and the token is not ignored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devkit.harness import ChatProcess
from devkit.model import ensure_embedded_model

TOKEN = "fuzz-history-token"
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChatProcess]:
    workdir = tmp_path_factory.mktemp("fuzz")
    (workdir / "models").mkdir()
    env = {**os.environ, "HISTORY_TOKEN": TOKEN, "BASE_MODEL": str(ensure_embedded_model(progress=False)),
           "HF_HUB_OFFLINE": "1", "CHAT_DEVICE": "cpu", "CHAT_TORCH_THREADS": "1", "CHAT_LOG_LEVEL": "warning"}
    process = ChatProcess(["--db", str(workdir / "chat.db"), "--adapters-root", str(workdir / "models")], env,
                          workdir / "chat.log").start()
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def schemathesis_run(chat: ChatProcess, report_dir: Path, *headers: str) -> dict[str, Any]:
    """`st run` against the live service; its JSON run report."""
    command = [str(Path(sys.executable).with_name("st")), "--config-file", str(CONFIG), "run",
               f"{chat.url}/openapi.json", "--checks", "all", "--workers", "1", "--seed", "20261201",
               "--max-examples", str(EXAMPLES_PER_OPERATION), "--generation-database", "none", "--no-color",
               "--report", "json", "--report-dir", str(report_dir), "--request-timeout", "60"]
    for header in headers:
        command += ["--header", header]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    reports = sorted(report_dir.glob("*.json"))
    assert reports, f"st wrote no report (exit {done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    report: dict[str, Any] = json.loads(reports[-1].read_text(encoding="utf-8"))
    report["output"] = done.stdout
    print(f"schemathesis {' '.join(headers) or 'without token'}: {report['test_cases']}")
    return report


@pytest.mark.parametrize("with_token", [True, False], ids=["with-token", "without-token"])
def test_schemathesis_finds_no_server_error_and_no_contract_mismatch(chat: ChatProcess, tmp_path: Path,
                                                                       with_token: bool) -> None:
    headers = [f"Authorization: Bearer {TOKEN}"] if with_token else []
    report = schemathesis_run(chat, tmp_path, *headers)
    assert report["complete"] and report["errors"] == [], report["output"][-6000:]
    assert report["failures"] == [], report["output"][-12000:]
    assert report["operations"]["tested"] == report["operations"]["selected"] >= 10
    assert report["test_cases"]["generated"] >= 200
    assert all(report["phases"][phase]["status"] == "success" for phase in ("examples", "coverage", "fuzzing",
                                                                              "stateful"))
