"""The FastAPI app factory: ``create_app(settings, engine=None)``.

Without an engine the model and SAEs load in the background after start (``/healthz`` answers at
once, ``/readyz`` and the API say 503 + Retry-After until ready); tests and the CLI pass a loaded
engine. Every error is ``{"error": {"code", "message"}}`` with its status; bad input is never a 500.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

import lorasae_client

from .dashboards import DashboardIndex
from .deps import Service
from .drift import DriftIndex
from .engine import Engine
from .errors import install_handlers
from .limits import EdgeMiddleware
from .routes import adapters, drift, features, generate, health, latents, viewer
from .settings import Settings

# metric labels: anything else collapses into "other" (a client must not create series at will)
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    dashboards: DashboardIndex | None = None,
    drift_reports: DriftIndex | None = None,
) -> FastAPI:
    """The app: routes, static files, edge limits, metrics and error handlers around one ``Service``.
    ``dashboards`` / ``drift_reports``: the settings' dashboards / drift reports already indexed
    against ``engine`` (else done at start)."""
    settings = settings or Settings()
    service = Service(settings, engine, dashboards, drift_reports)

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

    app = FastAPI(
        title="lorasae feature server",
        version=lorasae_client.__version__,
        description="Per-token SAE features of a language model, with hot-swapped LoRA-SAE adapters.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.include_router(features.router)
    app.include_router(generate.router)
    app.include_router(adapters.router)
    app.include_router(latents.router)
    app.include_router(drift.router)
    app.include_router(health.router)
    app.include_router(viewer.router)
    app.mount("/static", StaticFiles(directory=viewer.STATIC_DIR), name="static")
    app.add_middleware(EdgeMiddleware, settings=settings)  # inner: sees only allowed hosts
    app.add_middleware(_MetricsMiddleware, service=service)  # outer: counts refusals too

    install_handlers(app)
    return app
