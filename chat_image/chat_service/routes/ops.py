"""Operations: `/healthz` (liveness), `/readyz` (readiness, per character) and `/metrics` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from ..deps import ServiceDep
from .characters import character_info

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: model loaded and store reachable; per character")
async def readyz(service: ServiceDep) -> JSONResponse:
    store_ok, store_error = True, None
    try:
        await run_in_threadpool(service.store.ping)
    except Exception as exc:
        store_ok, store_error = False, f"{type(exc).__name__}: {exc}"
    models = service.models
    ready = store_ok and models.loaded
    body: dict[str, Any] = {
        "ready": ready,
        "model": {
            "loaded": models.loaded,
            "base_model": service.settings.base_model,
            "device": models.device if models.loaded else None,
            "error": models.load_error,
        },
        "store": {"reachable": store_ok, "dialect": service.store.dialect, "error": store_error},
        "characters": {},
    }
    for name, character in service.characters.items():
        info = character_info(service, character)
        body["characters"][name] = {"serving": info.adapter_version, **info.adapter.model_dump()}
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def prometheus_metrics(service: ServiceDep) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)
