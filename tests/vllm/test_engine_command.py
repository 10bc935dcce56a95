"""The local engine runs the manifest's command: devkit.vllm_engine adds only its documented local settings.

These tests read files only (no vLLM install), so they run in every `make test`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from devkit.vllm_engine import CPU_ARGS, CPU_ENV, engine_command, engine_container, expand


def test_local_command_is_the_manifest_command_plus_local_settings() -> None:
    container = engine_container()
    argv, env = engine_command(Path("/venv/bin/python"), Path("/tmp/model"), 18000)
    manifest_args = [expand(arg, {**container.env, "BASE_MODEL": "/tmp/model"}) for arg in container.args]
    assert argv[0] == "/venv/bin/python"
    assert argv[1 : len(container.command)] == list(container.command[1:])
    rest = argv[len(container.command) :]
    assert rest[: len(manifest_args)] == manifest_args
    assert rest[len(manifest_args) :] == [*CPU_ARGS, "--host=127.0.0.1", "--port=18000"]
    assert "--model=/tmp/model" in argv
    # The manifest's environment reaches the process unchanged, except the local model path; CPU settings are added.
    assert env == {**container.env, "BASE_MODEL": "/tmp/model", **CPU_ENV}


def test_manifest_enables_runtime_lora_loading() -> None:
    container = engine_container()
    assert container.command[:3] == ("python3", "-m", "vllm.entrypoints.openai.api_server")
    assert "--enable-lora" in container.args
    assert container.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    # The CPU additions never override a LoRA setting of the manifest.
    assert not any(arg.split("=")[0] in {"--enable-lora", "--max-lora-rank", "--max-loras"} for arg in CPU_ARGS)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("--model=$(BASE_MODEL)", "--model=/m"),
        ("$(UNDEFINED)", "$(UNDEFINED)"),  # Kubernetes leaves unknown references as they are
        ("$$(BASE_MODEL)", "$(BASE_MODEL)"),  # $$ escapes
        ("plain", "plain"),
    ],
)
def test_expand_follows_kubernetes_rules(value: str, expected: str) -> None:
    assert expand(value, {"BASE_MODEL": "/m"}) == expected


def test_a_manifest_without_python_command_is_refused(tmp_path: Path) -> None:
    manifest = tmp_path / "engine.yaml"
    manifest.write_text(
        "spec: {template: {spec: {containers: [{name: vllm, command: [vllm, serve], args: []}]}}}\n", encoding="utf-8"
    )
    with pytest.raises(ValueError, match="must start with python"):
        engine_command(Path("/venv/bin/python"), Path("/m"), 1, manifest=manifest)
