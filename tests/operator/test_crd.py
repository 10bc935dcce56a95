"""The CRD file itself: structural, documented, defaults agreeing with the operator, validation regexes right.

What the API server does with it (refusing malformed resources) is tested against the real API server in
test_validation_cluster.py; these checks catch mistakes before a cluster is needed.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from devkit.paths import CRD as CRD_PATH
from finetune_operator.spec import DEFAULT_SCHEDULE, FineTuneSpec


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_PATH.read_text())


@pytest.fixture(scope="module")
def schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = [(path, node)]
    for key, child in (node.get("properties") or {}).items():
        out += walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        out += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += walk(node["additionalProperties"], f"{path}{{}}")
    return out


def rule_regex(rule: str) -> re.Pattern[str]:
    match = re.fullmatch(r"self\.matches\('(.*)'\)", rule.strip())
    assert match, rule
    return re.compile(match.group(1))


def test_identity(crd: dict[str, Any]) -> None:
    assert crd["metadata"]["name"] == "characterfinetunes.llmmultichat.io"
    assert crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["shortNames"] == ["cft"]
    version = crd["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if c.get("priority", 0) == 0]
    assert columns[:5] == ["Character", "Schedule", "Phase", "Serving", "Last Run"] and columns[-1] == "Age"


def test_every_field_is_typed_and_described(schema: dict[str, Any]) -> None:
    missing = []
    for path, node in walk(schema):
        if path in (".metadata",):
            continue
        if not node.get("description"):
            missing.append(f"{path}: description")
        if "type" not in node and not node.get("x-kubernetes-int-or-string"):
            missing.append(f"{path}: type")
    assert not missing, missing


def test_no_open_objects_in_spec(schema: dict[str, Any]) -> None:
    # Unknown fields must be refused (fieldValidation=Strict), so nothing may preserve unknown fields.
    for path, node in walk(schema["properties"]["spec"], ".spec"):
        assert not node.get("x-kubernetes-preserve-unknown-fields"), path
        if node.get("type") == "object":
            assert node.get("properties") or isinstance(node.get("additionalProperties"), dict), path


def test_defaults_agree_with_the_operator(schema: dict[str, Any]) -> None:
    spec_schema = schema["properties"]["spec"]["properties"]

    def default(*path: str) -> Any:
        node: dict[str, Any] = {"properties": spec_schema}
        for part in path:
            node = node["properties"][part]
        return node["default"]

    minimal = FineTuneSpec.from_dict({
        "character": "lumina", "data": {"historyURL": "http://chat", "tokenSecretRef": {"name": "t"}},
        "adapterStorage": {"claimName": "adapters"}, "target": {"deployment": "chat"},
    })
    assert default("schedule") == DEFAULT_SCHEDULE == minimal.schedule == "0 3 1 * *"
    assert default("suspend") is minimal.suspend is False
    assert default("data", "windowDays") == minimal.data.window_days == 30
    assert default("data", "minExamples") == minimal.data.min_examples == 100
    assert default("data", "tokenSecretRef", "key") == minimal.data.token.key
    assert default("lora", "r") == minimal.lora.r == 8
    assert default("lora", "alpha") == minimal.lora.alpha == 16
    assert default("lora", "dropout") == minimal.lora.dropout == 0.1
    assert default("training", "epochs") == minimal.training.epochs == 3
    assert default("training", "batchSize") == minimal.training.batch_size == 4
    assert default("training", "learningRate") == minimal.training.learning_rate
    assert default("training", "maxLength") == minimal.training.max_length
    assert default("training", "activeDeadlineSeconds") == minimal.training.active_deadline_seconds
    assert default("training", "backoffLimit") == minimal.training.backoff_limit
    assert default("resources", "gpus") == minimal.resources.gpus == 1
    assert default("resources", "shmSize") == minimal.resources.shm_size
    assert default("adapterStorage", "keepVersions") == minimal.adapter_storage.keep_versions == 5
    assert default("target", "container") == minimal.target.container
    assert default("promotion", "mode") == minimal.promotion.mode == "Auto"
    assert default("promotion", "minImprovement") == minimal.promotion.min_improvement


GOOD_CRONS = ["0 3 1 * *", "*/15 * * * *", "0 0 * * 0", "30 2 1,15 * mon-fri", "0 3 1 jan,jul *",
              "5 4 * * SUN", "0 22 * * 1-5", "0 0 1 */3 *", "59 23 31 12 7", "@monthly", "@weekly",
              "@yearly", "@annually", "@daily", "@midnight", "@hourly", "0  3 1 * *"]
BAD_CRONS = ["", "0 3 1 *", "0 3 1 * * *", "60 3 1 * *", "0 24 1 * *", "0 3 0 * *", "0 3 32 * *",
             "0 3 1 13 *", "0 3 1 * 8", "@every 1h", "@Monthly", "monthly", "0 3 1 * * 2026", " 0 3 1 * *",
             "0 3 1 * *\n", "CRON_TZ=UTC 0 3 1 * *", "a b c d e", "0 3 1 * funday"]


@pytest.mark.parametrize("cron", GOOD_CRONS)
def test_schedule_rule_accepts(schema: dict[str, Any], cron: str) -> None:
    rule = schema["properties"]["spec"]["properties"]["schedule"]["x-kubernetes-validations"][0]["rule"]
    assert rule_regex(rule).search(cron)


@pytest.mark.parametrize("cron", BAD_CRONS)
def test_schedule_rule_refuses(schema: dict[str, Any], cron: str) -> None:
    rule = schema["properties"]["spec"]["properties"]["schedule"]["x-kubernetes-validations"][0]["rule"]
    # RE2 (CEL) and Python agree on this subset: no backreferences, no lookaround, `$` only at the end.
    assert not re.fullmatch(rule_regex(rule).pattern.rstrip("$") + r"\Z", cron)


@pytest.mark.parametrize(("name", "ok"), [("lumina", True), ("sora-2", True), ("a", True), ("Lumina", False),
                                          ("-x", False), ("x-", False), ("x_y", False), ("", False)])
def test_character_rule(schema: dict[str, Any], name: str, ok: bool) -> None:
    rule = schema["properties"]["spec"]["properties"]["character"]["x-kubernetes-validations"][0]["rule"]
    assert bool(rule_regex(rule).search(name)) is ok


@pytest.mark.parametrize(("version", "ok"), [("20261126T030000Z", True), ("2026-11-26", False),
                                             ("20261126T0300Z", False), ("latest", False)])
def test_pinned_version_rule(schema: dict[str, Any], version: str, ok: bool) -> None:
    rule = schema["properties"]["spec"]["properties"]["pinnedVersion"]["x-kubernetes-validations"][0]["rule"]
    assert bool(rule_regex(rule).search(version)) is ok


def test_status_conditions_are_a_map_keyed_by_type(schema: dict[str, Any]) -> None:
    conditions = schema["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert {"type", "status", "reason", "message", "lastTransitionTime"} <= set(conditions["items"]["required"])
