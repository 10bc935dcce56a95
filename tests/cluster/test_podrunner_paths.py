"""How the pod runner turns container paths and $(VAR) references into local ones (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

from devkit.podrunner import _expand, _path_rewriter


def test_mount_paths_are_rewritten_only_as_whole_path_prefixes() -> None:
    rewrite = _path_rewriter(["/data", "/models/base", "/models", "/dev/termination-log"], Path("/sb"))
    assert rewrite("/data") == "/sb/data"
    assert rewrite("--output-root=/data/run-1") == "--output-root=/sb/data/run-1"
    assert rewrite("/database") == "/database"
    assert rewrite("/srv/data") == "/srv/data"
    assert rewrite("/models/base/config.json") == "/sb/models/base/config.json"
    assert rewrite("/models/lora_x") == "/sb/models/lora_x"
    assert rewrite("--result-file /dev/termination-log") == "--result-file /sb/dev/termination-log"
    assert rewrite("a:/data:/models") == "a:/sb/data:/sb/models"


def test_a_directory_holding_mounts_maps_to_its_sandbox_twin_as_a_whole_value() -> None:
    # The chat service's ADAPTERS_ROOT=/models holds per-character mounts at /models/lora_<character>.
    rewrite = _path_rewriter(["/models/lora_lumina", "/dev/shm", "/dev/termination-log"], Path("/sb"))
    assert rewrite("/models") == "/sb/models"
    assert rewrite("/models/") == "/sb/models"
    assert rewrite("/models/lora_lumina/adapter_config.json") == "/sb/models/lora_lumina/adapter_config.json"
    assert rewrite("/dev/null") == "/dev/null"
    assert rewrite("/models/other") == "/models/other"


def test_variable_references_expand_like_kubernetes() -> None:
    env = {"ROOT": "/data", "N": "3"}
    assert _expand("$(ROOT)/run-$(N)", env) == "/data/run-3"
    assert _expand("$(MISSING) stays", env) == "$(MISSING) stays"
    assert _expand("$$(ROOT) is escaped", env) == "$(ROOT) is escaped"
