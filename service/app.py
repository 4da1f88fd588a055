"""The FastAPI app factory: ``create_app(settings, engine=None)``.

Without an engine the model and SAEs load in the background after start (``/healthz`` answers at
once, ``/readyz`` and the API say 503 + Retry-After until ready); tests and the CLI pass a loaded
engine. Every error is ``{"error": {"code", "message"}}`` with its status; bad input is never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import lorasae_client
from lorasae.errors import LorasaeError

from .deps import Service
from .engine import Engine
from .errors import ServiceError, json_error
from .limits import EdgeMiddleware
from .routes import adapters, features, health, viewer
from .settings import Settings

log = logging.getLogger("lorasae.service")
# metric labels: anything else collapses into "other" (a client must not create series at will)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        # pydantic reports every branch of a union; the first is enough to act on
        where = ".".join(x for x in loc if not x.startswith(("str", "list[", "function-")))
        parts.append(f"{where or 'body'}: {err.get('msg')}")
    seen = list(dict.fromkeys(parts))
    return "; ".join(seen[:5])


class _MetricsMiddleware:
    """Counts requests and latency per route template (pure ASGI: no body buffering)."""

    def __init__(self, app, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics = self.service.metrics
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            metrics.requests.labels(method, path, str(status["code"])).inc()
            metrics.latency.labels(path).observe(time.perf_counter() - started)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    settings = settings or Settings()
    service = Service(settings, engine)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        loader = None
        if engine is not None:
            await service.start()
            if service.error:  # the caller loaded the model and waits for a working server
                raise RuntimeError(f"startup failed: {service.error}")
        else:
            loader = asyncio.create_task(service.start())
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                loader.cancel()
            await service.stop()

    app = FastAPI(title="lorasae feature server", version=lorasae_client.__version__,
                  description="Per-token SAE features of a language model, with hot-swapped "
                              "LoRA-SAE adapters.", lifespan=lifespan)
    app.state.service = service
    app.include_router(features.router)
    app.include_router(adapters.router)
    app.include_router(health.router)
    app.include_router(viewer.router)
    app.mount("/static", StaticFiles(directory=viewer.STATIC_DIR), name="static")
    app.add_middleware(EdgeMiddleware, settings=settings)  # inner: sees only allowed hosts
    app.add_middleware(_MetricsMiddleware, service=service)  # outer: counts refusals too

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError):
        return json_error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(LorasaeError)
    async def _lorasae_error(_request: Request, exc: LorasaeError):
        return json_error(400, "bad_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError):
        return json_error(422, "validation_error", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
            # FastAPI's body parsing failed beyond a JSON syntax error (bytes that are not UTF-8,
            # nesting too deep): malformed JSON all the same, answered like any other (422)
            return json_error(422, "validation_error",
                                  f"body: not valid JSON ({type(exc.__cause__).__name__})")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return json_error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception):
        log.exception("unexpected error")
        return json_error(500, "internal_error", f"{type(exc).__name__} (see the server log)")

    return app
