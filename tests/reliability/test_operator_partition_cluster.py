"""The operator cut off from the API server for 60 s while a training run finishes: it keeps running (no crash, no
exit), and once it can reach the API again it records the run once and promotes it once.

The operator talks to the real API server through a TCP relay in the test; cutting the relay drops every open
connection (its watches included) and refuses new ones, as a network partition would.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from devkit.cluster import Cluster
from devkit.harness import Env, environment, install_crd, trained

pytestmark = pytest.mark.cluster

V1, V2 = "20261001T030000Z", "20261101T030000Z"
CUT_SECONDS = 60


class Relay:
    """127.0.0.1:<port> → the API server, byte for byte (TLS passes through); `cut` drops and refuses connections."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.cut_off = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.cut_off.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.open |= {client, upstream}
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.cut_off.set()
        with self.lock:
            for end in self.open:
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
            self.open.clear()

    def heal(self) -> None:
        self.cut_off.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.fixture
def env_behind_relay(cluster: Cluster, tmp_path: Path) -> Iterator[tuple[Env, Relay]]:
    install_crd(cluster)
    with environment(cluster, tmp_path) as env:
        config = yaml.safe_load(env.kubeconfig.read_text())
        server = urlparse(config["clusters"][0]["cluster"]["server"])
        relay = Relay((server.hostname or "127.0.0.1", server.port or 443))
        config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{relay.port}"
        env.kubeconfig.write_text(yaml.safe_dump(config))
        try:
            yield env, relay
        finally:
            relay.close()


def test_cut_off_for_60s_the_operator_converges(env_behind_relay: tuple[Env, Relay]) -> None:
    env, relay = env_behind_relay
    env.operator.start()
    env.apply_cft("lumina")
    env.run_job("lumina", "lumina-1", trained("lumina", V1, adapter=2.0))
    env.wait_status("lumina", "Ready on V1", lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V1)
    generation = env.deployment()["metadata"]["generation"]

    relay.cut()
    cut_at = time.monotonic()
    # While the operator cannot see it, the next run finishes with a better adapter.
    env.run_job("lumina", "lumina-2", trained("lumina", V2, adapter=1.5, serving=2.0, serving_version=V1))
    time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))
    assert env.status("lumina")["servingVersion"] == V1 and env.status("lumina")["lastRun"]["job"] == "lumina-1"
    assert env.operator.process is not None and env.operator.process.poll() is None, env.operator.log_tail()
    relay.heal()
    healed_at = time.monotonic()

    status = env.wait_status("lumina", "Ready on V2 after the cut", timeout=180,
                             predicate=lambda s: s.get("phase") == "Ready" and s.get("servingVersion") == V2)
    print(f"converged {time.monotonic() - healed_at:.1f}s after the API was reachable again")
    assert [h["job"] for h in status["history"]] == ["lumina-2", "lumina-1"]
    assert env.deployment()["metadata"]["generation"] == generation + 1
    assert env.mounts() == {"/models/lora_lumina": f"lora_lumina/{V2}"}
    assert env.operator.process.poll() is None
    assert len([e for e in env.events("Promoted") if V2 in e["message"]]) <= 1
