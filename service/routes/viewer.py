"""The viewer page: ``GET /`` serves ``static/index.html``; ``create_app`` mounts the assets at
``/static``.

The page is plain HTML + JS + CSS that calls the public API (``/readyz``, ``/v1/adapters``,
``/v1/features``) from the browser; nothing is loaded from outside the server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(tags=["viewer"], include_in_schema=False)


@router.get("/", response_class=FileResponse)
async def viewer_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
