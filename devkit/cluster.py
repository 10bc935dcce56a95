"""A real Kubernetes control plane on this machine: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
kwok (fake nodes), built from their Go modules by devkit/control-plane/build.sh and run as background processes.

State lives in `<repo>/.cluster/`: pki/ (CA, serving and client certificates, service-account keys; kept across
restarts), etcd/ (data), volumes/ (hostPath PersistentVolumes), logs/, state.json (ports and PIDs) and kubeconfig.

CLI: `python -m devkit.cluster up|down|status`, and `stop|start|restart <component>` for one component (an API
server or etcd outage in a test; a private cluster via $LLMMULTICHAT_CLUSTER_DIR leaves the shared one be).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devkit.paths import CONTROL_PLANE_SRC as CLUSTER_SRC
from devkit.paths import REPO_ROOT
from devkit.waiting import free_port

# $LLMMULTICHAT_CLUSTER_DIR runs a second, separate cluster (the lifecycle test uses it to leave the shared one be).
STATE_DIR = Path(os.environ.get("LLMMULTICHAT_CLUSTER_DIR") or REPO_ROOT / ".cluster")
KUBECONFIG = STATE_DIR / "kubeconfig"
PKI = STATE_DIR / "pki"
VOLUMES = STATE_DIR / "volumes"
LOGS = STATE_DIR / "logs"
STATE_FILE = STATE_DIR / "state.json"
# Several helpers share this tree: starts and stops take STATE_LOCK; every test session (or demo) using the
# cluster holds USERS_LOCK shared, so the one that started it stops it only when nobody else still uses it.
STATE_LOCK = STATE_DIR / ".state.lock"
USERS_LOCK = STATE_DIR / ".users.lock"

SERVICE_CIDR = "10.96.0.0/16"
STORAGE_CLASS = "local-hostpath"
POOL_LABEL = "llmmultichat.io/volume-pool"
# Available hostPath volumes kept in the pool; Released ones are recycled (wiped and unbound) on every ensure and
# before every new namespace.
POOL_SIZE = 20
PV_CAPACITY = "5Gi"
# Start order; shutdown goes the other way.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
# Identity (CN, O) of each client certificate. kwok plays every kubelet, so it gets cluster-admin rights rather than
# per-node credentials.
CLIENTS = {
    "admin": ("kubernetes-admin", "system:masters"),
    "kube-controller-manager": ("system:kube-controller-manager", ""),
    "kube-scheduler": ("system:kube-scheduler", ""),
    "kwok": ("kwok-controller", "system:masters"),
    # The API server's identity towards kubelets (logs, exec, port-forward on the real node).
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", "system:masters"),
}
PKI_VERSION = "2"  # bumped when CLIENTS or the serving certificate's SANs change
# The real node's address (devkit.realnode): the host end of its pod bridge, and a SAN of the API server's certificate.
NODE_IP = "10.250.0.1"
GPU_NODES = ("gpu-node-1", "gpu-node-2")
CPU_NODES = ("cpu-node-1",)
GPUS_PER_NODE = 2


class ClusterError(RuntimeError):
    """The local control plane could not be built, started, reached or stopped."""


def log(message: str) -> None:
    print(f"[cluster] {message}", file=sys.stderr, flush=True)


def _versions() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in (CLUSTER_SRC / "versions.env").read_text().splitlines())
    return {k.strip(): v.strip() for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


def bin_dir() -> Path:
    cache = Path(os.environ.get("LLMMULTICHAT_CACHE", Path.home() / ".cache" / "llmmultichat"))
    return cache / f"k8s-{_versions()['K8S_VERSION']}" / "bin"


def build() -> Path:
    """Builds the control plane into the cache unless it is current (progress goes to stderr); returns the bin dir."""
    result = subprocess.run(["bash", str(CLUSTER_SRC / "build.sh")], stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise ClusterError(f"building the control plane failed (exit {result.returncode}); see the output above")
    return Path(result.stdout.strip().splitlines()[-1])


def kubectl_path() -> Path:
    """The kubectl built from the same Kubernetes release as the API server (built on first use)."""
    path = bin_dir() / "kubectl"
    return path if path.exists() else build() / "kubectl"


@dataclass
class Cluster:
    kubeconfig: Path
    started_here: bool = False
    env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        kubectl_dir = str(kubectl_path().parent)
        self.env = {**os.environ, "KUBECONFIG": str(self.kubeconfig),
                    "PATH": kubectl_dir + os.pathsep + os.environ.get("PATH", "")}

    def command(self, *args: str) -> list[str]:
        """The command line of the pinned kubectl against this cluster (for a long-running one: a port-forward)."""
        return [str(kubectl_path()), "--kubeconfig", str(self.kubeconfig), *args]

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Runs the pinned kubectl against this cluster; raises ClusterError with its stderr when `check` fails."""
        cmd = self.command(*args)
        result = subprocess.run(cmd, input=input, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)} failed (exit {result.returncode}): {result.stderr.strip()}")
        return result

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def apply(self, objects: list[dict[str, Any]] | dict[str, Any], namespace: str | None = None) -> None:
        items = objects if isinstance(objects, list) else [objects]
        ns = ["-n", namespace] if namespace else []
        self.kubectl("apply", *ns, "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    def create_namespace(self, name: str, timeout: float = 30) -> None:
        """Creates a namespace (if missing) and waits for its default ServiceAccount, without which pods are refused.
        The volume pool is refilled first: a test session makes more claims than one pool holds."""
        refill_volume_pool(self)
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        deadline = time.monotonic() + timeout
        while self.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise ClusterError(f"namespace {name}: the default ServiceAccount did not appear in {timeout}s")
            time.sleep(0.2)

    def delete_namespace(self, name: str, wait: bool = False) -> None:
        self.kubectl("delete", "namespace", name, "--ignore-not-found", f"--wait={str(wait).lower()}")


# ---------------------------------------------------------------------------------------------------------- pki

def _openssl(*args: str, input: str | None = None) -> None:
    result = subprocess.run(["openssl", *args], input=input, capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"openssl {args[0]} failed: {result.stderr.strip()}")


def _ec_key(path: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))
    path.chmod(0o600)


