"""The real node (devkit.realnode): a kubelet and containerd beside the kwok nodes, running pods with the chat pod's
security context from an image built here (the local Debian base, imported by `make node-images`), with Services
routed by kube-proxy and names answered by CoreDNS.

Opt-in (`make node-e2e`, or pytest --run-real-node with `make node-up node-images` done): a cold machine builds the
kubelet, containerd and the images first.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devkit import realnode
from devkit.cluster import Cluster, alive, ensure_cluster, read_state, stop_real_node, using_cluster
from devkit.localimages import BASE_IMAGE
from devkit.realnode import BRIDGE, CLUSTER_DNS, NODE_IP, NODE_LABEL, NODE_NAME, NODE_SELECTOR, SUBNET, TOLERATION
from devkit.waiting import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.real_node]

UID = 10001


@pytest.fixture(scope="module")
def node_cluster() -> Iterator[Cluster]:
    with using_cluster(real_node=True) as cluster:
        yield cluster


@pytest.fixture
def ns(node_cluster: Cluster) -> Iterator[str]:
    name = f"real-node-{uuid.uuid4().hex[:8]}"
    node_cluster.create_namespace(name)
    yield name
    node_cluster.delete_namespace(name)


def chat_like_pod(name: str, command: list[str], *, claim: str | None = None, read_only: bool = False,
                  restart: str = "Never") -> dict[str, Any]:
    """A pod on the real node with the chat Deployment's security settings (deploy/chat/deployment.yaml)."""
    mounts = [{"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}]
    if claim:
        mounts.append({"name": "data", "mountPath": "/data", "readOnly": read_only})
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "nodeSelector": NODE_SELECTOR, "tolerations": [TOLERATION], "restartPolicy": restart,
            "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 2,
            "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "fsGroup": UID,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "main", "image": BASE_IMAGE, "imagePullPolicy": "Never", "command": command,
                "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    }


def pod_status(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return dict(cluster.get_json("pod", name, "-n", ns)["status"])


def wait_phase(cluster: Cluster, ns: str, name: str, phases: set[str], timeout: float = 120) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        status = pod_status(cluster, ns, name)
        waiting = [c["state"]["waiting"] for c in status.get("containerStatuses", []) if "waiting" in c["state"]]
        stuck = [w for w in waiting if w.get("reason") in ("ErrImageNeverPull", "CreateContainerError",
                                                             "CreateContainerConfigError", "CrashLoopBackOff")]
        assert not stuck, f"pod {name} cannot start: {stuck}"
        return status if status.get("phase") in phases else None

    return wait_until(f"pod {name} in {phases}", probe, timeout=timeout)


def claim(cluster: Cluster, ns: str, name: str) -> str:
    cluster.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
                   "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}},
                  namespace=ns)
    wait_until(f"claim {name} Bound",
               lambda: cluster.get_json("pvc", name, "-n", ns)["status"].get("phase") == "Bound", timeout=60)
    return name


def exec_in(cluster: Cluster, ns: str, pod: str, *command: str, check: bool = True) -> Any:
    return cluster.kubectl("exec", "-n", ns, pod, "-c", "main", "--", *command, check=check)


def test_real_node_is_ready_with_containerd_beside_the_kwok_nodes(node_cluster: Cluster) -> None:
    wide = node_cluster.kubectl("get", "nodes", "-o", "wide").stdout
    rows = {line.split()[0]: line.split() for line in wide.splitlines()[1:]}
    assert {"gpu-node-1", "gpu-node-2", "cpu-node-1", NODE_NAME} <= set(rows), wide
    row = rows[NODE_NAME]
    assert row[1] == "Ready" and NODE_IP in row and row[-1].startswith("containerd://2."), wide
    node = node_cluster.get_json("node", NODE_NAME)
    assert node["metadata"]["labels"][NODE_LABEL] == "true"
    assert {"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"} in node["spec"]["taints"]
    server = json.loads(node_cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    assert node["status"]["nodeInfo"]["kubeletVersion"] == server  # one release for the whole cluster


def test_pod_runs_with_the_chat_security_context(node_cluster: Cluster, ns: str) -> None:
    data = claim(node_cluster, ns, "data")
    node_cluster.apply(chat_like_pod("secure", ["sh", "-c", "echo started; exec sleep 600"], claim=data),
                       namespace=ns)
    status = wait_phase(node_cluster, ns, "secure", {"Running"})
    assert ipaddress.ip_address(status["podIP"]) in ipaddress.ip_network(SUBNET)
    assert status["containerStatuses"][0]["containerID"].startswith("containerd://")

    assert exec_in(node_cluster, ns, "secure", "id", "-u").stdout.strip() == str(UID)
    assert str(UID) in exec_in(node_cluster, ns, "secure", "id", "-G").stdout.split()  # fsGroup, supplementary
    refused = exec_in(node_cluster, ns, "secure", "touch", "/probe", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    proc_status = exec_in(node_cluster, ns, "secure", "cat", "/proc/self/status").stdout
    fields = dict(line.split(":", 1) for line in proc_status.splitlines() if ":" in line)
    assert fields["CapEff"].strip() == "0000000000000000"  # drop ALL
    assert fields["NoNewPrivs"].strip() == "1"  # allowPrivilegeEscalation: false
    assert fields["Seccomp"].strip() == "2"  # RuntimeDefault: a filter is installed
    # The emptyDir gets the fsGroup; the hostPath PV is writable by the pod's uid (never root).
    assert exec_in(node_cluster, ns, "secure", "stat", "-c", "%g", "/tmp").stdout.strip() == str(UID)
    written = exec_in(node_cluster, ns, "secure", "sh", "-c", "echo hi > /data/f && stat -c %u /data/f")
    assert written.stdout.strip() == str(UID)
    assert node_cluster.kubectl("logs", "-n", ns, "secure").stdout.strip() == "started"


def test_termination_message_and_a_volume_handed_from_one_pod_to_the_next(node_cluster: Cluster, ns: str) -> None:
    data = claim(node_cluster, ns, "handoff")
    result = json.dumps({"outcome": "trained", "version": "v1"})
    writer = chat_like_pod("writer", ["sh", "-c", f"mkdir -p /data/lora && echo '{result}' > /data/lora/result.json"
                                      f" && cat /data/lora/result.json > /dev/termination-log"], claim=data)
    node_cluster.apply(writer, namespace=ns)
    status = wait_phase(node_cluster, ns, "writer", {"Succeeded", "Failed"})
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert (status["phase"], terminated["exitCode"], terminated["reason"]) == ("Succeeded", 0, "Completed")
    assert json.loads(terminated["message"]) == json.loads(result)  # written by the kubelet from the file

    reader = chat_like_pod("reader", ["sh", "-c", "cat /data/lora/result.json > /dev/termination-log; exit 3"],
                           claim=data, read_only=True)
    node_cluster.apply(reader, namespace=ns)
    status = wait_phase(node_cluster, ns, "reader", {"Succeeded", "Failed"})
    terminated = status["containerStatuses"][0]["state"]["terminated"]
    assert (status["phase"], terminated["exitCode"], terminated["reason"]) == ("Failed", 3, "Error")
    assert json.loads(terminated["message"]) == json.loads(result)


def test_kwok_pods_never_land_on_the_real_node(node_cluster: Cluster, ns: str) -> None:
    # The simulated path's pods (no toleration) keep going to kwok's cpu-node-1: the taint keeps them off.
    for i in range(3):
        node_cluster.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"sim-{i}"},
                            "spec": {"containers": [{"name": "main", "image": "registry.invalid/never-pulled:1"}]}},
                           namespace=ns)
    for i in range(3):
        wait_phase(node_cluster, ns, f"sim-{i}", {"Running"}, timeout=60)
        assert node_cluster.get_json("pod", f"sim-{i}", "-n", ns)["spec"]["nodeName"] == "cpu-node-1"


# Run in a pod: the names through CoreDNS (the short one through the search path), a page through the web Service's
# cluster IP, and the API server's /version through the `kubernetes` Service, its certificate checked against the
# Service's DNS name. Retries while kube-proxy and CoreDNS catch up with a Service made a moment ago.
CLIENT = """
import json, socket, ssl, sys, time, urllib.request
ns, sa = sys.argv[1], "/var/run/secrets/kubernetes.io/serviceaccount"
deadline = time.monotonic() + 60
while True:
    try:
        names = {n: socket.gethostbyname(n) for n in ("kubernetes.default.svc.cluster.local", "web", f"web.{ns}.svc")}
        body = urllib.request.urlopen(f"http://web.{ns}.svc/", timeout=5).read().decode().strip()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(1)
request = urllib.request.Request("https://kubernetes.default.svc/version",
                                 headers={"Authorization": "Bearer " + open(sa + "/token").read()})
context = ssl.create_default_context(cafile=sa + "/ca.crt")
version = json.load(urllib.request.urlopen(request, timeout=10, context=context))["gitVersion"]
print(json.dumps({"names": names, "body": body, "version": version}))
"""


def test_a_pod_reaches_services_by_their_dns_names(node_cluster: Cluster, ns: str) -> None:
    web = chat_like_pod("web", ["sh", "-c", "echo served-by-web > /tmp/index.html && "
                                            "exec python3 -m http.server 8080 --directory /tmp"])
    web["metadata"]["labels"] = {"app": "web"}
    client = chat_like_pod("client", ["sleep", "600"])
    client["spec"]["automountServiceAccountToken"] = True
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    node_cluster.apply([web, client, service], namespace=ns)
    wait_phase(node_cluster, ns, "web", {"Running"})
    wait_phase(node_cluster, ns, "client", {"Running"})
    web_ip = node_cluster.get_json("service", "web", "-n", ns)["spec"]["clusterIP"]
    api_ip = node_cluster.get_json("service", "kubernetes", "-n", "default")["spec"]["clusterIP"]
    assert api_ip != NODE_IP  # the pod below goes through the Service, not straight to the API server

    answer = json.loads(exec_in(node_cluster, ns, "client", "python3", "-c", CLIENT, ns).stdout)
    assert answer["names"] == {"kubernetes.default.svc.cluster.local": api_ip, "web": web_ip, f"web.{ns}.svc": web_ip}
    assert answer["body"] == "served-by-web"
    server = json.loads(node_cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]["gitVersion"]
    assert answer["version"] == server
    resolv = exec_in(node_cluster, ns, "client", "cat", "/etc/resolv.conf").stdout.splitlines()
    assert f"nameserver {CLUSTER_DNS}" in resolv
    assert f"search {ns}.svc.cluster.local svc.cluster.local cluster.local" in resolv, resolv
    # The host reaches a cluster IP too (kube-proxy's OUTPUT rules), as the e2e test does for the chat Service.
    with urllib.request.urlopen(f"http://{web_ip}/", timeout=10) as response:
        assert response.read().decode().strip() == "served-by-web"


def test_a_missing_nat_table_is_named_not_waited_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "iptables"
    fake.write_text("#!/bin/sh\necho \"iptables v1.8.9 (nf_tables): can't initialize iptables table 'nat': "
                    "Table does not exist\" >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    problems = [p for p in realnode.host_problems() if "nat table" in p]
    assert len(problems) == 1 and "can't initialize iptables table 'nat'" in problems[0], problems


def _processes_running(executables: set[Path]) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and Path(os.readlink(entry / "exe")) in executables:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_node_stop_leaves_no_service_rules_or_processes(node_cluster: Cluster) -> None:
    # Last in this module: it stops the node, and starts it again for whoever comes next.
    node = read_state()["node"]  # type: ignore[index]
    bins = Path(node["bin_dir"])
    executables = {(bins / name).resolve() for name in realnode.COMPONENTS}
    chains = realnode.kube_chains()
    assert "iptables nat KUBE-SERVICES" in chains and "iptables nat KUBE-POSTROUTING" in chains, chains
    assert len(_processes_running(executables)) >= len(realnode.COMPONENTS)
    saved = dict(node.get("sysctls", {}))
    stop_real_node()
    try:
        assert realnode.kube_chains() == []
        assert not [name for name, proc in node["processes"].items() if alive(proc)]
        assert _processes_running(executables) == []
        assert subprocess.run(["ip", "link", "show", BRIDGE], capture_output=True).returncode != 0
        for key, value in saved.items():  # the host's own values again
            assert (Path("/proc/sys") / key).read_text().strip() == value
    finally:
        ensure_cluster(real_node=True)
