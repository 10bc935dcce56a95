"""The container images and their tags, read from their one source: the `images:` block of deploy/kustomization.yaml.

Shell scripts read the same block without a YAML tool: `sed -n 's/^ *newTag: *//p' deploy/kustomization.yaml`
(one tag for all images; tests/test_images.py keeps it so). Not named `devkit.images`: run from the repository root,
that name would resolve to the folder devkit/images/ (a namespace package) instead of this module.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from devkit.paths import DEPLOY

KUSTOMIZATION = DEPLOY / "kustomization.yaml"


def image_tags(kustomization: Path = KUSTOMIZATION) -> dict[str, str]:
    """{image name: tag}, e.g. {"llmmultichat/trainer": "4.0.0", ...}."""
    images = yaml.safe_load(kustomization.read_text(encoding="utf-8"))["images"]
    return {image["name"]: str(image["newTag"]) for image in images}