def sign_certificate(stem: Path, subject: str, extensions: str) -> None:
    """A new key `<stem>.key` and its certificate `<stem>.crt`, signed by the cluster's CA."""
    key, csr, crt = stem.with_suffix(".key"), stem.with_suffix(".csr"), stem.with_suffix(".crt")
    _ec_key(key)
    _openssl("req", "-new", "-key", str(key), "-subj", subject, "-out", str(csr))
    ext = stem.with_suffix(".ext")
    ext.write_text(extensions)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(PKI / "ca.crt"), "-CAkey", str(PKI / "ca.key"),
             "-CAcreateserial", "-days", "3650", "-sha256", "-extfile", str(ext), "-out", str(crt))
    csr.unlink()
    ext.unlink()


def _ensure_pki() -> None:
    # A PKI made before a client was added (or before the node address was a SAN) is made anew.
    if (PKI / "complete").exists() and (PKI / "complete").read_text() == PKI_VERSION:
        return
    log("generating the CA, serving and client certificates and service-account keys")
    shutil.rmtree(PKI, ignore_errors=True)
    PKI.mkdir(parents=True)
    _ec_key(PKI / "ca.key")
    _openssl("req", "-x509", "-new", "-key", str(PKI / "ca.key"), "-subj", "/CN=llmmultichat-local-ca",
             "-days", "3650", "-sha256", "-out", str(PKI / "ca.crt"))
    sans = ",".join(["IP:127.0.0.1", "IP:10.96.0.1", f"IP:{NODE_IP}", "DNS:localhost", "DNS:kubernetes",
                     "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                     "DNS:kubernetes.default.svc.cluster.local"])
    sign_certificate(PKI / "apiserver", "/CN=kube-apiserver",
                     f"keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName={sans}\n")
    for name, (cn, org) in CLIENTS.items():
        subject = f"/CN={cn}" + (f"/O={org}" if org else "")
        sign_certificate(PKI / name, subject, "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    _ec_key(PKI / "sa.key")
    _openssl("pkey", "-in", str(PKI / "sa.key"), "-pubout", "-out", str(PKI / "sa.pub"))
    (PKI / "complete").write_text(PKI_VERSION)


def _kubeconfig(client: str, server: str) -> str:
    return kubeconfig_for(server, PKI / client)


def kubeconfig_for(server: str, cert_stem: Path) -> str:
    """A kubeconfig for `server` that authenticates with `<cert_stem>.crt/.key` (certificates embedded)."""
    def b64(path: Path) -> str:
        return base64.b64encode(path.read_bytes()).decode()

    user = cert_stem.name
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "llmmultichat",
        "clusters": [{"name": "llmmultichat",
                      "cluster": {"server": server, "certificate-authority-data": b64(PKI / "ca.crt")}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(cert_stem.with_suffix(".crt")),
                                          "client-key-data": b64(cert_stem.with_suffix(".key"))}}],
        "contexts": [{"name": "llmmultichat", "context": {"cluster": "llmmultichat", "user": user}}],
    }
    return json.dumps(config, indent=2)


# ---------------------------------------------------------------------------------------------------------- processes

def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/pid/stat after the command name (state is [0], start time [19])."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> str | None:
    """The kernel's start time of `pid`, which tells a reused PID from ours."""
    fields = _stat_fields(pid)
    return fields[19] if fields else None


def _proc_state(pid: int) -> str | None:
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def alive(proc: dict[str, Any]) -> bool:
    pid = int(proc["pid"])
    # Reap it if this Python process started it: an exited child stays a zombie until its parent waits.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    if start_time(pid) != proc["start_time"]:
        return False
    return _proc_state(pid) not in ("Z", "X", None)


def read_state() -> dict[str, Any] | None:
    try:
        return dict(json.loads(STATE_FILE.read_text()))
    except (OSError, ValueError):
        return None


def write_state(state: dict[str, Any]) -> None:
    tmp = STATE_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(STATE_FILE)


def _spawn(name: str, argv: list[str], state: dict[str, Any], append: bool = False) -> None:
    # A restarted component's log goes on after its first life's, so both are there to read.
    log_file = (LOGS / f"{name}.log").open("ab" if append else "wb")
    # A session of its own: the component outlives the Python process (pytest, make) that started it.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=STATE_DIR)
    log_file.close()
    state["processes"][name] = {"pid": proc.pid, "start_time": start_time(proc.pid), "argv": argv}
    write_state(state)


def tail(name: str, lines: int = 15) -> str:
    try:
        return "\n".join((LOGS / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(what: str, check: Any, state: dict[str, Any], component: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc = state["processes"].get(component)
        if proc and not alive(proc):
            raise ClusterError(f"{component} exited while waiting for {what}; last log lines:\n{tail(component)}")
        if check():
            return
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout}s waiting for {what}; last log lines of {component}:\n"
                               f"{tail(component)}")
        time.sleep(0.2)


def _https_ok(url: str, client: str | None = "admin") -> bool:
    ctx = ssl.create_default_context(cafile=str(PKI / "ca.crt"))
    if client:
        ctx.load_cert_chain(str(PKI / f"{client}.crt"), str(PKI / f"{client}.key"))
    else:
        # kube-controller-manager and kube-scheduler serve /healthz with a self-signed certificate of their own.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _healthy(state: dict[str, Any] | None) -> bool:
    if not state or set(state.get("processes", {})) != set(COMPONENTS):
        return False
    if not all(alive(p) for p in state["processes"].values()):
        return False
    host = state.get("host", "127.0.0.1")
    return _https_ok(f"https://{host}:{state['ports']['apiserver']}/readyz")


def _component_args(bins: Path, ports: dict[str, int], host: str) -> dict[str, list[str]]:
    kubeconfigs = STATE_DIR / "kubeconfigs"
    etcd_url = f"http://127.0.0.1:{ports['etcd']}"
    peer_url = f"http://127.0.0.1:{ports['etcd_peer']}"
    return {
        "etcd": [
            str(bins / "etcd"), "--name=local", f"--data-dir={STATE_DIR / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=local={peer_url}", "--initial-cluster-state=new",
            # A throwaway test store: skipping fsync keeps the shared disk out of every API write's latency.
            "--unsafe-no-fsync", "--log-level=warn", "--quota-backend-bytes=2147483648",
        ],
        "kube-apiserver": [
            str(bins / "kube-apiserver"), f"--etcd-servers={etcd_url}",
            f"--bind-address={host}", f"--advertise-address={host}", f"--secure-port={ports['apiserver']}",
            f"--tls-cert-file={PKI / 'apiserver.crt'}", f"--tls-private-key-file={PKI / 'apiserver.key'}",
            f"--client-ca-file={PKI / 'ca.crt'}",
            # To kubelets (the real node): by address, as a client they trust. Node names do not resolve here.
            f"--kubelet-client-certificate={PKI / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={PKI / 'apiserver-kubelet-client.key'}",
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={PKI / 'sa.pub'}", f"--service-account-signing-key-file={PKI / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=Node,RBAC",
            # The default admission chain stays on (defaulting, quota, service accounts, default StorageClass ...);
            # NodeRestriction is the one kubeadm adds on top.
            "--enable-admission-plugins=NodeRestriction", "--allow-privileged=true",
            "--profiling=false", "--v=1",
        ],
        "kube-controller-manager": [
            str(bins / "kube-controller-manager"), f"--kubeconfig={kubeconfigs / 'kube-controller-manager'}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['controller_manager']}", "--controllers=*",
            "--use-service-account-credentials=true", f"--service-account-private-key-file={PKI / 'sa.key'}",
            f"--root-ca-file={PKI / 'ca.crt'}", f"--cluster-signing-cert-file={PKI / 'ca.crt'}",
            f"--cluster-signing-key-file={PKI / 'ca.key'}", f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--leader-elect=false", "--profiling=false", "--v=1",
        ],
        "kube-scheduler": [
            str(bins / "kube-scheduler"), f"--kubeconfig={kubeconfigs / 'kube-scheduler'}",
            "--bind-address=127.0.0.1", f"--secure-port={ports['scheduler']}",
            "--leader-elect=false", "--profiling=false", "--v=1",
        ],
        "kwok": [
            str(bins / "kwok"), f"--kubeconfig={kubeconfigs / 'kwok'}",
            f"--config={CLUSTER_SRC / 'kwok-stages.yaml'}",
            "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
            f"--server-address=127.0.0.1:{ports['kwok']}", "--cidr=10.244.0.0/16", "--node-ip=10.0.0.1",
            "--node-lease-duration-seconds=40",
        ],
    }


# ---------------------------------------------------------------------------------------------------------- objects

def _node(name: str, gpus: int) -> dict[str, Any]:
    labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
              "type": "kwok"}
    resources = {"cpu": "32", "memory": "256Gi", "ephemeral-storage": "1Ti", "pods": "110"}
    spec: dict[str, Any] = {}
    if gpus:
        labels |= {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        resources["nvidia.com/gpu"] = str(gpus)
        spec["taints"] = [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels, "annotations": {"kwok.x-k8s.io/node": "fake"}},
            "spec": spec, "status": {"capacity": resources, "allocatable": resources}}


def _storage_class() -> dict[str, Any]:
    # Static volumes only: the PV controller binds each claim to a pre-created hostPath PV of this class.
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": STORAGE_CLASS,
                         "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
            "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": "Immediate",
            "reclaimPolicy": "Retain"}


def _fresh_volume_dir(path: Path) -> None:
    # World-writable, as hostPath provisioners make them (local-path-provisioner does the same): the kubelet applies
    # no fsGroup to hostPath volumes, and the pods run as uid 10001, never root.
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o777)


