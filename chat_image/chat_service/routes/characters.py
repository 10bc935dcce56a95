"""`GET /v1/characters`: who can be chatted with, and what serves each."""

from __future__ import annotations

from fastapi import APIRouter

from ..characters import Character
from ..deps import Service, ServiceDep, adapter_status
from ..generation import AdapterStatus
from ..schemas import AdapterInfo, CharacterInfo, CharacterList

router = APIRouter(tags=["chat"])


def adapter_info(adapter: AdapterStatus | None) -> AdapterInfo:
    if adapter is None:
        return AdapterInfo(state="loading", version=None)
    return AdapterInfo(
        state=adapter.state,
        version=adapter.version,
        reason=adapter.reason,
        error=adapter.error,
        warnings=adapter.warnings,
    )


def character_info(service: Service, character: Character) -> CharacterInfo:
    """The character and what answers for it now (null while the model is loading)."""
    adapter = adapter_status(service, character.name)
    return CharacterInfo(
        name=character.name,
        display_name=character.display_name,
        persona=character.persona,
        generation=character.generation.model_dump(),
        adapter_version=adapter.serving_version if adapter is not None else None,
        adapter=adapter_info(adapter),
    )


@router.get("/v1/characters", response_model=CharacterList, summary="Characters and their adapters")
def list_characters(service: ServiceDep) -> CharacterList:
    return CharacterList(characters=[character_info(service, c) for c in service.characters.values()])
