"""A roll of the chat Deployment on the local control plane with real chat processes answering real traffic, so that
failed requests and gaps during a promotion or a rollback can be counted (tests/reliability, bench/).

kwok plays the kubelets: it runs nothing and marks a pod Ready at once. For the chat pods of one namespace this
module does a node's part instead:
- `ChatNode`, the kubelet: each Running pod's container runs as a local process (devkit.podrunner); the pod becomes
  Ready (its status written, as a kubelet writes it) only once the process's readiness probe path answers 200; a pod
  that is deleted gets its `preStop` (the spec's `sleep`), then SIGTERM, and SIGKILL after its
  terminationGracePeriodSeconds. The pod template must carry podrunner's never-ready annotation, so that kwok leaves
  the Ready condition to this module.
- kube-proxy: `ChatNode.ready_urls()` are the Service's ready endpoints (its EndpointSlices), refreshed every 0.2 s;
  each request goes to one of them.
- `Traffic`, the users: threads sending chats without pause, each request's time and outcome kept.
The API server, the Deployment and ReplicaSet controllers and the EndpointSlice controller are the real ones.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
from devkit.cluster import Cluster
from devkit.podrunner import LocalPod, start_pod_process
from devkit.waiting import free_port

POLL_SECONDS = 0.2


def local_args(pod: Mapping[str, Any], port: int) -> list[str]:
    """The pod's container args with the listen address moved to a loopback port (pods share no network here)."""
    args = list(pod["spec"]["containers"][0].get("args", []))
    for flag, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        args[args.index(flag) + 1] = value
    return args


@dataclass
class LocalChatPod:
    name: str
    url: str
    local: LocalPod
    pre_stop_seconds: float
    grace_seconds: float
    ready: bool = False


