"""The web chat page and the per-character version page: static files from `chat_service/web/` at `/ui/`
(plain HTML/CSS/JS, nothing fetched from elsewhere, so the pages work air-gapped); `/` leads there."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

router = APIRouter()
# Package data (chat_image/pyproject.toml), found through the installed package.
router.mount("/ui", StaticFiles(packages=[("chat_service", "web")], html=True), name="ui")


@router.get("/", include_in_schema=False)
async def home() -> RedirectResponse:
    return RedirectResponse("/ui/")
