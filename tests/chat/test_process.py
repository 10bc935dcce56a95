"""The service as its pod runs it: `python -m chat_service`, configured by flags and environment; killed and
restarted, it still has every acknowledged message."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import pytest
from chat_service.config import Settings, parse_args
from devkit.harness import ChatProcess


def test_killed_and_restarted_service_keeps_history(base_model_dir: Path, adapters_root: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token\n")  # as a mounted Secret: trailing newline ignored
    env = os.environ | {
        "BASE_MODEL": str(base_model_dir),
        "ADAPTERS_ROOT": str(adapters_root),
        "HISTORY_TOKEN_FILE": str(token_file),
        "CHAT_DEVICE": "cpu",
        "CHAT_TORCH_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    log = tmp_path / "service.log"
    service = ChatProcess(["--db", str(tmp_path / "chat.db")], env, log)
    base = service.url
    auth = {"Authorization": "Bearer file-token"}
    process = service.start().process
    try:
        service.wait_ready(timeout=120)
        acknowledged = []
        for i in range(3):
            response = httpx.post(
                f"{base}/v1/chat", json={"character": "sora", "message": f"m{i}", "max_tokens": 2}, timeout=60
            )
            assert response.status_code == 200
            acknowledged.append(response.json())
        feedback = {"message_id": acknowledged[0]["message_id"], "feedback": "down"}
        assert httpx.post(f"{base}/v1/feedback", json=feedback).status_code == 200
        before = httpx.get(f"{base}/v1/history", params={"character": "sora"}, headers=auth).json()
    finally:
        # SIGKILL: no shutdown hooks, no chance to flush anything that was not already durable.
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert len(before["messages"]) == 6

    process = service.start().process  # same port, same database file
    try:
        service.wait_ready(timeout=120)
        after = httpx.get(f"{base}/v1/history", params={"character": "sora"}, headers=auth).json()
        assert after == before
        assert after["messages"][1]["feedback"] == "down"
        assert [m["id"] for m in after["messages"][1::2]] == [a["message_id"] for a in acknowledged]
        more = httpx.post(
            f"{base}/v1/chat", json={"character": "sora", "message": "again", "max_tokens": 2}, timeout=60
        )
        assert more.json()["message_id"] > acknowledged[-1]["message_id"]
    finally:
        process.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status tells it was terminated.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()
    assert "Application shutdown complete" in log.read_text()


def test_flags_win_over_environment(tmp_path: Path) -> None:
    env = {"DATABASE_URL": "postgresql+psycopg://u@h/db", "BASE_MODEL": "env-model", "CHAT_MAX_BODY_BYTES": "2048"}
    settings, host, port = parse_args(["--port", "9000", "--db", str(tmp_path / "x.db")], env)
    assert (host, port) == ("127.0.0.1", 9000)
    assert settings.database_url == f"sqlite:///{tmp_path / 'x.db'}"
    assert settings.base_model == "env-model"
    assert settings.max_body_bytes == 2048
    settings, _, _ = parse_args(["--base-model", "flag-model", "--max-body-bytes", "4096"], env)
    assert (settings.base_model, settings.max_body_bytes, settings.database_url) == (
        "flag-model",
        4096,
        "postgresql+psycopg://u@h/db",
    )
    with pytest.raises(SystemExit):
        parse_args(["--db", "a.db", "--database-url", "sqlite:///b.db"], {})


def test_bad_flags_and_files_exit_with_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from chat_service.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--max-body-bytes", "10"], {})
    assert exit_info.value.code == 2
    assert "max_body_bytes (CHAT_MAX_BODY_BYTES)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args([], {"CHAT_DEVICE": "tpu"})
    assert "device (CHAT_DEVICE)" in capsys.readouterr().err
    missing = tmp_path / "nope.json"
    assert main(["--characters-file", str(missing), "--db", str(tmp_path / "x.db")]) == 2
    assert f"cannot load characters from {missing}" in capsys.readouterr().err


def test_bad_settings_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_body_bytes"):
        Settings.from_env({"CHAT_MAX_BODY_BYTES": "lots"})
    with pytest.raises(ValueError, match="device"):
        Settings(device="tpu")
    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        Settings(history_token_file=empty).resolved_history_token()
    assert Settings(history_token="a").resolved_history_token() == "a"
    assert Settings().resolved_history_token() is None


def test_character_file_errors_name_the_file(tmp_path: Path) -> None:
    from chat_service.characters import CharacterConfigError, load_characters

    bad = tmp_path / "characters.json"
    bad.write_text('{"characters": [{"name": "Bad Name", "display_name": "x"}]}')
    with pytest.raises(CharacterConfigError, match=r"(?s)characters\.json.*characters\.0\.name"):
        load_characters(bad)
    bad.write_text('{"characters": [{"name": "a", "display_name": "x"}, {"name": "a", "display_name": "y"}]}')
    with pytest.raises(CharacterConfigError, match="duplicate"):
        load_characters(bad)
    assert set(load_characters(Settings().characters_file)) >= {"lumina", "sora"}
