"""`PUT /v1/admin/adapters/{name}`: the operator's hot promotion (bearer CHAT_ADMIN_TOKEN). With an upstream engine
and CHAT_ENGINE_SERVING_DIR the character serves the given version from the next request on, without a restart;
the version is loaded into the engine first and one that cannot be used is refused while the current one keeps
serving (docs/contracts.md §6)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from ..apidoc import BODY_ERRORS, MODEL_NOT_READY, UNKNOWN_CHARACTER
from ..deps import ServiceDep, check_bearer, find_character
from ..generation import AdapterError

admin_bearer = HTTPBearer(auto_error=False, description="the CHAT_ADMIN_TOKEN secret")


def require_admin_token(
    service: ServiceDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer)]
) -> None:
    check_bearer(credentials, service.settings.resolved_admin_token())


router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin_token)])


class ServeRequest(BaseModel):
    version: str | None = Field(description="the adapter version to serve; null: the base model")


class Served(BaseModel):
    character: str
    serving_version: str = Field(description="what answers from now on: the version, or 'base'")


RESPONSES: dict[int | str, dict[str, Any]] = {
    **BODY_ERRORS,
    401: {"description": "missing or wrong bearer token"},
    **UNKNOWN_CHARACTER,
    409: {"description": "the version cannot be used (missing, broken, another prompt format, or this service "
                         "mounts its versions); `detail.reason` and `detail.message` say why, the current one "
                         "keeps serving"},
    **MODEL_NOT_READY,
}


@router.put("/v1/admin/adapters/{name}", response_model=Served, responses=RESPONSES,
            summary="Switch the version a character serves (the operator's hot promotion into the engine)")
async def serve_version(name: str, body: ServeRequest, service: ServiceDep) -> Served:
    character = find_character(service, name)
    models = service.models
    if not models.loaded:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the model is still loading",
                            headers={"Retry-After": "5"})
    try:
        # An EngineUnavailable (the engine refused the weights) is the app's 503 with vLLM's message.
        adapter = await run_in_threadpool(models.switch, character.name, body.version)
    except AdapterError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, {"reason": exc.reason, "message": str(exc)}) from None
    service.metrics.set_adapters(models.adapters)
    return Served(character=character.name, serving_version=adapter.serving_version)
