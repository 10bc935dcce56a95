"""Operator settings from the environment (no cluster)."""

from __future__ import annotations

import pytest
from finetune_operator.__main__ import parse_args
from finetune_operator.settings import Settings


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s.clusterwide and s.namespaces == ()
    assert s.metrics_port == 8080 and s.peering_name == "finetune-operator"
    assert s.history_limit > s.successful_jobs_history + s.failed_jobs_history


def test_from_env() -> None:
    s = Settings.from_env({"FINETUNE_NAMESPACES": "a, b,", "FINETUNE_TRAINER_IMAGE": "img:1",
                           "FINETUNE_RESYNC_SECONDS": "2.5", "FINETUNE_METRICS_PORT": "0",
                           "FINETUNE_LOG_FORMAT": "plain", "FINETUNE_CRASH_POINT": "after-run-recorded"})
    assert s.namespaces == ("a", "b") and not s.clusterwide
    assert s.trainer_image == "img:1" and s.resync_seconds == 2.5 and s.metrics_port == 0
    assert s.log_format == "plain" and s.crash_point == "after-run-recorded"


@pytest.mark.parametrize("env", [
    {"FINETUNE_HISTORY_LIMIT": "6"},  # not more than 3 + 3 kept Jobs: a Job could be recorded twice
    {"FINETUNE_HISTORY_LIMIT": "50"},
    {"FINETUNE_RESYNC_SECONDS": "0"},
    {"FINETUNE_LOG_FORMAT": "xml"},
])
def test_invalid_settings_are_refused_at_startup(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        Settings.from_env(env)


def test_cli_scope_flags() -> None:
    assert parse_args(["-n", "a", "-n", "b"]).namespace == ["a", "b"]
    assert parse_args(["-A"]).all_namespaces
    with pytest.raises(SystemExit):
        parse_args(["-A", "-n", "a"])
