"""The command line as the operator's pod runs it: real subprocesses, a real HTTP history endpoint, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from training.data import parse_time
from training.history import HistoryClient, HistoryError
from training.lora_tuning import main
from training.publish import list_versions

pytestmark = pytest.mark.slow

TOKEN = "s3cret"


def trainer_cmd(base: Path, root: Path, result: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "training.lora_tuning", "--character", "lumina", "--base-model", str(base),
            "--output-root", str(root), "--result-file", str(result), "--learning-rate", "2e-3", *extra]


def last_line_json(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture
def chat_service(tmp_path: Path, base_model_dir: Path, subprocess_env: dict[str, str]) -> Any:
    """The real chat service (`python -m chat_service`, another image: run as a process, never imported) on a free
    port with an empty SQLite store; yields its base URL."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(subprocess_env, DATABASE_URL=f"sqlite:///{tmp_path / 'chat.db'}", BASE_MODEL=str(base_model_dir),
               ADAPTERS_ROOT=str(tmp_path / "served"), HISTORY_TOKEN=TOKEN, CHAT_TORCH_THREADS="1",
               CHAT_LOG_LEVEL="warning")
    process = subprocess.Popen([sys.executable, "-m", "chat_service", "--host", "127.0.0.1", "--port", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"chat service exited: {process.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "chat service did not start"
            try:
                if httpx.get(f"{url}/v1/characters", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_end_to_end_against_the_running_chat_service(
    tmp_path: Path, base_model_dir: Path, chat_service: str, make_voice_history: Any, subprocess_env: dict[str, str]
) -> None:
    """Contract §1 from the trainer's side against the real service, then the whole CLI run as the pod runs it."""
    import httpx

    messages = make_voice_history(sessions=50, seed=3)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for start in range(0, len(messages), 500):  # the import endpoint takes up to 1000 messages per request
        chunk = [{k: v for k, v in m.items() if k != "id"} for m in messages[start : start + 500]]
        assert httpx.post(f"{chat_service}/v1/history", json={"messages": chunk}, headers=headers,
                          timeout=60).status_code == 201

    # The client pages through the real service (small pages: several cursors) and gets every message back intact.
    got = HistoryClient(chat_service, TOKEN, page_limit=37).fetch("lumina", None, None)
    fields = ("session_id", "role", "content", "feedback")
    assert [tuple(m[f] for f in fields) for m in got] == [tuple(m[f] for f in fields) for m in messages]
    assert [parse_time(m["created_at"]) for m in got] == [parse_time(m["created_at"]) for m in messages]
    with pytest.raises(HistoryError, match="401"):
        HistoryClient(chat_service, "wrong").fetch("lumina", None, None)
    with pytest.raises(HistoryError, match="404"):
        HistoryClient(chat_service, TOKEN).fetch("nobody", None, None)

    root, result_file = tmp_path / "adapters", tmp_path / "result.json"
    env = dict(subprocess_env, HISTORY_TOKEN=TOKEN, TRAINER_EPOCHS="1", TRAINER_BATCH_SIZE="8",
               TRAINER_MIN_EXAMPLES="50", TRAINER_EVAL_FRACTION="0.2")
    done = subprocess.run(trainer_cmd(base_model_dir, root, result_file, "--history-url", chat_service),
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(result_file.read_text(encoding="utf-8"))
    assert last_line_json(done.stdout) == result
    assert result["outcome"] == "trained" and result["reason"] is None and result["character"] == "lumina"
    assert result["path"] == f"lora_lumina/{result['version']}"
    assert list_versions(root, "lumina") == [result["version"]]
    manifest = json.loads((root / result["path"] / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["metrics"] == result["metrics"]
    assert manifest["data"]["messages"] == len(messages)
    assert manifest["training"]["epochs"] == 1 and manifest["training"]["batch_size"] == 8  # from TRAINER_* env
    assert result["examples"]["train"] + result["examples"]["eval"] == result["examples"]["pairs"] == \
        manifest["data"]["pairs"]
    assert result["metrics"]["eval_loss_adapter"] < result["metrics"]["eval_loss_base"]
    assert "tokens/s" in done.stderr  # progress is logged


def test_too_little_data_is_skipped_with_exit_0_and_nothing_written(
    tmp_path: Path, base_model_dir: Path, make_voice_history: Any, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In-process through ``main`` (what ``python -m`` exits with): the skip happens before any model is loaded."""
    for key in [k for k in os.environ if k.startswith("TRAINER_")]:
        monkeypatch.delenv(key)
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in make_voice_history(sessions=8)),
                       encoding="utf-8")
    root, result_file = tmp_path / "adapters", tmp_path / "result.json"
    code = main(trainer_cmd(base_model_dir, root, result_file, "--history-file", str(history))[3:])
    assert code == 0
    result = json.loads(result_file.read_text(encoding="utf-8"))
    assert last_line_json(capsys.readouterr().out) == result
    pairs = result["examples"]["pairs"]
    assert result["outcome"] == "skipped" and 0 < pairs < 100
    assert result["reason"] == f"too little data: {pairs} < 100 examples"
    assert result["version"] is None and result["path"] is None
    assert not root.exists()


def test_failures_exit_non_zero_with_a_reason(
    tmp_path: Path, base_model_dir: Path, history_server: Any, make_voice_history: Any,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In-process through ``main`` (the same code ``python -m`` runs): no model is loaded on these paths."""
    root, result_file = tmp_path / "adapters", tmp_path / "result.json"
    for key in [k for k in os.environ if k.startswith("TRAINER_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HISTORY_TOKEN", "wrong")
    with history_server(make_voice_history(sessions=3), token=TOKEN) as server:
        code = main(trainer_cmd(base_model_dir, root, result_file, "--history-url", server.url)[3:])
    assert code == 1
    result = json.loads(result_file.read_text(encoding="utf-8"))
    assert last_line_json(capsys.readouterr().out) == result
    assert result["outcome"] == "failed" and "401" in result["reason"] and "HISTORY_TOKEN" in result["reason"]
    assert not root.exists()

    result_file.unlink()
    assert main(trainer_cmd(base_model_dir, root, result_file)[3:]) == 2
    assert last_line_json(capsys.readouterr().out)["reason"] == (
        "usage: give exactly one of --history-url or --history-file")
    assert json.loads(result_file.read_text(encoding="utf-8"))["outcome"] == "failed"
    assert main(["--history-file", "x.jsonl"]) == 2
    assert last_line_json(capsys.readouterr().out)["reason"] == "usage: --character is required"
    monkeypatch.setenv("TRAINER_EPOCHS", "three")
    assert main(trainer_cmd(base_model_dir, root, result_file, "--history-file", "x.jsonl")[3:]) == 2
    assert "TRAINER_EPOCHS='three'" in last_line_json(capsys.readouterr().out)["reason"]


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_during_publish_leaves_previous_versions_intact_and_no_partial_one(
    sig: signal.Signals, tmp_path: Path, base_model_dir: Path, make_voice_history: Any, subprocess_env: dict[str, str]
) -> None:
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in make_voice_history(sessions=40)),
                       encoding="utf-8")
    root, result_file = tmp_path / "adapters", tmp_path / "result.json"
    previous = root / "lora_lumina" / "20261026T030000Z"
    previous.mkdir(parents=True)
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": b"old weights", "manifest.json": b"{}"}
    for name, content in files.items():
        (previous / name).write_bytes(content)

    env = dict(subprocess_env, TRAINING_TEST_PAUSE="publish:120")
    cmd = trainer_cmd(base_model_dir, root, result_file, "--history-file", str(history), "--epochs", "1",
                      "--batch-size", "8", "--min-examples", "30")
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 240
        assert process.stdout is not None
        for line in process.stdout:  # blocks until the trainer says it is inside publish
            if line.startswith("publish: paused"):
                break
            assert time.monotonic() < deadline
        else:
            pytest.fail(f"the trainer ended before publishing (exit {process.wait()})")
        work = [p for p in (root / "lora_lumina").iterdir() if p.name.startswith(".tmp-")]
        assert len(work) == 1 and (work[0] / "adapter_model.safetensors").is_file()  # written, not yet renamed
        os.kill(process.pid, sig)
        rest = process.stdout.read()
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert list_versions(root, "lumina") == [previous.name]
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == files
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM
        result = json.loads(result_file.read_text(encoding="utf-8"))
        assert result["outcome"] == "failed" and "SIGTERM" in result["reason"]
        assert last_line_json(rest) == result
        assert [p.name for p in (root / "lora_lumina").iterdir()] == [previous.name]  # work dir cleaned up
    else:
        assert code == -signal.SIGKILL
        # SIGKILL cannot be caught: the hidden work dir stays (readers ignore it; a later run removes it when old).
        assert all(p.name.startswith(".tmp-") for p in (root / "lora_lumina").iterdir() if p != previous)


def test_torchrun_two_processes_train_one_adapter_and_publish_once(
    tmp_path: Path, base_model_dir: Path, make_voice_history: Any, subprocess_env: dict[str, str]
) -> None:
    """Data parallel on the CPU (gloo), as the GPU case runs with NCCL: the same code, no flags."""
    history = tmp_path / "history.jsonl"
    history.write_text("".join(json.dumps(m, ensure_ascii=False) + "\n" for m in make_voice_history(sessions=40)),
                       encoding="utf-8")
    root, result_file = tmp_path / "adapters", tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "training.lora_tuning", *trainer_cmd(base_model_dir, root, result_file)[3:],
           "--history-file", str(history), "--epochs", "1", "--batch-size", "4", "--min-examples", "30"]
    done = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [line for line in done.stdout.splitlines() if line.startswith('{"outcome"')]
    assert len(results) == 1  # rank 0 alone reports
    result = json.loads(result_file.read_text(encoding="utf-8"))
    assert json.loads(results[0]) == result and result["outcome"] == "trained"
    assert list_versions(root, "lumina") == [result["version"]]  # rank 0 alone publishes
    assert "2 process(es)" in done.stderr
    manifest = json.loads((root / result["path"] / "manifest.json").read_text(encoding="utf-8"))
    # Each step takes a batch of 4 on each of the 2 processes.
    assert manifest["training"]["steps"] == -(-result["examples"]["train"] // 8)
