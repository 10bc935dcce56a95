"""Atomic publication of adapter versions on the adapter volume (contract §2).

``<root>/lora_<character>/.tmp-<version>-XXXX/`` is filled, every file and the directory are fsynced, then it is
renamed to ``<version>``. Readers ignore names starting with ``.``, so a version directory that exists is complete;
a crash leaves at worst a ``.tmp-*`` directory, which the next run removes once it is old.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from .pausing import pause_point

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^\d{8}T\d{6}Z$")
STALE_TMP_SECONDS = 6 * 3600


class PublishError(RuntimeError):
    pass


def version_for(moment: datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")


def character_dir(root: str | Path, character: str) -> Path:
    if not character or "/" in character or character.startswith("."):
        raise PublishError(f"character name {character!r} cannot be a directory name")
    return Path(root) / f"lora_{character}"


def list_versions(root: str | Path, character: str) -> list[str]:
    """Published versions, oldest first; work-in-progress (dot) directories and strays are not versions."""
    directory = character_dir(root, character)
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if p.is_dir() and VERSION_RE.match(p.name))


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _remove_stale_tmp(directory: Path) -> None:
    now = time.time()
    for entry in directory.glob(".tmp-*"):
        try:
            if entry.is_dir() and now - entry.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(entry, ignore_errors=True)
                log.info("removed stale work directory %s", entry)
        except FileNotFoundError:
            continue


def check_writable(root: str | Path, character: str, version: str) -> None:
    """Fail early (before training) when ``version`` exists or the character's directory cannot be written."""
    directory = character_dir(root, character)
    if (directory / version).exists():
        raise PublishError(f"version {directory / version} already exists; published versions are never modified")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".tmp-probe-", dir=directory):
            pass
    except OSError as exc:
        raise PublishError(f"cannot write to the adapter volume at {directory}: {exc}") from exc


def publish(root: str | Path, character: str, version: str, write: Callable[[Path], None]) -> Path:
    """Create ``<root>/lora_<character>/<version>/`` atomically: ``write`` fills a hidden temp dir, then it is
    renamed. On any exception (including SIGTERM turned into SystemExit) the temp dir is removed."""
    if not VERSION_RE.match(version):
        raise PublishError(f"version {version!r} is not YYYYMMDDTHHMMSSZ")
    directory = character_dir(root, character)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / version
    if final.exists():
        raise PublishError(f"version {final} already exists; published versions are never modified")
    _remove_stale_tmp(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=directory))
    try:
        write(tmp)
        _fsync_tree(tmp)
        pause_point("publish", f"before rename of {tmp}")
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the chat service reads it as another user
        if final.exists():
            raise PublishError(f"version {final} appeared while publishing")
        os.rename(tmp, final)
        _fsync_path(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("published %s", final)
    return final


def prune(root: str | Path, character: str, keep: int, protect: set[str] | None = None) -> list[str]:
    """Keep the newest ``keep`` versions plus every version in ``protect`` (the one serving); returns the removed.

    A version is first renamed to a hidden name, so readers never see a half-deleted directory."""
    if keep < 1:
        raise PublishError(f"keep-versions must be at least 1, got {keep}")
    protect = protect or set()
    versions = list_versions(root, character)
    doomed = [v for v in versions[:-keep] if v not in protect]
    directory = character_dir(root, character)
    for version in doomed:
        hidden = directory / f".tmp-delete-{version}"
        os.rename(directory / version, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
        log.info("pruned version %s", version)
    return doomed
