"""The README stays true to what ships: its first commands, and a row for every field of the CRD's spec."""

from __future__ import annotations

import re

import yaml
from devkit.paths import REPO_ROOT as REPO


def _spec_fields(schema: dict, prefix: str = "") -> list[str]:
    fields = []
    for name, prop in schema.get("properties", {}).items():
        fields.append(prefix + name)
        if prop.get("type") == "object":
            fields.extend(_spec_fields(prop, f"{prefix}{name}."))
    return fields


def test_readme_starts_with_demo_and_test() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands[:2] == ["make demo", "make test"]


def test_readme_documents_every_spec_field() -> None:
    crd = yaml.safe_load((REPO / "crds" / "characterfinetune.yaml").read_text(encoding="utf-8"))
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    documented = set(re.findall(r"^\| `([A-Za-z.]+)` \|", (REPO / "README.md").read_text(encoding="utf-8"), re.M))
    missing = [field for field in _spec_fields(spec) if field not in documented]
    assert not missing, f"README lacks rows for: {missing}"
