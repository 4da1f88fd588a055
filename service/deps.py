"""The app's shared state and the FastAPI dependencies that hand it to routes (settings, auth, readiness)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import NamedTuple

from fastapi import Request

from .batcher import Batcher
from .dashboards import DashboardIndex
from .drift import DriftIndex
from .engine import Engine
from .errors import ServiceError
from .generation import Generations
from .metrics import Metrics
from .registry import Registry
from .registry_store import open_store
from .settings import Settings

log = logging.getLogger("lorasae.service")


class Loaded(NamedTuple):
    """The parts of a ready service."""

    engine: Engine
    registry: Registry
    batcher: Batcher
    generations: Generations


class Service:
    """Everything one app owns: settings, engine, registry, batcher, metrics, readiness."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine | None = None,
        dashboards: DashboardIndex | None = None,
        drift: DriftIndex | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.owns_engine = engine is None  # loaded here: closed here
        self.api_key = settings.check_safe()  # no unauthenticated admin API on a reachable address
        self.metrics = Metrics()
        self.registry: Registry | None = None
        self.batcher: Batcher | None = None
        self.generations: Generations | None = None
        self.poller: asyncio.Task | None = None  # shared registry: reads the rows every registry_poll_s
        # the settings' dashboards, indexed against the engine (here, or in start())
        self.dashboards = dashboards or DashboardIndex()
        self.drift = drift or DriftIndex()  # the settings' drift reports, likewise
        self.error: str | None = None  # why loading failed
        self.ready = asyncio.Event()

    async def start(self) -> None:
        """Load (unless an engine was given), restore the registry, start batching; then ready."""
        s = self.settings
        try:
            if self.engine is None:
                log.info("loading model %r and SAEs %s", s.model, s.saes or "(default)")
                self.engine = await asyncio.to_thread(Engine.from_settings, s)
            if s.dashboards and not self.dashboards:  # not indexed by the caller
                log.info("indexing latent dashboards %s", s.dashboards)
                self.dashboards = await asyncio.to_thread(DashboardIndex.build, self.engine, s.dashboards)
            if s.drift and not self.drift:
                log.info("reading drift reports %s", s.drift)
                self.drift = await asyncio.to_thread(DriftIndex.build, self.engine, s.drift)
            assert s.adapter_root is not None, "Settings' validator fills it"
            store = await asyncio.to_thread(open_store, s)  # SQLite, or PostgreSQL (bounded connect)
            self.registry = Registry(
                self.engine,
                s.adapter_root,
                store,
                max_upload_bytes=int(s.max_upload_mb * 2**20),
                metrics=self.metrics,
                unpack_timeout_s=s.unpack_timeout_s,
            )
            await self.registry.restore()
            if self.registry.shared:  # the other servers' registrations and deletions
                self.poller = asyncio.create_task(self.registry.poll(s.registry_poll_s))
            self.batcher = Batcher(
                self.engine,
                max_batch=s.max_batch,
                max_batch_tokens=s.max_batch_tokens,
                max_wait_ms=s.max_wait_ms,
                max_queue=s.max_queue,
                retry_after_s=s.retry_after_s,
                metrics=self.metrics,
            )
            self.batcher.start()
            self.generations = Generations(
                self.engine,
                max_active=s.max_generations,
                max_waiting=s.max_generation_queue,
                retry_after_s=s.retry_after_s,
                metrics=self.metrics,
            )
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("startup failed: %s", self.error)
            return
        self.ready.set()
        log.info(
            "ready: model %s, SAEs %s, %d adapters, %d dashboard SAEs, %d drift reports",
            self.engine.model_id,
            list(self.engine.names.values()),
            len(self.registry.list()),
            len(self.dashboards),
            len(self.drift),
        )

    def loaded(self) -> Loaded:
        """Engine, registry and batcher, for code that runs only once ``ready`` is set (routes
        behind ``ready_service``): ``start`` sets it after all three exist, and nothing unsets them."""
        engine, registry, batcher, generations = self.engine, self.registry, self.batcher, self.generations
        assert engine is not None and registry is not None and batcher is not None, "service not ready"
        assert generations is not None, "service not ready"
        return Loaded(engine, registry, batcher, generations)

    async def stop(self) -> None:
        if self.poller is not None:
            self.poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.poller
        if self.generations is not None:
            self.generations.close()
        if self.batcher is not None:
            await self.batcher.stop()
        if self.registry is not None:
            self.registry.close()
        if self.owns_engine and self.engine is not None:
            self.engine.close()


def get_service(request: Request) -> Service:
    return request.app.state.service


def ready_service(request: Request) -> Service:
    svc: Service = request.app.state.service
    if not svc.ready.is_set():
        detail = f"startup failed: {svc.error}" if svc.error else "the model is still loading"
        raise ServiceError(
            503, "not_ready", f"not ready: {detail}", {"Retry-After": str(svc.settings.retry_after_s)}
        )
    return svc


def require_admin(request: Request) -> None:
    """Admin routes need ``Authorization: Bearer <key>`` when a key is configured (never logged)."""
    key = request.app.state.service.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ServiceError(
            401,
            "unauthorized",
            "this route needs an API key: send 'Authorization: Bearer <key>'",
            {"WWW-Authenticate": "Bearer"},
        )
    if not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ServiceError(401, "unauthorized", "invalid API key", {"WWW-Authenticate": "Bearer"})