def _volume(index: int) -> dict[str, Any]:
    path = VOLUMES / f"pv-{index}"
    _fresh_volume_dir(path)
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": f"pv-{index}", "labels": {POOL_LABEL: STORAGE_CLASS}},
            "spec": {"capacity": {"storage": PV_CAPACITY}, "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": STORAGE_CLASS,
                     "hostPath": {"path": str(path), "type": "DirectoryOrCreate"}}}


def refill_volume_pool(cluster: Cluster) -> None:
    """Keeps POOL_SIZE volumes Available: Released ones (their claim was deleted) are wiped and unbound, new ones are
    added when claims hold the rest. Retain is the policy so that nothing is deleted behind a test's back while its
    claim exists; recycling happens only here."""
    pvs = cluster.get_json("pv", "-l", POOL_LABEL)["items"]
    for pv in pvs:
        if pv["status"].get("phase") == "Released":
            path = Path(pv["spec"]["hostPath"]["path"])
            shutil.rmtree(path, ignore_errors=True)
            _fresh_volume_dir(path)
            cluster.kubectl("patch", "pv", pv["metadata"]["name"], "--type=json",
                            "-p", '[{"op": "remove", "path": "/spec/claimRef"}]')
    available = sum(1 for pv in pvs if not pv["spec"].get("claimRef") or pv["status"].get("phase") == "Released")
    indexes = {int(pv["metadata"]["name"].removeprefix("pv-")) for pv in pvs}
    wanted = POOL_SIZE - available
    new, i = [], 1
    while len(new) < wanted:
        if i not in indexes:
            new.append(_volume(i))
        i += 1
    if new:
        cluster.apply(new)


