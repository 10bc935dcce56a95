"""RBAC in deploy/ names every verb, resource and API group it grants: no wildcard anywhere."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from devkit.paths import DEPLOY, REPO_ROOT

ROLE_KINDS = {"Role", "ClusterRole"}
RULE_LISTS = ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs")


def manifests() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict):
                yield path, doc


def wildcards(role: dict[str, Any]) -> list[str]:
    """Every `*` (or `*` suffix, e.g. `deployments/*`) in the role's rules, as "rule N field: value"."""
    found = []
    if role.get("aggregationRule"):
        found.append("aggregationRule: the rules come from other roles")
    for index, rule in enumerate(role.get("rules") or ()):
        for field in RULE_LISTS:
            found += [f"rule {index} {field}: {value!r}" for value in rule.get(field) or () if "*" in str(value)]
    return found


def test_deploy_has_roles_to_check() -> None:
    roles = [doc for _, doc in manifests() if doc.get("kind") in ROLE_KINDS]
    assert roles, "no Role or ClusterRole found in deploy/"
    assert all(role.get("rules") for role in roles)


def test_no_role_in_deploy_grants_a_wildcard() -> None:
    offending = {f"{path.relative_to(REPO_ROOT)} {doc['kind']}/{doc['metadata']['name']}": wildcards(doc)
                 for path, doc in manifests() if doc.get("kind") in ROLE_KINDS}
    assert {name: found for name, found in offending.items() if found} == {}


def test_the_wildcard_check_finds_wildcards() -> None:
    role = {"kind": "ClusterRole", "rules": [{"apiGroups": [""], "resources": ["pods/*"], "verbs": ["get"]},
                                             {"apiGroups": ["*"], "resources": ["jobs"], "verbs": ["*"]}]}
    assert wildcards(role) == ["rule 0 resources: 'pods/*'", "rule 1 verbs: '*'", "rule 1 apiGroups: '*'"]
