"""The primitives every local process of the dev kit is run with: a free loopback port, polling until a condition
holds, and stopping a child process. A leaf module (no devkit imports), so the cluster, the pod runner and the harness
all share it."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """A condition did not hold in time. An AssertionError, so a test that waits fails rather than errors."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(what: str, probe: Callable[[], T | None], timeout: float = 30, interval: float = 0.2) -> T:
    """Calls `probe` until it returns something truthy, and returns that. `probe` is called at least once, and once
    more after the deadline; on timeout WaitTimeout names `what` and the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout}s waiting for {what} (last: {value!r})")
        time.sleep(interval)


def stop_process(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL if the process has not exited after `timeout` seconds; returns once it has exited."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