# ---------------------------------------------------------------------------------------------------------- up / down

@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[int]:
    STATE_DIR.mkdir(exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)


def cluster_up(real_node: bool = False) -> Cluster:
    """Starts the control plane (building it first if needed) unless it already runs; returns when /readyz is ok and
    every node is Ready. `real_node` adds the real node (devkit.realnode: containerd, kubelet, kube-proxy, CoreDNS)
    beside kwok's."""
    with _flock(STATE_LOCK, fcntl.LOCK_EX):
        return _up_locked(real_node)


def _up_locked(real_node: bool = False) -> Cluster:
    from devkit import realnode  # it builds on this module

    state = read_state()
    if _healthy(state) and (not real_node or realnode.healthy(state)):
        log(f"already running ({KUBECONFIG})")
        return Cluster(KUBECONFIG)
    if real_node:
        realnode.check_host()  # before anything stops or starts: say what this machine lacks
    if _healthy(state) and real_node:
        assert state
        if not state.get("real_node"):
            raise ClusterError("the running control plane was started without the real node (its API server does "
                               f"not listen on {NODE_IP}): stop it first (`make cluster-down`; other sessions may "
                               "use it)")
        log("the control plane runs but its real node does not: restarting the node")
        realnode.stop(state)
        write_state(state)
        cluster = Cluster(KUBECONFIG)
        realnode.start(state, cluster)
        return cluster
    if state:
        log("a previous cluster is partly running or broken: stopping it first")
        _down_locked()
    bins = build()
    try:
        return _start(bins, real_node)
    except BaseException:
        log("start failed: stopping what was started")
        _down_locked()
        raise


