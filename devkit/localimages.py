"""The project's three images, built here from their Dockerfiles and imported into the real node's containerd.

No Docker engine and no registry: `buildah bud --isolation chroot` builds each Dockerfile on the local Debian base
(devkit/base-image/build.sh, passed as BASE_IMAGE). pip's downloads are a wheelhouse outside the clone
(`~/.cache/llmmultichat/wheels`, filled by `pip download` here with the same constraints): the builder stage installs
from it only (a pip.conf mounted for the build says `no-index`), so torch's ~3 GB come down once for both images,
and a rebuild downloads nothing. (pip's own HTTP cache stores nothing here: the proxy's responses are not
cacheable.) Each image is tagged with exactly the
name and tag deploy/ uses (devkit.image_tags, from deploy/kustomization.yaml), as the kubelet spells it
(`docker.io/llmmultichat/chat:<tag>`), and imported into containerd's `k8s.io` namespace through a docker-archive
(uncompressed: no gzip of gigabytes on two cores).

Rebuilt only on change: a content hash of the Dockerfile, the files it copies and the base image's ID is a label on
the image (`llmmultichat.io/content-hash`); the containerd copy is replaced only when its image differs.

CLI: `python -m devkit.localimages [build|import|all] [--only chat,trainer,...]` (`make node-images`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devkit import cluster as cp
from devkit import realnode
from devkit.image_tags import image_tags
from devkit.paths import REPO_ROOT

BASE_IMAGE = "localhost/llmmultichat/base:bookworm"
BASE_SCRIPT = REPO_ROOT / "devkit" / "base-image" / "build.sh"
DOCKERFILES = {
    "llmmultichat/operator": REPO_ROOT / "operator" / "Dockerfile",
    "llmmultichat/trainer": REPO_ROOT / "trainer_image" / "Dockerfile",
    "llmmultichat/chat": REPO_ROOT / "chat_image" / "Dockerfile",
}
HASH_LABEL = "llmmultichat.io/content-hash"
HOST_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's bundle, where Debian's pip and OpenSSL look
_SKIPPED_PARTS = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMMULTICHAT_CACHE", Path.home() / ".cache" / "llmmultichat"))


@dataclass
class Built:
    ref: str
    image_id: str
    size: str  # as buildah reports it, e.g. '364 MB'
    seconds: float  # 0 when it was current


def reference(name: str) -> str:
    """The name the kubelet asks containerd for when a pod says `llmmultichat/chat:<tag>`."""
    return f"docker.io/{name}:{image_tags()[name]}"


def _buildah(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["buildah", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise cp.ClusterError(f"buildah {' '.join(args[:2])} failed (exit {result.returncode}): "
                              f"{result.stderr.strip()[-2000:]}")
    return result


def _inspect(ref: str) -> dict[str, Any] | None:
    result = _buildah("inspect", "--type", "image", ref, check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def _copied_sources(dockerfile: Path) -> list[Path]:
    """The context paths the Dockerfile's COPY lines (those not --from a stage) read; no continuation lines there."""
    sources = []
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        words = shlex.split(line) if line.startswith("COPY ") else []
        if words and not any(w.startswith("--from=") for w in words):
            sources += [REPO_ROOT / w for w in words[1:-1] if not w.startswith("--")]
    return sources


