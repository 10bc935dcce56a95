"""Runs a pod of the local cluster as a local process, the way its kubelet would run the container.

kwok plays the kubelets: it marks pods Running but runs nothing. For a pod whose work matters (a trainer Job, the
chat service), this module reads the pod's first container — command, args, env (with Secret and ConfigMap
references resolved) and volume mounts — and runs that command on this machine. Volumes map to local paths: a
PersistentVolumeClaim to its bound PV's hostPath (with `subPath`), emptyDir to a fresh directory, hostPath to itself,
configMap/secret volumes to files. Paths are rewritten through a sandbox directory in which `<sandbox>/<mountPath>`
links to the local target, so `/adapters/x` in an argument becomes `<sandbox>/adapters/x`.

A Job pod stays Running until it is released: `release_pod` sets the annotations the cluster's kwok stage turns into
a finished container (`state.terminated.exitCode` and `.message`, phase Succeeded or Failed).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from devkit.cluster import Cluster, ClusterError
from devkit.waiting import stop_process, wait_until

EXIT_CODE_ANNOTATION = "podrunner.llmmultichat.io/exit-code"
MESSAGE_ANNOTATION = "podrunner.llmmultichat.io/message"
NEVER_READY_ANNOTATION = "podrunner.llmmultichat.io/never-ready"
# What a kubelet keeps of a termination message file (it reads at most this many bytes, from the end).
MAX_TERMINATION_MESSAGE_BYTES = 4096
# FallbackToLogsOnError: the kubelet uses the last 80 log lines, at most 2048 bytes.
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048
DEFAULT_TERMINATION_PATH = "/dev/termination-log"
LineHook = Callable[[str, "subprocess.Popen[str]"], None]


class PodRunError(ClusterError):
    """The pod cannot be run or released as asked (wrong phase, unsupported spec, missing reference ...)."""


@dataclass(frozen=True)
class PodRunResult:
    exit_code: int
    message: str
    stdout: str
    stderr: str


@dataclass
class LocalPod:
    """A long-running pod container started as a local process; `stop()` ends it and removes its sandbox."""

    process: subprocess.Popen[bytes]
    sandbox: Path
    stdout_path: Path
    stderr_path: Path

    def stop(self, timeout: float = 10) -> int:
        stop_process(self.process, timeout)
        shutil.rmtree(self.sandbox, ignore_errors=True)
        return _exit_code(self.process.returncode)


@dataclass
class _Prepared:
    argv: list[str]
    env: dict[str, str]
    cwd: Path | None
    sandbox: Path
    termination_file: Path
    fallback_to_logs: bool


def _get_pod(cluster: Cluster, namespace: str, pod_name: str) -> dict[str, Any]:
    result = cluster.kubectl("get", "pod", pod_name, "-n", namespace, "-o", "json", check=False)
    if result.returncode != 0:
        raise PodRunError(f"pod {namespace}/{pod_name} not found: {result.stderr.strip()}")
    return dict(json.loads(result.stdout))


def _phase(pod: dict[str, Any]) -> str:
    return str(pod.get("status", {}).get("phase", "Pending"))


def wait_for_pod(cluster: Cluster, namespace: str, label_selector: str, *, phase: str = "Running",
                 timeout: float = 60) -> str:
    """Name of the newest pod matching `label_selector` that is in `phase` (and not being deleted)."""

    def probe() -> str | None:
        pods = cluster.get_json("pods", "-n", namespace, "-l", label_selector)["items"]
        matching = [p for p in pods if _phase(p) == phase and not p["metadata"].get("deletionTimestamp")]
        if not matching:
            return None
        return str(max(matching, key=lambda p: p["metadata"]["creationTimestamp"])["metadata"]["name"])

    return str(wait_until(f"a {phase} pod with labels {label_selector!r} in {namespace}", probe, timeout))


def release_pod(cluster: Cluster, namespace: str, pod_name: str, *, exit_code: int, message: str,
                timeout: float = 60) -> None:
    """Ends a Running pod as its container would: Succeeded with exit code 0, Failed otherwise, with `message` as
    `state.terminated.message` (its last 4096 bytes, as a kubelet keeps). Waits for the pod to be Running first and
    returns once it is Succeeded or Failed."""
    if not isinstance(exit_code, int) or isinstance(exit_code, bool) or not 0 <= exit_code <= 255:
        raise PodRunError(f"exit_code must be an int in 0..255, got {exit_code!r}")
    encoded = message.encode()
    if len(encoded) > MAX_TERMINATION_MESSAGE_BYTES:
        message = encoded[-MAX_TERMINATION_MESSAGE_BYTES:].decode(errors="ignore")

    def running() -> bool:
        phase = _phase(_get_pod(cluster, namespace, pod_name))
        if phase in ("Succeeded", "Failed"):
            raise PodRunError(f"pod {namespace}/{pod_name} already ended ({phase}); it cannot be released again")
        return phase == "Running"

    wait_until(f"pod {namespace}/{pod_name} to be Running", running, timeout)
    patch = {"metadata": {"annotations": {EXIT_CODE_ANNOTATION: str(exit_code), MESSAGE_ANNOTATION: message}}}
    cluster.kubectl("patch", "pod", pod_name, "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    wanted = "Succeeded" if exit_code == 0 else "Failed"
    wait_until(f"pod {namespace}/{pod_name} to become {wanted}",
                lambda: _phase(_get_pod(cluster, namespace, pod_name)) == wanted, timeout)


def pvc_local_path(cluster: Cluster, namespace: str, claim_name: str, timeout: float = 30) -> Path:
    """The local directory behind a claim: the hostPath of the PersistentVolume it is bound to."""

    def bound_volume() -> str | None:
        pvc = cluster.get_json("pvc", claim_name, "-n", namespace)
        return pvc["spec"].get("volumeName") if pvc.get("status", {}).get("phase") == "Bound" else None

    volume = wait_until(f"claim {namespace}/{claim_name} to be Bound", bound_volume, timeout)
    pv = cluster.get_json("pv", volume)
    host_path = pv["spec"].get("hostPath", {}).get("path")
    if not host_path:
        raise PodRunError(f"PersistentVolume {volume} (claim {namespace}/{claim_name}) is not a hostPath volume")
    return Path(host_path)


def _decode_secret(cluster: Cluster, namespace: str, name: str) -> dict[str, str]:
    secret = cluster.get_json("secret", name, "-n", namespace)
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return data | dict(secret.get("stringData") or {})


class _Refs:
    """Secret and ConfigMap reads for one pod, each object fetched once."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.cache: dict[tuple[str, str], dict[str, str] | None] = {}

    def data(self, kind: str, name: str) -> dict[str, str] | None:
        if (kind, name) not in self.cache:
            found = self.cluster.kubectl("get", kind, name, "-n", self.namespace, "-o", "name", check=False)
            if found.returncode != 0:
                self.cache[kind, name] = None
            elif kind == "secret":
                self.cache[kind, name] = _decode_secret(self.cluster, self.namespace, name)
            else:
                cm = self.cluster.get_json("configmap", name, "-n", self.namespace)
                self.cache[kind, name] = dict(cm.get("data") or {})
        return self.cache[kind, name]

    def key(self, kind: str, ref: dict[str, Any], var: str) -> str | None:
        data = self.data(kind, ref["name"])
        if data is None or ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise PodRunError(f"env {var}: {kind} {self.namespace}/{ref['name']} has no key {ref['key']!r}")
        return data[ref["key"]]


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def _expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are substituted, `$$` escapes, unknown references stay."""
    return _VAR_REF.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _field(pod: dict[str, Any], path: str) -> str:
    simple = {"metadata.name": pod["metadata"]["name"], "metadata.namespace": pod["metadata"]["namespace"],
              "metadata.uid": pod["metadata"].get("uid", ""), "spec.nodeName": pod["spec"].get("nodeName", ""),
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
              "status.podIP": pod.get("status", {}).get("podIP", ""),
              "status.hostIP": pod.get("status", {}).get("hostIP", "")}
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if match:
        return str((pod["metadata"].get(match.group(1)) or {}).get(match.group(2), ""))
    raise PodRunError(f"fieldRef {path!r} is not supported by the pod runner")


def _container_env(pod: dict[str, Any], container: dict[str, Any], refs: _Refs) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind, ref = ("secret", source["secretRef"]) if "secretRef" in source else ("configmap", source["configMapRef"])
        data = refs.data(kind, ref["name"])
        if data is None and not ref.get("optional"):
            raise PodRunError(f"envFrom: {kind} {refs.namespace}/{ref['name']} not found")
        env |= {source.get("prefix", "") + k: v for k, v in (data or {}).items()}
    for var in container.get("env") or []:
        name, source = var["name"], var.get("valueFrom")
        if source is None:
            env[name] = _expand(var.get("value", ""), env)
        elif "secretKeyRef" in source:
            value = refs.key("secret", source["secretKeyRef"], name)
            if value is not None:
                env[name] = value
        elif "configMapKeyRef" in source:
            value = refs.key("configmap", source["configMapKeyRef"], name)
            if value is not None:
                env[name] = value
        elif "fieldRef" in source:
            env[name] = _field(pod, source["fieldRef"]["fieldPath"])
        else:
            raise PodRunError(f"env {name}: valueFrom {sorted(source)} is not supported by the pod runner")
    return env


def _write_keys(target: Path, data: dict[str, str], items: list[dict[str, Any]] | None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in data]
    for key, rel in pairs:
        (target / rel).parent.mkdir(parents=True, exist_ok=True)
        (target / rel).write_text(data[key])


def _volume_sources(cluster: Cluster, pod: dict[str, Any], sandbox: Path, refs: _Refs) -> dict[str, Path]:
    namespace = pod["metadata"]["namespace"]
    sources: dict[str, Path] = {}
    for volume in pod["spec"].get("volumes") or []:
        name = volume["name"]
        if "persistentVolumeClaim" in volume:
            sources[name] = pvc_local_path(cluster, namespace, volume["persistentVolumeClaim"]["claimName"])
        elif "emptyDir" in volume:
            sources[name] = sandbox / ".volumes" / name
            sources[name].mkdir(parents=True)
        elif "hostPath" in volume:
            sources[name] = Path(volume["hostPath"]["path"])
        elif "configMap" in volume or "secret" in volume:
            kind, spec = ("secret", volume["secret"]) if "secret" in volume else ("configmap", volume["configMap"])
            ref_name = spec.get("secretName") or spec.get("name")
            data = refs.data(kind, ref_name)
            if data is None and not spec.get("optional"):
                raise PodRunError(f"volume {name}: {kind} {namespace}/{ref_name} not found")
            sources[name] = sandbox / ".volumes" / name
            _write_keys(sources[name], data or {}, spec.get("items"))
        elif "projected" in volume:
            # The service-account token volume every pod gets; nothing local reads it.
            sources[name] = sandbox / ".volumes" / name
            sources[name].mkdir(parents=True)
        else:
            raise PodRunError(f"volume {name}: kind {sorted(set(volume) - {'name'})} is not supported by the runner")
    return sources


def _path_rewriter(mounts: list[str], sandbox: Path) -> Callable[[str], str]:
    """Replaces each container path that starts with a mount path by its sandbox twin (longest mount first).

    A value that is exactly a directory *holding* mounts (`/models` for a mount at `/models/lora_lumina`, the chat
    service's adapters root) maps to its sandbox twin too: in the container it is the directory of those mount
    points, and so is `<sandbox>/models`. Only whole values, so `/dev/null` stays itself beside `/dev/shm`."""
    if not mounts:
        return lambda text: text
    alternatives = "|".join(re.escape(m.rstrip("/") or "/") for m in sorted(mounts, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./-])({alternatives})(?=/|$|[^\w.-])")
    holders = {str(parent) for m in mounts for parent in PurePosixPath(m).parents if str(parent) != "/"}

    def rewrite(text: str) -> str:
        if text.rstrip("/") in holders:
            return str(sandbox) + text.rstrip("/")
        return pattern.sub(lambda m: str(sandbox) + m.group(1), text)

    return rewrite


def _prepare(cluster: Cluster, namespace: str, pod_name: str, env_overrides: dict[str, str] | None,
             args_override: list[str] | None) -> _Prepared:
    pod = _get_pod(cluster, namespace, pod_name)
    container = pod["spec"]["containers"][0]
    command = list(container.get("command") or [])
    args = list(args_override if args_override is not None else container.get("args") or [])
    if not command:
        raise PodRunError(f"pod {namespace}/{pod_name}: container {container['name']!r} sets no command; the runner "
                          "cannot know an image's entrypoint")
    refs = _Refs(cluster, namespace)
    sandbox = Path(tempfile.mkdtemp(prefix=f"podrunner-{namespace}-{pod_name}-"))
    try:
        sources = _volume_sources(cluster, pod, sandbox, refs)
        mounts = container.get("volumeMounts") or []
        mount_paths = [m["mountPath"].rstrip("/") for m in mounts]
        nested = [(a, b) for a in mount_paths for b in mount_paths if b.startswith(a + "/")]
        if nested:
            # <sandbox>/<outer> is a link into a volume: the inner link would be written into that volume.
            raise PodRunError(f"pod {namespace}/{pod_name}: nested mounts {nested} are not supported by the runner")
        for mount in mounts:
            if mount["name"] not in sources:
                raise PodRunError(f"volumeMount {mount['name']!r} names no volume of the pod")
            target = sources[mount["name"]] / mount.get("subPath", "")
            if not target.exists():
                target.mkdir(parents=True)
            link = sandbox / mount["mountPath"].lstrip("/")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target)
        termination_path = container.get("terminationMessagePath") or DEFAULT_TERMINATION_PATH
        termination_file = sandbox / termination_path.lstrip("/")
        termination_file.parent.mkdir(parents=True, exist_ok=True)
        termination_file.touch()
        rewrite = _path_rewriter([*mount_paths, termination_path], sandbox)

        pod_env = _container_env(pod, container, refs) | dict(env_overrides or {})
        pod_env = {k: rewrite(v) for k, v in pod_env.items()}
        argv = [rewrite(_expand(a, pod_env)) for a in command + args]
        if Path(argv[0]).name in ("python", "python3"):
            argv[0] = sys.executable
        working_dir = container.get("workingDir")
        cwd = Path(rewrite(working_dir)) if working_dir else None
        if cwd is not None and not cwd.is_dir():
            raise PodRunError(f"workingDir {working_dir!r} has no local counterpart (mount it from a volume)")
        # The local process keeps this machine's environment (PATH, the venv, HF_HUB_OFFLINE ...); the pod's own
        # variables come on top, as they would in the image.
        return _Prepared(argv, {**os.environ, **pod_env}, cwd, sandbox, termination_file,
                         container.get("terminationMessagePolicy") == "FallbackToLogsOnError")
    except BaseException:
        shutil.rmtree(sandbox, ignore_errors=True)
        raise


def _exit_code(returncode: int) -> int:
    # A process killed by signal N is reported by container runtimes as 128 + N.
    return 128 - returncode if returncode < 0 else returncode


def _termination_message(prepared: _Prepared, exit_code: int, stdout: str, stderr: str) -> str:
    data = prepared.termination_file.read_bytes()[-MAX_TERMINATION_MESSAGE_BYTES:]
    message = data.decode(errors="ignore")
    if not message and exit_code != 0 and prepared.fallback_to_logs:
        lines = (stdout + stderr).splitlines()[-FALLBACK_LOG_LINES:]
        message = "\n".join(lines).encode()[-FALLBACK_LOG_BYTES:].decode(errors="ignore")
    return message


def _run_captured(prepared: _Prepared, timeout: float | None, echo: TextIO | None,
                  on_line: LineHook | None = None) -> subprocess.CompletedProcess[str]:
    """Like `subprocess.run(capture_output=True)`, but each output line is also written to `echo` as it comes, so
    a person watching a long run (the demo's trainer) sees its progress, and given to `on_line` with the process."""
    process = subprocess.Popen(prepared.argv, env=prepared.env, cwd=prepared.cwd, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
    captured: dict[str, list[str]] = {"stdout": [], "stderr": []}

    def pump(name: str, stream: TextIO) -> None:
        for line in stream:
            captured[name].append(line)
            if on_line is not None:
                on_line(line, process)
            if echo is not None:
                echo.write(f"    | {line}")
                echo.flush()

    pumps = [threading.Thread(target=pump, args=(name, getattr(process, name)), daemon=True) for name in captured]
    for thread in pumps:
        thread.start()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        for thread in pumps:
            thread.join()
    return subprocess.CompletedProcess(prepared.argv, process.returncode, "".join(captured["stdout"]),
                                       "".join(captured["stderr"]))


def run_pod(cluster: Cluster, namespace: str, pod_name: str, *, env_overrides: dict[str, str] | None = None,
            timeout: float | None = None, echo: TextIO | None = None, on_line: LineHook | None = None) -> PodRunResult:
    """Runs the pod's first container as a local process to completion, then releases the pod with its exit code and
    termination message. On timeout the process is killed, the pod released as Failed (137) and PodRunError raised.
    With `echo`, the process's output is also streamed there line by line; `on_line(line, process)` sees each line
    as it comes (a test kills the process at a line, as an OOM kill or a node loss would, say)."""
    prepared = _prepare(cluster, namespace, pod_name, env_overrides, None)
    try:
        try:
            done = _run_captured(prepared, timeout, echo, on_line)
        except subprocess.TimeoutExpired as exc:
            release_pod(cluster, namespace, pod_name, exit_code=137,
                        message=f"podrunner: killed after {timeout}s without finishing")
            raise PodRunError(f"pod {namespace}/{pod_name}: {prepared.argv[:3]}... ran past {timeout}s") from exc
        exit_code = _exit_code(done.returncode)
        message = _termination_message(prepared, exit_code, done.stdout, done.stderr)
    finally:
        shutil.rmtree(prepared.sandbox, ignore_errors=True)
    release_pod(cluster, namespace, pod_name, exit_code=exit_code, message=message)
    return PodRunResult(exit_code, message, done.stdout, done.stderr)


def start_pod_process(cluster: Cluster, namespace: str, pod_name: str, *, env_overrides: dict[str, str] | None = None,
                      args_override: list[str] | None = None) -> LocalPod:
    """Starts the pod's first container as a background process (a server, say); nothing is released. Its output
    goes to `.stdout.log` / `.stderr.log` in the sandbox (read them before `stop()`, which removes it)."""
    prepared = _prepare(cluster, namespace, pod_name, env_overrides, args_override)
    stdout_path, stderr_path = prepared.sandbox / ".stdout.log", prepared.sandbox / ".stderr.log"
    with stdout_path.open("wb") as out, stderr_path.open("wb") as err:
        process = subprocess.Popen(prepared.argv, env=prepared.env, cwd=prepared.cwd, stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=err)
    return LocalPod(process, prepared.sandbox, stdout_path, stderr_path)
