"""The trainer's one-line JSON result (contract §3)."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import __version__

MAX_BYTES = 4096
DEFAULT_RESULT_FILE = "/dev/termination-log"

Outcome = Literal["trained", "skipped", "failed"]


@dataclass
class Result:
    outcome: Outcome
    character: str
    version: str | None = None
    path: str | None = None
    serving_version: str | None = None
    examples: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float | None] = field(default_factory=dict)
    compatibility: dict[str, Any] = field(default_factory=dict)  # serving engines that can load the adapter
    reason: str | None = None
    trainer_version: str = __version__

    @property
    def exit_code(self) -> int:
        return 0 if self.outcome in ("trained", "skipped") else 1

    def to_json(self) -> str:
        """Compact JSON of at most 4096 UTF-8 bytes; an over-long ``reason`` is cut (with "…") to fit."""
        data: dict[str, Any] = asdict(self)
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        if len(text.encode("utf-8")) <= MAX_BYTES:
            return text
        reason = data.get("reason") or ""
        data["reason"] = ""
        room = MAX_BYTES - len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        # json escaping can grow a character to 6 bytes (\uXXXX) and UTF-8 to 4: cut until it fits.
        cut = reason[: max(room - 1, 0)]
        while True:
            data["reason"] = cut + "…"
            text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            if len(text.encode("utf-8")) <= MAX_BYTES or not cut:
                break
            cut = cut[: max(len(cut) - max(len(cut) // 8, 1), 0)]
        if len(text.encode("utf-8")) > MAX_BYTES:
            raise ValueError("result does not fit in 4096 bytes even without a reason")
        return text


def default_result_file() -> str | None:
    return DEFAULT_RESULT_FILE if Path(DEFAULT_RESULT_FILE).exists() else None


def emit(result: Result, result_file: str | None) -> str:
    """Write the result to ``result_file`` (if any) and as the last line of stdout."""
    text = result.to_json()
    if result_file:
        try:
            with open(result_file, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            print(f"could not write result file {result_file}: {exc}", file=sys.stderr, flush=True)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return text
