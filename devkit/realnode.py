"""A real node beside the local control plane: containerd + runc + CNI, a kubelet, kube-proxy and CoreDNS, all on
this machine.

The kwok nodes stay as they are (the simulated path: podrunner tests, the simulated demo, GPU scheduling). The real
node is
`real-node-1`, labelled and tainted `llmmultichat.io/real-node=true:NoSchedule`: only pods that select and tolerate
it land there (PLACEMENT), and containerd really runs them from images imported into its `k8s.io` namespace (no
registry). Started by `python -m devkit.cluster up --real-node` (`make cluster-up`, `make demo`), stopped with the
cluster (`make cluster-down`).

Everything lives under `<cluster state>/node/`: containerd's root (images, kept across restarts) and state, the CNI
config and IPAM data, the kubelet's root, pod logs, certificates and config. The pod network is the bridge `llmmc0`
with 10.250.0.0/24; the host end, 10.250.0.1, is the node's InternalIP (the API server reaches the kubelet there) and
the API server's advertised address (pods reach the API server there, and through the `kubernetes` Service).
kube-proxy (iptables mode) routes Service cluster IPs; CoreDNS, a host process on 10.250.0.1:53, answers the cluster
domain from the API server's Services and EndpointSlices and is every pod's nameserver.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

from devkit import cluster as cp
from devkit.paths import REPO_ROOT
from devkit.waiting import free_port

NODE_NAME = "real-node-1"
NODE_LABEL = "llmmultichat.io/real-node"
# What a pod needs to land on the real node (and nothing else does: kwok's pods cannot tolerate what they never see).
NODE_SELECTOR = {NODE_LABEL: "true"}
TOLERATION = {"key": NODE_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
PLACEMENT = {"nodeSelector": NODE_SELECTOR, "tolerations": [TOLERATION]}  # pod spec fields: only there
BRIDGE = "llmmc0"
SUBNET = "10.250.0.0/24"
NODE_IP = cp.NODE_IP
# The sandbox image containerd asks for; made here from devkit/node/pause (there is no registry to pull it from).
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"
NODE_SRC = REPO_ROOT / "devkit" / "node"
CNI_BIN = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin (and so the kubelet) uses
COMPONENTS = ("containerd", "kubelet", "kube-proxy", "coredns")
# CoreDNS listens on the host end of the bridge (every pod reaches it, no Service needed to find the DNS server).
CLUSTER_DNS = NODE_IP
CLUSTER_DOMAIN = "cluster.local"
# Host settings the node needs while it runs, restored at stop. A pod's packet to a cluster IP is routed by the host
# (DNAT to another pod, forwarded back onto the bridge); that pod's reply crosses the bridge only, and must go through
# the host's netfilter to be un-DNATed (br_netfilter), or the client sees an answer from an address it never asked.
_SYSCTLS = {"net/ipv4/ip_forward": "1", "net/bridge/bridge-nf-call-iptables": "1"}
# The identities kube-proxy and CoreDNS authenticate as. system:kube-proxy is bound to system:node-proxier by the
# API server's bootstrap RBAC; system:coredns gets the read access its kubernetes plugin needs (_coredns_rbac).
PROXY_USER = "system:kube-proxy"
COREDNS_USER = "system:coredns"
PKI_LAYOUT = "2"  # bumped when the node's certificates change (a new component, a new SAN)


class NodeError(cp.ClusterError):
    """The real node could not be built, started or stopped; says what the host lacks when that is the reason."""


def node_dir() -> Path:
    return cp.STATE_DIR / "node"


def _paths() -> dict[str, Path]:
    base = node_dir()
    return {
        "base": base, "root": base / "containerd" / "root", "state": base / "containerd" / "state",
        "socket": base / "containerd" / "state" / "containerd.sock", "runc_root": base / "containerd" / "runc",
        "cni_conf": base / "cni" / "net.d", "cni_data": base / "cni" / "ipam", "kubelet": base / "kubelet",
        "pod_logs": base / "pod-logs", "plugins": base / "volume-plugins", "pki": base / "pki",
        "config": base / "config",
    }


# ---------------------------------------------------------------------------------------------------------- build

def build() -> Path:
    """Builds kubelet, containerd, its runc shim, ctr and pause into the cache (devkit/node/build.sh); the bin dir."""
    result = subprocess.run(["bash", str(NODE_SRC / "build.sh")], stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise NodeError(f"building the node failed (exit {result.returncode}); see the output above")
    return Path(result.stdout.strip().splitlines()[-1])


def ctr(bins: Path, *args: str, input_path: Path | None = None, check: bool = True,
        timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """containerd's own client against the node's containerd, in the kubelet's namespace."""
    cmd = [str(bins / "ctr"), "--address", str(_paths()["socket"]), "--namespace", NAMESPACE, *args]
    stdin = input_path.open("rb") if input_path else subprocess.DEVNULL
    try:
        result = subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, timeout=timeout)
    finally:
        if input_path:
            stdin.close()  # type: ignore[union-attr]
    if check and result.returncode != 0:
        raise NodeError(f"ctr {' '.join(args)} failed (exit {result.returncode}): {result.stderr.strip()}")
    return result


