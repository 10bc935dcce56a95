"""Where things are in the checkout the dev kit is installed from (editable, by `make venv`)."""

from __future__ import annotations

import os
from pathlib import Path

_MARKER = Path("crds") / "characterfinetune.yaml"


def _find_repo_root() -> Path:
    # $LLMMULTICHAT_REPO wins; otherwise the nearest folder above this file that holds the CRD.
    if override := os.environ.get("LLMMULTICHAT_REPO"):
        return Path(override).resolve()
    for folder in Path(__file__).resolve().parents:
        if (folder / _MARKER).is_file():
            return folder
    raise RuntimeError(f"devkit is not installed from a checkout of this project (no {_MARKER} above {__file__}); "
                       "set LLMMULTICHAT_REPO to the checkout")


REPO_ROOT = _find_repo_root()
CRD = REPO_ROOT / _MARKER
DEPLOY = REPO_ROOT / "deploy"
DOCS = REPO_ROOT / "docs"
BENCH = REPO_ROOT / "bench"
CONTROL_PLANE_SRC = REPO_ROOT / "devkit" / "control-plane"
SAMPLE_FINETUNE = DEPLOY / "samples" / "finetune.yaml"
