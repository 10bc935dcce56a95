"""Image names and tags have one source, the `images:` block of deploy/kustomization.yaml; everything that builds,
loads, deploys or defaults to an image agrees with it."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from devkit.cluster import Cluster
from devkit.image_tags import KUSTOMIZATION, image_tags
from devkit.paths import DEPLOY, REPO_ROOT
from finetune_operator.settings import Settings

NAMES = {"llmmultichat/operator", "llmmultichat/trainer", "llmmultichat/chat"}
KIND_E2E = REPO_ROOT / "devkit" / "kind-e2e.sh"


def the_tag() -> str:
    tags = set(image_tags().values())
    assert len(tags) == 1, f"one tag for all images in {KUSTOMIZATION}, got {tags}"
    return tags.pop()


def refs() -> set[str]:
    return {f"{name}:{tag}" for name, tag in image_tags().items()}


def image_refs_in(node: Any) -> Iterator[str]:
    """Container images and env values that name one of our images, anywhere in a manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("image", "value") and isinstance(value, str) and value.startswith("llmmultichat/"):
                yield value
            yield from image_refs_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from image_refs_in(item)


def test_one_tag_for_the_three_images_and_it_is_the_release() -> None:
    assert set(image_tags()) == NAMES
    release = re.search(r"^## v(\S+)", (REPO_ROOT / "CHANGELOG.md").read_text(encoding="utf-8"), re.MULTILINE)
    assert release is not None and the_tag() == release.group(1)


def test_every_manifest_names_the_kustomization_tags() -> None:
    found: dict[str, set[str]] = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc and doc.get("kind") != "Kustomization":
                for ref in image_refs_in(doc):
                    found.setdefault(ref, set()).add(str(path.relative_to(REPO_ROOT)))
    assert set(found) == refs(), found
    # The operator's own image and the trainer image it hands to CronJobs are both in the operator's Deployment.
    assert found[f"llmmultichat/trainer:{the_tag()}"] == {"deploy/operator/deployment.yaml"}


def test_operator_default_trainer_image_is_the_release() -> None:
    assert Settings.model_fields["trainer_image"].default == f"llmmultichat/trainer:{the_tag()}"


def test_make_images_builds_the_kustomization_tags() -> None:
    dry_run = subprocess.run(["make", "-n", "images"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert set(re.findall(r"-t (\S+)", dry_run.stdout)) == refs()


def test_kind_script_loads_the_kustomization_tags() -> None:
    script = KIND_E2E.read_text(encoding="utf-8")
    assert not re.search(r"llmmultichat/\w+:\d", script), "kind-e2e.sh must not spell a tag of its own"
    tag_line = re.search(r"^TAG=.*$", script, re.MULTILINE)
    assert tag_line is not None
    shown = subprocess.run(["bash", "-c", f"set -euo pipefail; {tag_line.group(0)}; echo \"$TAG\""], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == the_tag()
    loaded = re.search(r'^for image in (.+); do\n\s+kind load docker-image .*"llmmultichat/\$image:\$TAG"', script,
                       re.MULTILINE)
    assert loaded is not None and {f"llmmultichat/{name}" for name in loaded.group(1).split()} == NAMES


@pytest.mark.cluster
def test_kustomize_set_image_reaches_the_operators_trainer_image(cluster: Cluster, tmp_path: Path) -> None:
    """Pointing deploy/ at a registry (`kustomize edit set image`) also moves the trainer image the operator uses."""
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    shutil.copytree(REPO_ROOT / "crds", tmp_path / "crds")
    kustomization = tmp_path / "deploy" / "kustomization.yaml"
    config = yaml.safe_load(kustomization.read_text(encoding="utf-8"))
    for image in config["images"]:
        image.update(newName=image["name"].replace("llmmultichat/", "registry.example/"), newTag="9.9.9")
    kustomization.write_text(yaml.safe_dump(config), encoding="utf-8")
    rendered = cluster.kubectl("kustomize", str(tmp_path / "deploy")).stdout
    found = {ref for doc in yaml.safe_load_all(rendered) if doc for ref in image_refs_in(doc)}
    assert not found  # no llmmultichat/ reference is left
    deployments = [doc for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] == "Deployment"]
    operator = next(d for d in deployments if d["metadata"]["name"] == "finetune-operator")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/operator:9.9.9"
    assert {e["name"]: e.get("value") for e in container["env"]}["FINETUNE_TRAINER_IMAGE"] == \
        "registry.example/trainer:9.9.9"
