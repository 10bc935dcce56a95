"""The FastAPI application: `create_app(settings)` builds a complete service (used by __main__, tests, benchmarks).

It only wires: the endpoints are in `routes/`, what they depend on in `deps.py`, the prompt in `prompting.py`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from . import __version__
from .apidoc import method_not_allowed
from .characters import Character, load_characters
from .config import Settings
from .deps import Service
from .engines import EngineUnavailable, create_engine, engine_unavailable, generation_gate
from .generation import ModelManager
from .metrics import Metrics
from .middleware import BodyLimitMiddleware, MetricsMiddleware
from .model_source import load_options
from .routes import ROUTERS
from .store import Store

log = logging.getLogger(__name__)


def load_models(models: ModelManager, metrics: Metrics) -> None:
    """Load the base model and the adapters (in a background thread); a failure is reported by /readyz."""
    try:
        models.load()
    except Exception as exc:
        models.load_error = f"{type(exc).__name__}: {exc}"
        log.exception("base model %s failed to load", models.settings.base_model)
        return
    metrics.model_loaded.set(1)
    metrics.set_adapters(models.adapters)


def lifespan_for(
    settings: Settings, characters: dict[str, Character], metrics: Metrics, *, load_model: bool
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Startup: the store and its schema, then the model in the background. Shutdown: the store's connections."""
    history_token = settings.resolved_history_token()
    models = create_engine(settings, characters)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings.database_url)
        await run_in_threadpool(store.create_schema)
        app.state.service = Service(
            settings, characters, store, models, metrics, history_token, generation_gate=generation_gate(settings)
        )
        if history_token is None:
            log.warning("no HISTORY_TOKEN/HISTORY_TOKEN_FILE: GET /v1/history refuses every request")
        if load_model:
            threading.Thread(target=load_models, args=(models, metrics), name="load-model", daemon=True).start()
        try:
            yield
        finally:
            store.close()

    return lifespan


def create_app(settings: Settings | None = None, *, load_model: bool = True) -> FastAPI:
    """Build the service. The store schema is created on startup; the model loads in a background thread so that
    /healthz answers at once and /readyz turns ready when loading is done (`load_model=False` skips loading: tests
    of the store-only endpoints)."""
    settings = settings or Settings.from_env()
    characters = load_characters(settings.characters_file)
    if load_model:
        load_options(settings.base_model)  # a base model that cannot be loaded fails here, at once, not in /readyz
    metrics = Metrics()
    app = FastAPI(
        title="LlmMultiChat chat service",
        version=__version__,
        description="Character chat with durable history, feedback and per-character LoRA adapters.",
        lifespan=lifespan_for(settings, characters, metrics, load_model=load_model),
    )
    # History import carries up to 1000 messages per request, so it gets its own (larger) limit.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        per_path={"/v1/history": settings.max_import_bytes},
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics, skip=lambda path: path == "/metrics")
    app.add_exception_handler(EngineUnavailable, engine_unavailable)
    app.add_exception_handler(HTTPException, method_not_allowed)  # type: ignore[arg-type]
    for router in ROUTERS:
        app.include_router(router)
    return app
