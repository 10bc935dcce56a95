"""Operator settings from the environment, the command line on top, and nothing read at import (no cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from finetune_operator.__main__ import parse_args, resolve
from finetune_operator.settings import Settings


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The test's environment, without the FINETUNE_* variables of whoever runs the tests."""
    for name in [n for n in os.environ if n.startswith("FINETUNE_")]:
        monkeypatch.delenv(name)
    return monkeypatch


def set_env(environ: pytest.MonkeyPatch, values: dict[str, str]) -> None:
    for name, value in values.items():
        environ.setenv(name, value)


def test_defaults(environ: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.clusterwide and s.namespaces == ()
    assert s.metrics_port == 8080 and s.peering_name == "finetune-operator"
    assert s.history_limit > s.successful_jobs_history + s.failed_jobs_history


def test_from_env(environ: pytest.MonkeyPatch) -> None:
    set_env(environ, {"FINETUNE_NAMESPACES": "a, b,", "FINETUNE_TRAINER_IMAGE": "img:1",
                      "FINETUNE_RESYNC_SECONDS": "2.5", "FINETUNE_METRICS_PORT": "0",
                      "FINETUNE_LOG_FORMAT": "plain", "FINETUNE_CRASH_POINT": "after-run-recorded"})
    s = Settings()
    assert s.namespaces == ("a", "b") and not s.clusterwide
    assert s.trainer_image == "img:1" and s.resync_seconds == 2.5 and s.metrics_port == 0
    assert s.log_format == "plain" and s.crash_point == "after-run-recorded"


def test_every_documented_variable_is_read(environ: pytest.MonkeyPatch) -> None:
    # The names are in users' manifests (deploy/operator/deployment.yaml, docs/operator.md): each must still work.
    set_env(environ, {"FINETUNE_LIVENESS_ENDPOINT": "http://127.0.0.1:1/healthz", "FINETUNE_PEERING_NAME": "p",
                      "FINETUNE_PEERING_PRIORITY": "7", "FINETUNE_ROLLOUT_POLL_SECONDS": "0.5",
                      "FINETUNE_HISTORY_LIMIT": "12", "FINETUNE_SUCCESSFUL_JOBS_HISTORY": "4",
                      "FINETUNE_FAILED_JOBS_HISTORY": "5", "FINETUNE_STARTING_DEADLINE_SECONDS": "60",
                      "FINETUNE_TTL_SECONDS_AFTER_FINISHED": "120", "FINETUNE_TRAINER_UID": "1234"})
    s = Settings()
    assert (s.liveness_endpoint, s.peering_name, s.peering_priority, s.rollout_poll_seconds) == \
        ("http://127.0.0.1:1/healthz", "p", 7, 0.5)
    assert (s.history_limit, s.successful_jobs_history, s.failed_jobs_history) == (12, 4, 5)
    assert (s.starting_deadline_seconds, s.ttl_seconds_after_finished, s.trainer_uid) == (60, 120, 1234)


def test_empty_values_keep_the_default_except_where_empty_means_off(environ: pytest.MonkeyPatch) -> None:
    set_env(environ, {"FINETUNE_METRICS_PORT": "", "FINETUNE_TRAINER_IMAGE": "", "FINETUNE_HISTORY_LIMIT": "",
                      "FINETUNE_LIVENESS_ENDPOINT": "", "FINETUNE_NAMESPACES": ""})
    s = Settings()
    assert s.metrics_port == 8080 and s.trainer_image == Settings.model_fields["trainer_image"].default
    assert s.history_limit == 10 and s.clusterwide
    assert s.liveness_endpoint == ""  # no liveness endpoint


@pytest.mark.parametrize("env", [
    {"FINETUNE_HISTORY_LIMIT": "6"},  # not more than 3 + 3 kept Jobs: a Job could be recorded twice
    {"FINETUNE_HISTORY_LIMIT": "50"},
    {"FINETUNE_RESYNC_SECONDS": "0"},
    {"FINETUNE_LOG_FORMAT": "xml"},
    {"FINETUNE_METRICS_PORT": "eighty"},
])
def test_invalid_settings_are_refused_at_startup(environ: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    set_env(environ, env)
    with pytest.raises(ValueError):
        Settings()


def test_cli_scope_flags() -> None:
    assert parse_args(["-n", "a", "-n", "b"]).namespace == ["a", "b"]
    assert parse_args(["-A"]).all_namespaces
    with pytest.raises(SystemExit):
        parse_args(["-A", "-n", "a"])


def test_flags_win_over_the_environment(environ: pytest.MonkeyPatch) -> None:
    set_env(environ, {"FINETUNE_NAMESPACES": "x,y", "FINETUNE_LIVENESS_ENDPOINT": "http://127.0.0.1:1/healthz"})
    from_env = Settings()
    assert resolve(parse_args([]), from_env).namespaces == ("x", "y")
    assert resolve(parse_args([]), from_env).liveness_endpoint == "http://127.0.0.1:1/healthz"
    assert resolve(parse_args(["-n", "a"]), from_env).namespaces == ("a",)
    assert resolve(parse_args(["-A"]), from_env).clusterwide
    assert resolve(parse_args(["--liveness", ""]), from_env).liveness_endpoint == ""


# Imports the pure modules under an environment that records what is read, with values no Settings() would accept;
# then (the probe's own check) builds Settings() and imports the handlers, which must show up in both counts.
IMPORT_PROBE = """
import json, os, sys
from collections.abc import MutableMapping

class Recording(MutableMapping):
    def __init__(self, real): self.real, self.read, self.listed = real, set(), 0
    def __getitem__(self, key): self.read.add(key); return self.real[key]
    def __setitem__(self, key, value): self.real[key] = value
    def __delitem__(self, key): del self.real[key]
    def __iter__(self): self.listed += 1; return iter(self.real)
    def __len__(self): return len(self.real)
    def __contains__(self, key): self.read.add(key); return key in self.real

def seen():
    import kopf
    registry = kopf.get_default_registry()
    handlers = [h.id for r in vars(registry).values() if hasattr(r, "get_all_handlers") for h in r.get_all_handlers()
                if h.fn.__module__.startswith("finetune_operator")]  # not kopf's own fallbacks
    return {"handlers": handlers, "handlers_module": "finetune_operator.handlers" in sys.modules,
            "env_read": sorted(k for k in os.environ.read if k.startswith("FINETUNE_")),
            "env_listed": os.environ.listed}

os.environ = Recording(os.environ)
import finetune_operator, finetune_operator.spec, finetune_operator.runs, finetune_operator.status
import finetune_operator.manifests, finetune_operator.settings
pure = seen()
try:
    finetune_operator.settings.Settings()
except ValueError:
    pass
import finetune_operator.handlers
print(json.dumps({"pure": pure, "after": seen()}))
"""


def test_importing_the_pure_modules_registers_no_handler_and_reads_no_environment() -> None:
    env = {**os.environ, "FINETUNE_HISTORY_LIMIT": "not a number", "FINETUNE_LOG_FORMAT": "xml"}
    out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], env=env, capture_output=True, text=True, check=True)
    seen = json.loads(out.stdout)
    assert seen["pure"] == {"handlers": [], "handlers_module": False, "env_read": [], "env_listed": 0}
    after = seen["after"]
    assert "reconcile" in after["handlers"] and after["handlers_module"] and after["env_listed"] > 0