# ---------------------------------------------------------------------------------------------------------- host checks

# Effective capabilities the node needs, by bit number (linux/capability.h).
_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21, "CAP_SYS_CHROOT": 18, "CAP_MKNOD": 27}


def host_problems() -> list[str]:
    """What this host lacks for a real node, each naming the missing feature, capability or Debian package."""
    problems = []
    if os.geteuid() != 0:
        problems.append("containerd and the kubelet run as root here: run as root")
    cap_eff = next((int(line.split()[1], 16) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("CapEff:")), 0)
    problems += [f"capability {name} is missing (CapEff {cap_eff:#x})"
                 for name, bit in _CAPABILITIES.items() if not cap_eff >> bit & 1]
    if not re.search(r"\boverlay$", Path("/proc/filesystems").read_text(), re.MULTILINE):
        problems.append("the kernel has no overlay filesystem (containerd's overlayfs snapshotter needs it)")
    if not Path("/sys/fs/cgroup/cgroup.controllers").exists():
        problems += [f"cgroup v1 controller '{c}' is not mounted at /sys/fs/cgroup/{c}"
                     for c in ("cpu", "cpuacct", "cpuset", "memory", "pids")
                     if not Path(f"/sys/fs/cgroup/{c}").is_dir()]
    if not Path("/proc/self/ns/net").exists():
        problems.append("the kernel has no network namespaces")
    for tool, package in (("runc", "runc"), ("ip", "iproute2"), ("iptables", "iptables"), ("umount", "mount")):
        if not shutil.which(tool):
            problems.append(f"`{tool}` is not on PATH (Debian package {package})")
    problems += [f"CNI plugin {CNI_BIN / p} is missing (Debian package containernetworking-plugins)"
                 for p in CNI_PLUGINS if not (CNI_BIN / p).exists()]
    return problems + _netfilter_problems()


def _netfilter_problems() -> list[str]:
    """What kube-proxy's Service routing needs from the kernel: a usable nat table and br_netfilter."""
    problems = []
    if shutil.which("iptables"):
        try:
            nat = _iptables("iptables", "-t", "nat", "-L", "-n", timeout=15)
        except subprocess.TimeoutExpired:
            nat = None
            problems.append("`iptables -t nat -L -n` did not answer within 15 s (the xtables lock is held?)")
        if nat and nat.returncode != 0:
            problems.append("the iptables nat table is unusable (kube-proxy's Service routing needs it; kernel "
                            f"modules nf_nat / nft_chain_nat): {nat.stderr.strip()}")
    for key in _SYSCTLS:
        if not (Path("/proc/sys") / key).exists():
            module = " (kernel module br_netfilter: `modprobe br_netfilter`)" if "bridge" in key else ""
            problems.append(f"/proc/sys/{key} is missing{module}: Service routing between pods needs it")
    return problems