def _start(bins: Path, real_node: bool) -> Cluster:
    started = time.monotonic()
    LOGS.mkdir(exist_ok=True)
    _ensure_pki()
    shutil.rmtree(STATE_DIR / "etcd", ignore_errors=True)
    ports = {name: free_port() for name in ("etcd", "etcd_peer", "apiserver", "controller_manager", "scheduler",
                                            "kwok")}
    # With a real node the API server listens on the pod bridge's host address instead of loopback: pods (the
    # operator) reach it there, and so does everything on this machine.
    from devkit import realnode  # it builds on this module

    host = "127.0.0.1"
    if real_node:
        realnode.ensure_bridge()
        host = NODE_IP
        # Port 443 as in a real cluster: the `kubernetes` Service's endpoint is the advertised address and port, and
        # in-cluster clients (kopf) know only `https://kubernetes.default.svc`, port 443, which kube-proxy routes
        # here. One real node per machine, so the port is free.
        ports["apiserver"] = 443
    server = f"https://{host}:{ports['apiserver']}"
    kubeconfigs = STATE_DIR / "kubeconfigs"
    kubeconfigs.mkdir(exist_ok=True)
    for client in CLIENTS:
        if client != "admin":
            (kubeconfigs / client).write_text(_kubeconfig(client, server))
    state = {"ports": ports, "processes": {}, "bin_dir": str(bins), "host": host, "real_node": real_node}
    write_state(state)
    args = _component_args(bins, ports, host)

    _spawn("etcd", args["etcd"], state)
    _wait("etcd health", lambda: http_ok(f"http://127.0.0.1:{ports['etcd']}/health"), state, "etcd")
    _spawn("kube-apiserver", args["kube-apiserver"], state)
    _wait("kube-apiserver /readyz", lambda: _https_ok(f"{server}/readyz"), state, "kube-apiserver")
    for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
        _spawn(name, args[name], state)
    _wait("kube-controller-manager /healthz",
          lambda: _https_ok(f"https://127.0.0.1:{ports['controller_manager']}/healthz", client=None),
          state, "kube-controller-manager")
    _wait("kube-scheduler /healthz",
          lambda: _https_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz", client=None), state, "kube-scheduler")
    # The admin kubeconfig appears last: its presence plus live PIDs is what "a cluster runs here" means to others.
    KUBECONFIG.write_text(_kubeconfig("admin", server))
    KUBECONFIG.chmod(0o600)
    cluster = Cluster(KUBECONFIG, started_here=True)
    cluster.apply([_node(name, GPUS_PER_NODE) for name in GPU_NODES] + [_node(name, 0) for name in CPU_NODES]
                  + [_storage_class()])
    refill_volume_pool(cluster)
    cluster.kubectl("wait", "--for=condition=Ready", "node", "--all", "--timeout=60s")
    # Pods are refused in a namespace until its default ServiceAccount exists.
    _wait("the default ServiceAccount", lambda: cluster.kubectl("get", "sa", "default", check=False).returncode == 0,
          state, "kube-controller-manager")
    log(f"control plane ready in {time.monotonic() - started:.1f}s; KUBECONFIG={KUBECONFIG}")
    if real_node:
        realnode.start(state, cluster)
    return cluster


def cluster_down() -> None:
    """Stops every component this checkout started (by recorded PID and start time, never by name) and removes the
    cluster's data (etcd, volumes, kubeconfig); certificates are kept for the next start."""
    with _flock(STATE_LOCK, fcntl.LOCK_EX):
        _down_locked()


def _down_locked() -> None:
    state = read_state() or {"processes": {}}
    if state.get("real_node"):
        from devkit import realnode

        realnode.stop(state)  # through the API server first: the kubelet deletes its pods' networks and mounts
        write_state(state)
    KUBECONFIG.unlink(missing_ok=True)
    for name in reversed(COMPONENTS):
        proc = state["processes"].get(name)
        if proc and alive(proc):
            _terminate(name, proc)
    left = [n for n, p in state["processes"].items() if alive(p)]
    if left:
        raise ClusterError(f"still running after shutdown: {left}")
    for path in (STATE_DIR / "etcd", VOLUMES, STATE_DIR / "kubeconfigs"):
        shutil.rmtree(path, ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)


def _terminate(name: str, proc: dict[str, Any], sig: signal.Signals = signal.SIGTERM) -> None:
    """Ends one recorded component (by PID and start time: never another process that reuses the PID): `sig`, then
    SIGKILL if it is still there after 15 s; returns once it is gone."""
    pid = int(proc["pid"])
    os.kill(pid, sig)
    deadline = time.monotonic() + 15
    while alive(proc) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(proc):
        log(f"{name} (pid {pid}) ignored {sig.name}: killing it")
        os.kill(pid, signal.SIGKILL)
        while alive(proc):
            time.sleep(0.05)
    log(f"stopped {name} (pid {pid})")


def _component_ready(name: str, state: dict[str, Any]) -> bool:
    ports, host = state["ports"], state.get("host", "127.0.0.1")
    probes = {
        "etcd": lambda: http_ok(f"http://127.0.0.1:{ports['etcd']}/health"),
        "kube-apiserver": lambda: _https_ok(f"https://{host}:{ports['apiserver']}/readyz"),
        "kube-controller-manager": lambda: _https_ok(f"https://127.0.0.1:{ports['controller_manager']}/healthz",
                                                     client=None),
        "kube-scheduler": lambda: _https_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz", client=None),
    }
    return bool(probes.get(name, lambda: True)())  # kwok serves no health endpoint here: alive is all


def _recorded(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    state = read_state()
    if name not in COMPONENTS or not state or name not in state.get("processes", {}):
        raise ClusterError(f"no {name} recorded in {STATE_FILE} (components: {', '.join(COMPONENTS)})")
    return state, state["processes"][name]


def stop_component(name: str, sig: signal.Signals = signal.SIGTERM) -> None:
    """Stops one running component of this checkout's cluster (state, data and certificates stay): an API server
    or etcd outage, for tests of what survives one. Refused when it is not running."""
    with _flock(STATE_LOCK, fcntl.LOCK_EX):
        _, proc = _recorded(name)
        if not alive(proc):
            raise ClusterError(f"{name} (pid {proc['pid']}) is not running")
        _terminate(name, proc, sig)


def start_component(name: str, timeout: float = 90) -> float:
    """Starts a stopped component again with the command line it was first started with — the same ports, data dir
    (etcd keeps its data) and certificates — and returns the seconds until it was healthy. Refused when it runs."""
    started = time.monotonic()
    with _flock(STATE_LOCK, fcntl.LOCK_EX):
        state, proc = _recorded(name)
        if alive(proc):
            raise ClusterError(f"{name} (pid {proc['pid']}) is still running")
        _spawn(name, list(proc["argv"]), state, append=True)
        _wait(f"{name} to be healthy again", lambda: _component_ready(name, state), state, name, timeout)
    log(f"{name} restarted (pid {state['processes'][name]['pid']}) in {time.monotonic() - started:.1f}s")
    return time.monotonic() - started


def restart_component(name: str, down_seconds: float = 0.0, sig: signal.Signals = signal.SIGTERM) -> float:
    """`stop_component`, `down_seconds` without it, then `start_component`; returns the seconds it was away."""
    stopped = time.monotonic()
    stop_component(name, sig)
    time.sleep(down_seconds)
    start_component(name)
    return time.monotonic() - stopped


def stop_real_node() -> None:
    """Stops the real node alone (the control plane keeps running): for tests of what a node stop leaves behind.
    The next `ensure_cluster(real_node=True)` starts it again."""
    from devkit import realnode

    with _flock(STATE_LOCK, fcntl.LOCK_EX):
        state = read_state()
        if not state or not state.get("node"):
            raise ClusterError("no real node is recorded here")
        realnode.stop(state)
        write_state(state)


def _usable(kubeconfig: Path) -> bool:
    if not kubeconfig.exists():
        return False
    probe = subprocess.run([str(kubectl_path()), "--kubeconfig", str(kubeconfig), "get", "--raw", "/readyz"],
                           capture_output=True, text=True, timeout=20)
    return probe.returncode == 0


def ensure_cluster(real_node: bool = False) -> Cluster:
    """The cluster at $KUBECONFIG (when set and healthy) or `.cluster/kubeconfig`, else a freshly started one.
    `real_node`: the one here, with its real node (started if the control plane is not running)."""
    from devkit import realnode

    env_config = os.environ.get("KUBECONFIG")
    if (not real_node and env_config and Path(env_config).resolve() != KUBECONFIG.resolve()
            and _usable(Path(env_config))):
        return Cluster(Path(env_config))
    with _flock(STATE_LOCK, fcntl.LOCK_EX):
        state = read_state()
        if _healthy(state) and (not real_node or realnode.healthy(state)) and _usable(KUBECONFIG):
            cluster = Cluster(KUBECONFIG)
            refill_volume_pool(cluster)
            return cluster
        return _up_locked(real_node)


@contextlib.contextmanager
def using_cluster(real_node: bool = False) -> Iterator[Cluster]:
    """`ensure_cluster()` for the length of a session (a test run, the demo). A cluster that a session started (not
    `make cluster-up`) is stopped when the last session using it ends."""
    with _flock(USERS_LOCK, fcntl.LOCK_SH) as users:
        cluster = ensure_cluster(real_node)
        if cluster.started_here:
            with _flock(STATE_LOCK, fcntl.LOCK_EX):
                state = read_state()
                if state:
                    write_state(state | {"started_by_session": True})
        yield cluster
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another session still uses it; the last one out stops it
        with _flock(STATE_LOCK, fcntl.LOCK_EX):
            if (read_state() or {}).get("started_by_session"):
                _down_locked()


def status() -> dict[str, Any]:
    state = read_state()
    if not state:
        return {"running": False}
    recorded = state["processes"] | (state.get("node") or {}).get("processes", {})
    procs = {name: {"pid": p["pid"], "alive": alive(p), "rss_mib": _rss_mib(int(p["pid"])) if alive(p) else None}
             for name, p in recorded.items()}
    return {"running": _healthy(state), "kubeconfig": str(KUBECONFIG), "ports": state["ports"], "processes": procs,
            "rss_mib_total": round(sum(p["rss_mib"] or 0 for p in procs.values()), 1)}


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up", "down", "status", "build", "stop", "start", "restart"])
    parser.add_argument("component", nargs="?", choices=COMPONENTS,
                        help="stop/start/restart: the one component (its data, ports and certificates are kept)")
    parser.add_argument("--real-node", action="store_true",
                        help="up: also start the real node (containerd + kubelet, docs/local-cluster.md)")
    parser.add_argument("--down-seconds", type=float, default=0.0, help="restart: how long it stays stopped")
    parser.add_argument("--kill", action="store_true", help="stop/restart: SIGKILL instead of SIGTERM")
    args = parser.parse_args(argv)
    command = args.command
    if command in ("stop", "start", "restart") and not args.component:
        parser.error(f"{command} needs a component")
    sig = signal.SIGKILL if args.kill else signal.SIGTERM
    try:
        if command == "stop":
            stop_component(args.component, sig)
        elif command == "start":
            print(f"{start_component(args.component):.2f}")
        elif command == "restart":
            print(f"{restart_component(args.component, args.down_seconds, sig):.2f}")
        elif command == "up":
            cluster_up(real_node=args.real_node)
            print(f"export KUBECONFIG={KUBECONFIG}")
        elif command == "down":
            cluster_down()
        elif command == "build":
            print(build())
        else:
            print(json.dumps(status(), indent=2))
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
