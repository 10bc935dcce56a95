"""Where the base model comes from — a local directory, the hub cache or the hub — decided at startup in at most a few
seconds, so that a model that cannot be loaded is one clear error instead of minutes of retries against a hub that
an offline machine (or an air-gapped cluster) cannot reach."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HUB_PROBE_SECONDS = 3.0
_TRUE = {"1", "ON", "YES", "TRUE"}


class BaseModelUnavailable(OSError):
    """The base model is neither a local directory nor loadable from the hub (or its cache)."""


def load_options(name: str) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for base model `name`: none for a local directory or a reachable hub,
    `local_files_only` when only the hub cache can serve it; `BaseModelUnavailable` (saying what to set) otherwise."""
    if Path(name).expanduser().is_dir():
        return {}
    hint = "set BASE_MODEL to a directory saved with save_pretrained"
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise BaseModelUnavailable(f"base model {name!r}: no such directory; {hint}")
    offline = any(os.environ.get(v, "").upper() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if not offline and hub_reachable():
        return {}
    if in_hub_cache(name):
        return {"local_files_only": True}
    why = "the hub is off (HF_HUB_OFFLINE)" if offline else f"the model hub at {hub_endpoint()} cannot be reached"
    raise BaseModelUnavailable(f"base model {name!r} is not a local directory nor in the hub cache, and {why}; "
                               f"{hint}")


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def in_hub_cache(name: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError:
        return False


@functools.cache
def hub_reachable() -> bool:
    """Can a TCP connection to the hub (or the HTTPS proxy in front of it) be opened within a few seconds?"""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    target = urlsplit(proxy if proxy else hub_endpoint())
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        with socket.create_connection((target.hostname or "", port), timeout=HUB_PROBE_SECONDS):
            return True
    except OSError:
        return False