def _iptables(tool: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    # -w: wait for the xtables lock (kube-proxy, CNI's portmap and buildah take it too) instead of failing.
    return subprocess.run([tool, "-w", "5", *args], capture_output=True, text=True, timeout=timeout)


def check_host() -> None:
    problems = host_problems()
    if problems:
        raise NodeError("this machine cannot run the real node:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------------------------------------- network

def ensure_bridge() -> None:
    """The pod bridge with the host's address on it, made before the API server starts (it advertises NODE_IP)."""
    if subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0:
        _ip("link", "add", BRIDGE, "type", "bridge")
    addresses = subprocess.run(["ip", "-4", "-o", "addr", "show", BRIDGE], capture_output=True, text=True).stdout
    if f" {NODE_IP}/" not in addresses:
        _ip("addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise NodeError(f"ip {' '.join(args)} failed: {result.stderr.strip()} (needs CAP_NET_ADMIN)")


def _cni_config() -> dict[str, Any]:
    # No default gateway, no masquerade: pods talk to each other and to NODE_IP on the bridge, never off the machine.
    # The one route through the host is to the Service range, which kube-proxy's rules there DNAT to endpoints.
    # portmap serves hostPort, loopback brings up `lo`.
    return {
        "cniVersion": "1.0.0", "name": "llmmultichat",
        "plugins": [
            {"type": "bridge", "bridge": BRIDGE, "isGateway": False, "ipMasq": False, "hairpinMode": True,
             "ipam": {"type": "host-local", "dataDir": str(_paths()["cni_data"]),
                      "ranges": [[{"subnet": SUBNET, "rangeStart": "10.250.0.10", "gateway": NODE_IP}]],
                      "routes": [{"dst": cp.SERVICE_CIDR, "gw": NODE_IP}]}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


# ---------------------------------------------------------------------------------------------------------- config

def _containerd_config() -> str:
    p = _paths()
    cri_runtime = 'plugins."io.containerd.cri.v1.runtime"'
    return f"""\
version = 4
imports = []
root = "{p['root']}"
state = "{p['state']}"

[plugins."io.containerd.server.v1.grpc"]
  address = "{p['socket']}"

[plugins."io.containerd.server.v1.ttrpc"]
  address = "{p['socket']}.ttrpc"

[plugins."io.containerd.nri.v1.nri"]
  disable = true

[plugins."io.containerd.internal.v1.opt"]
  path = "{p['state']}/opt"

[{cri_runtime}]
  # No CAP_SYS_RESOURCE here: lowering a sandbox's oom_score_adj below containerd's own fails in runc.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false

[{cri_runtime}.containerd]
  default_runtime_name = "runc"

[{cri_runtime}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri_runtime}.containerd.runtimes.runc.options]
  BinaryName = "{shutil.which('runc') or 'runc'}"
  Root = "{p['runc_root']}"
  SystemdCgroup = false

[{cri_runtime}.cni]
  bin_dirs = ["{CNI_BIN}"]
  conf_dir = "{p['cni_conf']}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"

[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{PAUSE_IMAGE}"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
"""


def _kubelet_config(ports: dict[str, int]) -> dict[str, Any]:
    p = _paths()
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        # This host mounts cgroup v1 (hybrid) and has no systemd: v1 is deprecated in the kubelet, not gone.
        "failCgroupV1": False, "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{p['socket']}",
        "address": NODE_IP, "port": ports["kubelet"], "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": ports["kubelet_healthz"],
        "tlsCertFile": str(p["pki"] / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(p["pki"] / "kubelet-serving.key"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(cp.PKI / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "registerWithTaints": [{"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}],
        "podLogsDir": str(p["pod_logs"]), "volumePluginDir": str(p["plugins"]),
        # Pods resolve through CoreDNS only: the host's resolv.conf names servers a pod cannot reach (no route off
        # the machine) and search domains that would only slow every lookup down.
        "clusterDNS": [CLUSTER_DNS], "clusterDomain": CLUSTER_DOMAIN, "resolvConf": "",
        "failSwapOn": False, "rotateCertificates": False,
        # A shared development disk: evictions only when it is nearly full, and no image GC by usage (the imported
        # images cannot be pulled back; they are also pinned, which disk-pressure reclaim respects).
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%", "imagefs.inodesFree": "1%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False, "maxPods": 30, "nodeStatusReportFrequency": "10s",
        "containerLogMaxSize": "10Mi", "shutdownGracePeriod": "0s",
    }


def _kube_proxy_config(ports: dict[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(_paths()["config"] / "kube-proxy.kubeconfig")},
        "mode": "iptables", "clusterCIDR": SUBNET, "hostnameOverride": NODE_NAME, "bindAddress": NODE_IP,
        "healthzBindAddress": f"127.0.0.1:{ports['kube_proxy_healthz']}",
        "metricsBindAddress": f"127.0.0.1:{ports['kube_proxy_metrics']}",
        "nodePortAddresses": [f"{NODE_IP}/32"],
        # 0 leaves the host's conntrack sysctls as they are (nothing to restore at stop; this is a shared machine),
        # and no route_localnet: NodePorts are not served on 127.0.0.1.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False, "minSyncPeriod": "1s",
                     "syncPeriod": "30s"},
    }


def _corefile(ports: dict[str, int]) -> str:
    # `log` writes every query to .cluster/logs/coredns.log (the first thing to read when a name does not resolve);
    # other names go to the host's resolvers (which pods could not reach themselves).
    return f"""\
.:53 {{
    bind {CLUSTER_DNS}
    errors
    log
    health 127.0.0.1:{ports['coredns_health']}
    ready 127.0.0.1:{ports['coredns_ready']}
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {_paths()['config'] / 'coredns.kubeconfig'} llmmultichat
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    forward . /etc/resolv.conf
    cache 5
}}
"""


def _coredns_rbac() -> list[dict[str, Any]]:
    """What CoreDNS's kubernetes plugin reads (as kubeadm grants it), for the user its certificate names."""
    rbac = "rbac.authorization.k8s.io"
    return [
        {"apiVersion": f"{rbac}/v1", "kind": "ClusterRole", "metadata": {"name": COREDNS_USER},
         "rules": [{"apiGroups": [""], "resources": ["endpoints", "services", "pods", "namespaces"],
                    "verbs": ["list", "watch"]},
                   {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]}]},
        {"apiVersion": f"{rbac}/v1", "kind": "ClusterRoleBinding", "metadata": {"name": COREDNS_USER},
         "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": COREDNS_USER},
         "subjects": [{"apiGroup": rbac, "kind": "User", "name": COREDNS_USER}]},
    ]


def _node_certificates() -> None:
    pki = _paths()["pki"]
    # Made anew whenever the cluster's CA is (its certificate's hash is in the marker) or the set of certificates.
    marker = hashlib.sha256((cp.PKI / "ca.crt").read_bytes()).hexdigest() + f" {PKI_LAYOUT}"
    if (pki / "complete").exists() and (pki / "complete").read_text() == marker:
        return
    pki.mkdir(parents=True, exist_ok=True)
    client_ext = "keyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"
    serving_ext = ("keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                   f"subjectAltName=IP:{NODE_IP},IP:127.0.0.1,DNS:{NODE_NAME}\n")
    # The Node authorizer and NodeRestriction know a kubelet by this identity.
    cp.sign_certificate(pki / "kubelet-client", f"/CN=system:node:{NODE_NAME}/O=system:nodes", client_ext)
    cp.sign_certificate(pki / "kubelet-serving", f"/CN={NODE_NAME}", serving_ext)
    cp.sign_certificate(pki / "kube-proxy", f"/CN={PROXY_USER}", client_ext)
    cp.sign_certificate(pki / "coredns", f"/CN={COREDNS_USER}", client_ext)
    (pki / "complete").write_text(marker)


def _write_configs(server: str, ports: dict[str, int]) -> None:
    p = _paths()
    for key in ("root", "state", "runc_root", "cni_conf", "cni_data", "kubelet", "pod_logs", "plugins", "config"):
        p[key].mkdir(parents=True, exist_ok=True)
    _node_certificates()
    (p["config"] / "containerd.toml").write_text(_containerd_config())
    (p["cni_conf"] / "10-llmmultichat.conflist").write_text(json.dumps(_cni_config(), indent=2))
    (p["config"] / "kubelet.yaml").write_text(json.dumps(_kubelet_config(ports), indent=2))
    (p["config"] / "kube-proxy.yaml").write_text(json.dumps(_kube_proxy_config(ports), indent=2))
    (p["config"] / "Corefile").write_text(_corefile(ports))
    for name, cert in (("kubeconfig", "kubelet-client"), ("kube-proxy.kubeconfig", "kube-proxy"),
                       ("coredns.kubeconfig", "coredns")):
        (p["config"] / name).write_text(cp.kubeconfig_for(server, p["pki"] / cert))
        (p["config"] / name).chmod(0o600)


# ---------------------------------------------------------------------------------------------------------- pause image

def pause_image_archive(pause_binary: Path, target: Path) -> Path:
    """An OCI image archive of the sandbox image: one layer holding /pause, run as 65535 (nobody's pause)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tar.gettarinfo(str(pause_binary), arcname="pause")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        info.mode = 0o755
        with pause_binary.open("rb") as data:
            tar.addfile(info, data)
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer_desc = blob(layer.getvalue(), "application/vnd.oci.image.layer.v1.tar")
    config = {"architecture": "amd64", "os": "linux",
              "config": {"Entrypoint": ["/pause"], "User": "65535:65535"},
              "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]}}
    config_desc = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    manifest_desc["annotations"] = {"io.containerd.image.name": PAUSE_IMAGE,
                                    "org.opencontainers.image.ref.name": PAUSE_IMAGE.rpartition(":")[2]}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [manifest_desc]}
    files = {"oci-layout": json.dumps({"imageLayoutVersion": "1.0.0"}).encode(),
             "index.json": json.dumps(index).encode()}
    files |= {f"blobs/sha256/{d.removeprefix('sha256:')}": data for d, data in blobs.items()}
    with tarfile.open(target, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


def image_present(bins: Path, name: str) -> bool:
    return bool(ctr(bins, "images", "ls", "-q", f"name=={name}").stdout.strip())


def import_archive(bins: Path, archive: Path) -> None:
    """Imports an image archive (OCI or docker) into the kubelet's namespace, unpacked for overlayfs."""
    # Unpacked layers leave the content store: the snapshots are what runs, and a torch image is gigabytes twice.
    ctr(bins, "images", "import", "--local", "--snapshotter", "overlayfs", "--discard-unpacked-layers", "-",
        input_path=archive)


# ---------------------------------------------------------------------------------------------------------- start

def start(state: dict[str, Any], cluster: cp.Cluster) -> None:
    """Starts containerd and the kubelet for the running control plane recorded in `state`; returns once the node is
    Ready. The pod bridge must exist already (ensure_bridge, before the API server)."""
    bins = build()
    ports = {name: free_port() for name in ("kubelet", "kubelet_healthz", "kube_proxy_healthz",
                                            "kube_proxy_metrics", "coredns_health", "coredns_ready")}
    server = f"https://{state['host']}:{state['ports']['apiserver']}"
    _write_configs(server, ports)
    p = _paths()
    state["node"] = {"bin_dir": str(bins), "ports": ports, "processes": {}}
    cp.write_state(state)
    _spawn(state, "containerd", [str(bins / "containerd"), "--config", str(p["config"] / "containerd.toml"),
                                 "--log-level", "warn"], env={"PATH": f"{bins}:{os.environ.get('PATH', '')}"})
    _wait(state, "containerd's socket", lambda: ctr(bins, "version", check=False).returncode == 0, "containerd")
    if not image_present(bins, PAUSE_IMAGE):
        import_archive(bins, pause_image_archive(bins / "pause", p["config"] / "pause.tar"))
    _spawn(state, "kubelet", [
        str(bins / "kubelet"), f"--config={p['config'] / 'kubelet.yaml'}",
        f"--kubeconfig={p['config'] / 'kubeconfig'}", f"--root-dir={p['kubelet']}", f"--cert-dir={p['pki']}",
        f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", f"--node-labels={NODE_LABEL}=true",
        "--v=1",
    ], env={"PATH": f"{bins}:{os.environ.get('PATH', '')}"})
    _wait(state, f"node {NODE_NAME} Ready", lambda: _node_ready(cluster), "kubelet", timeout=120)
    _start_services(state, cluster, bins, ports)
    cp.log(f"real node {NODE_NAME} Ready (containerd, kubelet, kube-proxy, CoreDNS on {CLUSTER_DNS}:53; pods on "
           f"{BRIDGE} {SUBNET})")


def _start_services(state: dict[str, Any], cluster: cp.Cluster, bins: Path, ports: dict[str, int]) -> None:
    """kube-proxy (Service routing) and CoreDNS (cluster DNS); returns once kube-proxy has synced its rules and
    CoreDNS has listed the cluster's Services."""
    config = _paths()["config"]
    _set_sysctls(state)
    _spawn(state, "kube-proxy", [str(bins / "kube-proxy"), f"--config={config / 'kube-proxy.yaml'}", "--v=1"],
           env={})
    _wait(state, "kube-proxy /healthz", lambda: cp.http_ok(f"http://127.0.0.1:{ports['kube_proxy_healthz']}/healthz"),
          "kube-proxy")
    cluster.apply(_coredns_rbac())
    _spawn(state, "coredns", [str(bins / "coredns"), "-conf", str(config / "Corefile")], env={})
    _wait(state, "CoreDNS /ready", lambda: cp.http_ok(f"http://127.0.0.1:{ports['coredns_ready']}/ready"),
          "coredns")


def _set_sysctls(state: dict[str, Any]) -> None:
    saved = state["node"].setdefault("sysctls", {})
    for key, value in _SYSCTLS.items():
        path = Path("/proc/sys") / key
        current = path.read_text().strip()
        if current != value:
            saved[key] = current  # the host's value, put back at stop
            path.write_text(value)
    cp.write_state(state)


def _restore_sysctls(node: dict[str, Any]) -> None:
    for key, value in node.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            (Path("/proc/sys") / key).write_text(value)


def _node_ready(cluster: cp.Cluster) -> bool:
    result = cluster.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
    if result.returncode != 0:
        return False
    conditions = json.loads(result.stdout)["status"].get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _spawn(state: dict[str, Any], name: str, argv: list[str], env: dict[str, str]) -> None:
    log = (cp.LOGS / f"{name}.log").open("wb")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=node_dir(), env={**os.environ, **env})
    log.close()
    state["node"]["processes"][name] = {"pid": proc.pid, "start_time": cp.start_time(proc.pid), "argv": argv}
    cp.write_state(state)


def _wait(state: dict[str, Any], what: str, check: Any, component: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        proc = state["node"]["processes"][component]
        if not cp.alive(proc):
            raise NodeError(f"{component} exited while waiting for {what}; last log lines:\n{cp.tail(component)}")
        if time.monotonic() > deadline:
            raise NodeError(f"timed out after {timeout}s waiting for {what}; last log lines of {component}:\n"
                            f"{cp.tail(component)}")
        time.sleep(0.5)


def healthy(state: dict[str, Any] | None) -> bool:
    node = (state or {}).get("node")
    return bool(node) and set(node["processes"]) == set(COMPONENTS) and all(
        cp.alive(p) for p in node["processes"].values())


# ---------------------------------------------------------------------------------------------------------- stop

def stop(state: dict[str, Any]) -> None:
    """Stops the node and leaves nothing behind: its pods are deleted through the API while the kubelet still runs
    (so CNI tears their networks down), then CoreDNS, kube-proxy, the kubelet and containerd stop, leftover
    containers are removed, everything mounted under the node's directory is unmounted, the kubelet's cgroups,
    kube-proxy's and the kubelet's iptables chains and the bridge are removed, and the host's sysctls restored.
    containerd's root (the imported images) is kept for the next start."""
    node = state.get("node") or {}
    processes = node.get("processes", {})
    bins = Path(node["bin_dir"]) if node.get("bin_dir") else None
    if processes.get("kubelet") and cp.alive(processes["kubelet"]):
        _drain()
    for name in ("coredns", "kube-proxy", "kubelet"):
        _terminate(processes.get(name), name)
    if bins and processes.get("containerd") and cp.alive(processes["containerd"]):
        _remove_containers(bins)
    _terminate(processes.get("containerd"), "containerd")
    if bins:
        _kill_shims(bins / "containerd-shim-runc-v2")
    _unmount_under(node_dir())
    _remove_kubelet_cgroups()
    _remove_service_rules(bins)
    _restore_sysctls(node)
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True)
    for name, path in _paths().items():
        if name not in ("base", "root", "pki"):
            shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        (node_dir() / "cni").rmdir()
    _remove_dangling_log_links()
    _remove_fixed_path_leftovers()
    state.pop("node", None)


def _drain() -> None:
    if not cp.KUBECONFIG.exists():
        return
    cluster = cp.Cluster(cp.KUBECONFIG)
    with contextlib.suppress(cp.ClusterError, subprocess.TimeoutExpired):
        cluster.kubectl("cordon", NODE_NAME, check=False)
        selector = f"spec.nodeName={NODE_NAME}"
        cluster.kubectl("delete", "pods", "--all-namespaces", f"--field-selector={selector}", "--grace-period=3",
                        "--wait=false", check=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            pods = cluster.kubectl("get", "pods", "-A", f"--field-selector={selector}", "-o", "name", check=False)
            if pods.returncode != 0 or not pods.stdout.strip():
                break
            time.sleep(1)
        cluster.kubectl("delete", "node", NODE_NAME, "--wait=false", check=False)


def _terminate(proc: dict[str, Any] | None, name: str) -> None:
    if not proc or not cp.alive(proc):
        return
    pid = int(proc["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while cp.alive(proc) and time.monotonic() < deadline:
        time.sleep(0.1)
    if cp.alive(proc):
        cp.log(f"{name} (pid {pid}) ignored SIGTERM: killing it")
        os.kill(pid, signal.SIGKILL)
        while cp.alive(proc):
            time.sleep(0.05)
    cp.log(f"stopped {name} (pid {pid})")


def _remove_containers(bins: Path) -> None:
    """Containers the kubelet left (a drain that timed out, sandboxes not yet collected): killed and removed."""
    for task in ctr(bins, "tasks", "ls", "-q", check=False).stdout.split():
        ctr(bins, "tasks", "kill", "--signal", "SIGKILL", task, check=False)
    time.sleep(0.5)
    for task in ctr(bins, "tasks", "ls", "-q", check=False).stdout.split():
        ctr(bins, "tasks", "delete", "--force", task, check=False)
    for container in ctr(bins, "containers", "ls", "-q", check=False).stdout.split():
        ctr(bins, "containers", "delete", container, check=False)
    for row in ctr(bins, "sandboxes", "ls", check=False).stdout.splitlines()[1:]:  # the CRI's sandbox records
        ctr(bins, "sandboxes", "rm", "--force", row.split()[0], check=False)


def _kill_shims(shim: Path) -> None:
    """Shims outlive containerd by design; ours are known by their executable (this cache's binary), not a name."""
    target = shim.resolve()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "exe")) == target:
                os.kill(int(entry.name), signal.SIGKILL)


def _unmount_under(base: Path) -> None:
    """Unmounts everything mounted at or below `base` (overlay rootfs, tmpfs volumes, netns), deepest first."""
    prefix = str(base.resolve())
    for _ in range(3):
        mountinfo = Path("/proc/self/mountinfo").read_text().splitlines()
        points = [line.split()[4].replace("\\040", " ") for line in mountinfo]
        ours = sorted({p for p in points if p == prefix or p.startswith(prefix + "/")}, key=len, reverse=True)
        if not ours:
            return
        for point in ours:
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
    raise NodeError(f"mounts left under {prefix} after unmounting: see /proc/self/mountinfo")


def _remove_kubelet_cgroups() -> None:
    """The kubelet's cgroup tree (kubepods, with cgroupfs on v1 under every hierarchy), emptied now: rmdir bottom-up."""
    for hierarchy in Path("/sys/fs/cgroup").iterdir():
        top = hierarchy / "kubepods"
        if not top.is_dir():
            continue
        for folder in sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True):
            with contextlib.suppress(OSError):
                folder.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


# Paths the kubelet and containerd use whatever their root directories (device plugin socket, shim sockets, CNI's
# result cache, log links): emptied by the stops above, removed here when empty. Nothing else on this machine runs a
# kubelet or containerd; buildah shares /var/lib/cni and recreates it when it needs it.
_FIXED_DIRS = ("/var/lib/kubelet/device-plugins", "/var/lib/kubelet", "/run/containerd/s", "/run/containerd",
               "/var/lib/cni/results", "/var/lib/cni", "/var/log/containers")
# Where kube-proxy and the kubelet put their chains (KUBE-SERVICES, KUBE-POSTROUTING, the canaries they watch to
# notice a flushed firewall, ...), in both IP families: kube-proxy sets IPv6 up too when ip6tables works.
_IPTABLES = ("iptables", "ip6tables")
_TABLES = ("filter", "nat", "mangle", "raw")


def _remove_fixed_path_leftovers() -> None:
    Path("/var/lib/kubelet/device-plugins/kubelet.sock").unlink(missing_ok=True)
    for folder in _FIXED_DIRS:
        with contextlib.suppress(OSError):
            Path(folder).rmdir()  # only when empty


def kube_chains() -> list[str]:
    """Every KUBE-* chain on this host, as '<tool> <table> <chain>' (empty when no node runs)."""
    return [f"{tool} {table} {chain}" for tool, table, rules in _rule_sets() for chain in _chains(rules)]


def _rule_sets() -> list[tuple[str, str, list[str]]]:
    sets = []
    for tool in _IPTABLES:
        for table in _TABLES:
            listed = _iptables(tool, "-t", table, "-S")
            if listed.returncode == 0:  # a table this kernel lacks (raw, for one family) holds nothing
                sets.append((tool, table, listed.stdout.splitlines()))
    return sets


def _chains(rules: list[str]) -> list[str]:
    return [line.split()[1] for line in rules if line.startswith("-N KUBE-")]


def _remove_service_rules(bins: Path | None) -> None:
    """kube-proxy's own cleanup (`--cleanup`: its iptables, ipvs and nftables leftovers), then whatever KUBE-*
    chains remain (the kubelet's canaries, a kube-proxy killed mid-sync): the jumps into them from the built-in
    chains, then their rules, then the chains."""
    if bins and (bins / "kube-proxy").exists():
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([str(bins / "kube-proxy"), "--cleanup", "--v=0"], capture_output=True, timeout=60)
    for tool, table, rules in _rule_sets():
        for rule in rules:
            words = shlex.split(rule)
            if words[0] == "-A" and not words[1].startswith("KUBE-") and re.search(r" -[jg] KUBE-", rule):
                _iptables(tool, "-t", table, "-D", *words[1:])
        for flag in ("-F", "-X"):
            for chain in _chains(rules):
                _iptables(tool, "-t", table, flag, chain)
    left = kube_chains()
    if left:  # said, not raised: the rest of the stop (and the control plane's after it) still has to happen
        cp.log(f"warning: iptables chains left after the node stopped: {left}")


def _remove_dangling_log_links() -> None:
    """The kubelet links container logs into /var/log/containers (a fixed path); links into our pod logs go."""
    folder = Path("/var/log/containers")
    if not folder.is_dir():
        return
    prefix = str(_paths()["pod_logs"])
    for link in folder.iterdir():
        with contextlib.suppress(OSError):
            if link.is_symlink() and os.readlink(link).startswith(prefix):
                link.unlink()
