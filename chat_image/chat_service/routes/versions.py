"""`GET /v1/characters/{name}/versions`: a character's version history as this service knows it — every version whose
replies were rated, with its thumbs, and the serving version with its manifest's eval metrics (for the web page's
chart and the MCP server's `character_status`)."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..deps import ServiceDep, adapter_status, find_character
from ..generation import AdapterStatus
from ..schemas import VersionFeedbackInfo
from ..store import version_order
from .feedback import version_info

log = logging.getLogger(__name__)

router = APIRouter(tags=["chat"])


class VersionRecord(BaseModel):
    version: str | None = Field(description="adapter version, 'base', or null (replies imported without a version)")
    serving: bool = Field(description="this version answers now")
    metrics: dict[str, float | None] | None = Field(
        description="the serving adapter's manifest metrics (eval_loss_base, eval_loss_serving = the version it "
        "replaced, eval_loss_adapter, ...); null for other versions and base"
    )
    feedback: VersionFeedbackInfo | None = Field(description="thumbs on this version's replies; null: none yet")


class CharacterVersions(BaseModel):
    character: str
    serving_version: str | None = Field(description="what answers now; null while the model loads")
    versions: list[VersionRecord] = Field(description="base first, then versions oldest first, null last")


def manifest_metrics(adapter: AdapterStatus | None) -> dict[str, Any] | None:
    """The loaded adapter's manifest metrics (contract §2), None without a loaded adapter."""
    if adapter is None or adapter.state != "loaded":
        return None
    try:
        manifest = json.loads((adapter.path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        # It was readable when the adapter loaded; a volume that went away since must not break the page.
        log.warning("cannot read %s/manifest.json: %s", adapter.path, exc)
        return None
    metrics = manifest.get("metrics")
    if not isinstance(metrics, dict):
        return None
    return {key: value for key, value in metrics.items() if isinstance(value, int | float) or value is None}


@router.get(
    "/v1/characters/{name}/versions",
    response_model=CharacterVersions,
    summary="Adapter versions of a character: thumbs per version, eval metrics of the serving one",
    responses={404: {"description": "unknown character"}},
)
async def character_versions(name: str, service: ServiceDep) -> CharacterVersions:
    character = find_character(service, name)
    counts = {c.version: c for c in await run_in_threadpool(service.store.feedback_by_version, character.name)}
    adapter = adapter_status(service, character.name)
    serving = adapter.serving_version if adapter is not None else None
    metrics = await run_in_threadpool(manifest_metrics, adapter)
    names = sorted(set(counts) | ({serving} if serving is not None else set()), key=version_order)
    versions = [
        VersionRecord(
            version=version,
            serving=version == serving,
            metrics=metrics if version == serving else None,
            feedback=version_info(counts[version]) if version in counts else None,
        )
        for version in names
    ]
    return CharacterVersions(character=character.name, serving_version=serving, versions=versions)
