"""Fixtures for the chat service tests: a small real model, real LoRA adapters, a real PostgreSQL server and the
service itself on a real port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from chat_service.app import create_app
from chat_service.config import Settings
from devkit.harness import free_port, make_adapter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HISTORY_TOKEN = "test-history-token"


# ---------------------------------------------------------------- model and adapters


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    """The project's embedded small model (built once, cached): a real checkpoint loaded with from_pretrained."""
    from devkit.model import ensure_embedded_model

    return ensure_embedded_model(progress=False)


@pytest.fixture(scope="session")
def adapter_template(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One trained-looking adapter for lumina, built once; tests copy it."""
    root = tmp_path_factory.mktemp("adapter-template")
    return make_adapter(base_model_dir, root, "lumina", "20261126T030000Z")


@pytest.fixture
def adapters_root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


def mount_adapter(template: Path, root: Path, character: str) -> Path:
    target = root / f"lora_{character}"
    shutil.copytree(template, target)
    return target


# The metrics block a trained adapter's manifest carries (contract §2), for tests that show it.
TRAINED_METRICS = {"eval_loss_base": 3.1, "eval_loss_serving": 2.6, "eval_loss_adapter": 2.2, "train_loss": 2.0}


def mount_trained_adapter(template: Path, root: Path, character: str) -> Path:
    """mount_adapter, with the eval metrics in its manifest that the trainer writes."""
    target = mount_adapter(template, root, character)
    manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    (target / "manifest.json").write_text(json.dumps({**manifest, "metrics": TRAINED_METRICS}), encoding="utf-8")
    return target


# ---------------------------------------------------------------- PostgreSQL


def _pg_bin() -> Path:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not candidates:
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql); the store tests need a real server")
    return candidates[-1].parent


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A private PostgreSQL server for this test session; yields an admin URL without a database name."""
    bindir = _pg_bin()
    workdir = Path(tempfile.mkdtemp(prefix="chat-pg-"))
    data, sockets = workdir / "data", workdir / "sock"
    sockets.mkdir()
    prefix: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses to run as root; the server runs as the postgres system user in a directory it owns.
        shutil.chown(workdir, "postgres")
        shutil.chown(sockets, "postgres")
        workdir.chmod(0o700)
        prefix = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def run(*args: str) -> None:
        result = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            pytest.fail(f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")
    # fsync off: test speed only; durability of acknowledged messages is tested on SQLite with a real kill.
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    run(str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(workdir / "log"), "-w", "-t", "60", "start")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(workdir, ignore_errors=True)


def new_postgres_database(server_url: str) -> str:
    import psycopg

    name = f"chat_{uuid.uuid4().hex[:12]}"
    port = server_url.rsplit(":", 1)[1]
    with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'chat.db'}"
    return new_postgres_database(request.getfixturevalue("postgres_server"))


# ---------------------------------------------------------------- the service on a real port


@contextmanager
def serve(settings: Settings, *, wait_ready: bool = True) -> Iterator[str]:
    """Run create_app(settings) under uvicorn on a free 127.0.0.1 port in a thread; yields the base URL."""
    import uvicorn

    app = create_app(settings)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if not thread.is_alive():
                raise RuntimeError("server thread died during startup")
            try:
                response = httpx.get(f"{base}/readyz" if wait_ready else f"{base}/healthz", timeout=5)
                if response.status_code == 200:
                    break
                if response.status_code != 503:
                    raise RuntimeError(f"unexpected {response.status_code} from the service: {response.text}")
                body = response.json()
                if wait_ready and body.get("model", {}).get("error"):
                    raise RuntimeError(f"model failed to load: {body['model']['error']}")
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("service did not become ready in 120 s")
            time.sleep(0.05)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def make_settings(base_model_dir: Path, adapters_root: Path, tmp_path: Path) -> Callable[..., Settings]:
    def factory(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "database_url": f"sqlite:///{tmp_path / 'chat.db'}",
            "base_model": str(base_model_dir),
            "adapters_root": adapters_root,
            "history_token": HISTORY_TOKEN,
            "device": "cpu",
            "torch_threads": 1,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return factory


class Kit:
    """Helpers for the test modules (with --import-mode=importlib, test modules cannot import conftest)."""

    history_token = HISTORY_TOKEN
    auth: ClassVar[dict[str, str]] = {"Authorization": f"Bearer {HISTORY_TOKEN}"}
    serve = staticmethod(serve)
    make_adapter = staticmethod(make_adapter)
    mount_adapter = staticmethod(mount_adapter)
    mount_trained_adapter = staticmethod(mount_trained_adapter)
    trained_metrics = TRAINED_METRICS
    new_postgres_database = staticmethod(new_postgres_database)


@pytest.fixture(scope="session")
def kit() -> type[Kit]:
    return Kit
