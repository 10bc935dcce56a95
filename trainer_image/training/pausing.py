"""Test hook: ``TRAINING_TEST_PAUSE=<phase>:<seconds>`` makes the trainer stop for that long at one point inside a
phase — ``collect`` (the history read), ``train`` (after the first optimizer step), ``evaluate`` (held-out losses
computed, the before/after samples not yet), ``publish`` (files written and fsynced, not yet renamed) — and say so
on stdout (``<phase>: paused ...``), so a test can kill the trainer there. Not a ``TRAINER_*`` name, so it can
never be mistaken for a flag; unset, each point costs one environment lookup.
"""

from __future__ import annotations

import os
import time

PAUSE_ENV = "TRAINING_TEST_PAUSE"
PHASES = ("collect", "train", "evaluate", "publish")


def pause_point(phase: str, detail: str = "") -> None:
    """Sleeps here when ``TRAINING_TEST_PAUSE`` names ``phase``."""
    assert phase in PHASES, phase
    wanted, _, seconds = os.environ.get(PAUSE_ENV, "").partition(":")
    if wanted != phase:
        return
    print(f"{phase}: paused {detail}".rstrip(), flush=True)
    time.sleep(float(seconds or 0))
