"""`GET /v1/characters/{name}/versions`: a character's version history as this service knows it — every version whose
replies were rated, with its thumbs, and the serving version with its manifest's eval metrics (for the web page's
chart and the MCP server's `character_status`)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..adapter_metrics import manifest_metrics
from ..deps import ServiceDep, adapter_status, find_character
from ..schemas import VersionFeedbackInfo
from ..store import version_order
from .feedback import version_info

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