def _lifecycle(pod: Mapping[str, Any]) -> tuple[float, float]:
    """(preStop sleep, termination grace) seconds from the pod's spec."""
    container = pod["spec"]["containers"][0]
    sleep = ((container.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}
    return float(sleep.get("seconds", 0)), float(pod["spec"].get("terminationGracePeriodSeconds", 30))


class ChatNode:
    """The kubelet and kube-proxy for the pods behind one Service (see the module docstring)."""

    def __init__(self, cluster: Cluster, namespace: str, selector: str, service: str,
                 env: Mapping[str, str], probe_path: str = "/readyz") -> None:
        self.cluster, self.namespace, self.selector, self.service = cluster, namespace, selector, service
        self.env, self.probe_path = dict(env), probe_path
        self.pods: dict[str, LocalChatPod] = {}
        self.ended: list[LocalChatPod] = []
        self._endpoints: list[str] = []
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []

    def __enter__(self) -> ChatNode:
        for loop in (self._pods_loop, self._endpoints_loop):
            thread = threading.Thread(target=self._guarded, args=(loop,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(60)
        for pod in [*self.pods.values(), *self.ended]:
            pod.local.stop(timeout=10)

    def _guarded(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except Exception as exc:  # a broken simulation must fail the test, not hang it
            self.errors.append(f"{loop.__name__}: {type(exc).__name__}: {exc}")

    def _get(self, *args: str) -> list[dict[str, Any]]:
        return list(self.cluster.get_json(*args, "-n", self.namespace)["items"])

    def _pods_loop(self) -> None:
        while not self._stopping.wait(POLL_SECONDS):
            live = {p["metadata"]["name"]: p for p in self._get("pods", "-l", self.selector)}
            for name, pod in live.items():
                running = pod["status"].get("phase") == "Running" and not pod["metadata"].get("deletionTimestamp")
                if running and name not in self.pods and all(p.name != name for p in self.ended):
                    self._start(pod)
            for name in [n for n in self.pods if n not in live or live[n]["metadata"].get("deletionTimestamp")]:
                pod = self.pods.pop(name)
                self.ended.append(pod)
                threading.Thread(target=self._terminate, args=(pod,), daemon=True).start()

    def _start(self, pod: dict[str, Any]) -> None:
        port = free_port()
        name = pod["metadata"]["name"]
        local = start_pod_process(self.cluster, self.namespace, name, env_overrides=self.env,
                                  args_override=local_args(pod, port))
        chat_pod = LocalChatPod(name, f"http://127.0.0.1:{port}", local, *_lifecycle(pod))
        self.pods[name] = chat_pod
        threading.Thread(target=self._guarded, args=(lambda: self._probe(chat_pod),), daemon=True).start()

    def _probe(self, pod: LocalChatPod) -> None:
        """The readiness probe, until it first passes; then the pod's Ready condition, as the kubelet writes it."""
        while not self._stopping.is_set() and pod.local.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{pod.url}{self.probe_path}", timeout=2).status_code == 200:
                    break
            time.sleep(POLL_SECONDS)
        else:
            return
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        conditions = [{"type": kind, "status": "True", "lastTransitionTime": now} for kind in ("Ready",
                                                                                            "ContainersReady")]
        patch = {"status": {"conditions": conditions}}
        self.cluster.kubectl("-n", self.namespace, "patch", "pod", pod.name, "--subresource=status",
                             "--type=strategic", "-p", json.dumps(patch), check=False)
        pod.ready = True

    def _terminate(self, pod: LocalChatPod) -> None:
        """preStop, then SIGTERM; SIGKILL once the grace period (counted from the start of preStop) is over."""
        started = time.monotonic()
        time.sleep(pod.pre_stop_seconds)
        pod.local.stop(timeout=max(pod.grace_seconds - (time.monotonic() - started), 1.0))

    def _endpoints_loop(self) -> None:
        while not self._stopping.wait(POLL_SECONDS):
            slices = self._get("endpointslices", "-l", f"kubernetes.io/service-name={self.service}")
            ready = [e["targetRef"]["name"] for s in slices for e in s.get("endpoints") or ()
                     if (e.get("conditions") or {}).get("ready") and e.get("targetRef")]
            self._endpoints = ready

    def all_stopped(self) -> bool:
        """Every deleted pod's process has exited."""
        return all(pod.local.process.poll() is not None for pod in self.ended)

    def ready_urls(self) -> list[str]:
        """Where kube-proxy would send a new connection now: the ready endpoints that have a local process."""
        pods = self.pods
        return [pods[name].url for name in self._endpoints if name in pods]


@dataclass(frozen=True)
class Request:
    started: float
    ended: float
    ok: bool
    detail: str


@dataclass
class Traffic:
    """`clients` users chatting without pause through `node`'s Service; every request kept."""

    node: ChatNode
    body: Mapping[str, Any]
    clients: int = 2
    timeout: float = 120.0
    requests: list[Request] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._client, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(self.timeout + 10)

    def _client(self) -> None:
        while not self._stopping.is_set():
            urls = self.node.ready_urls()
            started = time.monotonic()
            if not urls:
                self.requests.append(Request(started, started, False, "no ready endpoint"))
                time.sleep(POLL_SECONDS)
                continue
            try:
                response = httpx.post(f"{random.choice(urls)}/v1/chat", json=dict(self.body), timeout=self.timeout)
                ok, detail = response.status_code == 200, str(response.status_code)
            except httpx.HTTPError as exc:
                ok, detail = False, type(exc).__name__
            self.requests.append(Request(started, time.monotonic(), ok, detail))


@dataclass(frozen=True)
class Window:
    """What the users saw between `start` and `end` (monotonic seconds)."""

    requests: int
    failed: int
    failures: tuple[str, ...]
    longest_gap: float  # the longest time without a successful answer
    median_latency: float
    slowest: float  # the longest successful request

    @classmethod
    def of(cls, requests: list[Request], start: float, end: float) -> Window:
        inside = [r for r in requests if start <= r.started <= end]
        failed = [r for r in inside if not r.ok]
        answered = sorted(r.ended for r in requests if r.ok and start <= r.ended <= end)
        marks = [start, *answered, end]
        latencies = sorted(r.ended - r.started for r in inside if r.ok) or [0.0]
        return cls(len(inside), len(failed), tuple(sorted({r.detail for r in failed})),
                   max(b - a for a, b in itertools.pairwise(marks)), latencies[len(latencies) // 2], latencies[-1])

    def row(self, name: str) -> str:
        """A Markdown table row: name, requests, failed, longest gap, median and slowest answer."""
        return (f"| {name} | {self.requests} | {self.failed} | {self.longest_gap:.2f} s | {self.median_latency:.2f} s "
                f"| {self.slowest:.2f} s |")