def content_hash(dockerfile: Path, base_id: str) -> str:
    digest = hashlib.sha256(f"{base_id}\n".encode())
    for source in [dockerfile, *_copied_sources(dockerfile)]:
        files = sorted(source.rglob("*")) if source.is_dir() else [source]
        for path in files:
            if path.is_file() and not _SKIPPED_PARTS & set(path.parts) and path.suffix != ".pyc":
                digest.update(f"{path.relative_to(REPO_ROOT)}\n".encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def build_base() -> str:
    """The local Debian base (built unless current); returns its image ID."""
    result = subprocess.run(["bash", str(BASE_SCRIPT)], stdout=sys.stderr)
    if result.returncode != 0:
        raise cp.ClusterError(f"building {BASE_IMAGE} failed (exit {result.returncode}); see the output above")
    info = _inspect(BASE_IMAGE)
    assert info, BASE_IMAGE
    return str(info["FromImageID"])


def fill_wheelhouse(dockerfile: Path) -> Path:
    """Downloads (once) every wheel the Dockerfile's pip installs need: its requirements under constraints.txt, the
    pip it pins and setuptools for building the package. This interpreter is Python 3.11 on Linux x86_64, as the
    image's is."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    text = dockerfile.read_text(encoding="utf-8")
    pins = re.findall(r"\bpip==[\w.]+", text)
    requirements = [arg for source in _copied_sources(dockerfile) if source.name.startswith("requirements")
                    for arg in ("-r", str(source))]
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                             "--dest", str(wheels), "-c", str(REPO_ROOT / "constraints.txt"), *pins,
                             "setuptools>=68", *requirements], stdout=sys.stderr)
    if result.returncode != 0:
        raise cp.ClusterError(f"pip download for {dockerfile.relative_to(REPO_ROOT)} failed (exit {result.returncode})")
    pip_conf = cache_dir() / "wheelhouse-pip.conf"
    pip_conf.write_text("[global]\nno-index = true\nfind-links = /wheels\n")
    return wheels


def build(name: str, base_id: str) -> Built:
    ref = reference(name)
    dockerfile = DOCKERFILES[name]
    wanted = content_hash(dockerfile, base_id)
    info = _inspect(ref)
    if info and _label(info, HASH_LABEL) == wanted:
        return Built(ref, str(info["FromImageID"]), _size(ref), 0.0)
    started = time.monotonic()
    wheels = fill_wheelhouse(dockerfile)
    cp.log(f"building {ref} from {dockerfile.relative_to(REPO_ROOT)} (content {wanted})")
    # The build trusts what this machine trusts (a TLS-inspecting proxy's CA, say): the host's CA bundle is mounted
    # over the base's for the RUN steps only, never committed to the image.
    trust = ["--volume", f"{HOST_CA_BUNDLE}:{HOST_CA_BUNDLE}:ro"] if Path(HOST_CA_BUNDLE).is_file() else []
    result = subprocess.run(
        ["buildah", "bud", "--isolation", "chroot", "--layers", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
         "--volume", f"{wheels}:/wheels:ro", "--volume", f"{cache_dir() / 'wheelhouse-pip.conf'}:/etc/pip.conf:ro",
         *trust, "--label", f"{HASH_LABEL}={wanted}",
         "-f", str(dockerfile), "-t", ref, str(REPO_ROOT)], stdout=sys.stderr)
    if result.returncode != 0:
        raise cp.ClusterError(f"buildah bud {dockerfile.relative_to(REPO_ROOT)} failed (exit {result.returncode})")
    _buildah("rmi", "--prune", check=False)  # the untagged image the previous build of this tag left
    info = _inspect(ref)
    assert info, ref
    return Built(ref, str(info["FromImageID"]), _size(ref), time.monotonic() - started)


def _label(info: dict[str, Any], key: str) -> str | None:
    return ((info.get("Docker") or {}).get("config") or {}).get("Labels", {}).get(key)


def _size(ref: str) -> str:
    return _buildah("images", "--format", "{{.Size}}", ref).stdout.strip()


def built_image_id(ref: str) -> str | None:
    """buildah's image ID (the config digest, `sha256:...`) of `ref`, None when it is not built."""
    info = _inspect(ref)
    return f"sha256:{info['FromImageID']}" if info else None


def _node_bins() -> Path:
    state = cp.read_state() or {}
    if not realnode.healthy(state):
        raise cp.ClusterError("the real node is not running: `make cluster-up` "
                              "(python -m devkit.cluster up --real-node)")
    return Path(state["node"]["bin_dir"])


def node_image(ref: str) -> tuple[str, str] | None:
    """(manifest digest, config digest) of the image containerd holds for `ref` in the kubelet's namespace."""
    bins = _node_bins()
    listing = realnode.ctr(bins, "images", "ls", f"name=={ref}", check=False).stdout.splitlines()[1:]
    if not listing:
        return None
    manifest_digest = listing[0].split()[2]
    manifest = json.loads(realnode.ctr(bins, "content", "get", manifest_digest).stdout)
    return manifest_digest, str(manifest["config"]["digest"])


def import_into_node(ref: str, image_id: str) -> float:
    """Puts the buildah image `ref` into the node's containerd unless the same image is there; returns seconds."""
    node_bins = _node_bins()
    held = node_image(ref)
    if held and held[1] == f"sha256:{image_id}":
        _pin(node_bins, ref)
        return 0.0
    started = time.monotonic()
    # Streamed through a FIFO: gigabytes are not written to disk and read back once more on the way.
    with tempfile.TemporaryDirectory(prefix="llmmc-image-") as tmp:
        fifo = Path(tmp) / "image.tar"
        os.mkfifo(fifo)
        push = subprocess.Popen(["buildah", "push", "--quiet", ref, f"docker-archive:{fifo}:{ref}"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            realnode.import_archive(node_bins, fifo)
        finally:
            _, push_errors = push.communicate(timeout=120)
        if push.returncode != 0:
            raise cp.ClusterError(f"buildah push {ref} failed (exit {push.returncode}): {push_errors.strip()}")
    _pin(node_bins, ref)
    return time.monotonic() - started


def _pin(bins: Path, ref: str) -> None:
    """Pinned, as the sandbox image is: the kubelet's disk-pressure reclaim removes unused images, and these cannot
    be pulled back (it did remove them once on this shared disk)."""
    realnode.ctr(bins, "images", "label", ref, "io.cri-containerd.pinned=pinned")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.localimages", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="all", choices=["build", "import", "all"])
    parser.add_argument("--only", default="", help="comma-separated short names: operator,trainer,chat")
    args = parser.parse_args(argv)
    names = [n for n in DOCKERFILES if not args.only or n.rpartition("/")[2] in args.only.split(",")]
    try:
        base_id = build_base()
        if args.command in ("import", "all"):  # the real-node tests run their pods from the base itself
            import_into_node(BASE_IMAGE, base_id)
        for name in names:
            built = build(name, base_id)
            how = f"built in {built.seconds:.0f}s" if built.seconds else "current"
            print(f"{built.ref}: {how}, {built.size}, {built.image_id}", flush=True)
            if args.command in ("import", "all"):
                seconds = import_into_node(built.ref, built.image_id)
                how = f"imported in {seconds:.0f}s" if seconds else "current"
                print(f"    containerd (k8s.io): {how}", flush=True)
    except cp.ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
